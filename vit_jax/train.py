"""Data-parallel training and evaluation (paper Sec. 4 / Appendix B).

The data path reads top to bottom: config -> input pipeline -> model ->
train step -> checkpoint -> evaluation. One command runs it
(`python -m vit_jax.main --config=... --workdir=...`) on one CPU, all devices
of a host, or several hosts: the step is `jax.pmap`ped over the local devices
and gradients are averaged over every device of every process.

A run is a pure function of its config: the batch of step `s` comes from
`input_pipeline.get_datasets(config, start_step=s - 1)` and its dropout key
is `fold_in(PRNGKey(seed), s)`, so a run resumed from a checkpoint ends with
the same parameters as one that was never interrupted.
"""

import contextlib
import json
import os
import time
from typing import Any, Callable, Dict, Optional

from absl import logging
import flax
import flax.jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vit_jax import checkpoint
from vit_jax import input_pipeline
from vit_jax import models
from vit_jax import optim
from vit_jax import progress
from vit_jax import train_checkpoint
from vit_jax import utils

# The pmap axis; gradients, losses and eval counts are reduced over it.
AXIS = 'batch'
SUMMARY_FILE = 'summary.json'


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or inf."""


# ------------------------------------------------------------------- losses


def softmax_xent(*, logits, labels):
  """Softmax cross-entropy on one-hot (or soft) labels, mean over examples."""
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.sum(logp * labels, axis=-1))


def sigmoid_xent(*, logits, labels):
  """Per-class sigmoid cross-entropy summed over classes, mean over examples.

  For multi-label data such as ImageNet-21k, where an image may carry several
  labels.
  """
  log_p = jax.nn.log_sigmoid(logits)
  log_not_p = jax.nn.log_sigmoid(-logits)
  return -jnp.mean(jnp.sum(labels * log_p + (1. - labels) * log_not_p,
                           axis=-1))


LOSSES = {'softmax_xent': softmax_xent, 'sigmoid_xent': sigmoid_xent}


# --------------------------------------------------------- train / eval step


def make_update_fn(*, apply_fn: Callable[..., Any], accum_steps: int,
                   tx: optax.GradientTransformation,
                   loss: str = 'softmax_xent') -> Callable[..., Any]:
  """Returns the pmapped update step of data-parallel training.

  Args:
    apply_fn: the model's `apply`.
    accum_steps: micro-batches per device batch (`utils.accumulate_gradient`).
    tx: the optimizer.
    loss: a key of LOSSES.

  Returns:
    `update_fn(params, opt_state, batch, rng) -> (params, opt_state, loss,
    new_rng)`, every argument and result with a leading axis of local
    devices; `batch = {'image': [devices, b, H, W, C], 'label': [devices, b,
    classes]}`. The loss is the mean over the global batch. params and
    opt_state are donated: do not use the arrays passed in afterwards.
  """
  if loss not in LOSSES:
    raise ValueError(f'Unknown loss {loss!r}; use one of {sorted(LOSSES)}.')
  loss_fn_of = LOSSES[loss]

  def update_fn(params, opt_state, batch, rng):
    _, new_rng = jax.random.split(rng)
    # Device index across all processes: every device drops out differently.
    dropout_rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS))

    def loss_fn(params, images, labels):
      logits = apply_fn({'params': params}, images, train=True,
                        rngs={'dropout': dropout_rng})
      return loss_fn_of(logits=logits, labels=labels)

    l, g = utils.accumulate_gradient(
        jax.value_and_grad(loss_fn), params, batch['image'], batch['label'],
        accum_steps)
    g = jax.lax.pmean(g, axis_name=AXIS)
    updates, opt_state = tx.update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
    l = jax.lax.pmean(l, axis_name=AXIS)
    return params, opt_state, l, new_rng

  return jax.pmap(update_fn, axis_name=AXIS, donate_argnums=(0, 1))


def make_eval_fn(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """Returns the pmapped `eval_fn(params, batch) -> (correct, count)`.

  Both are summed over all devices of all processes; `batch['mask']` keeps
  the padding examples of the last batch out. An example is correct when its
  top-1 class is one of its labels (top-1 accuracy for one-hot labels).
  """

  def eval_fn(params, batch):
    logits = apply_fn({'params': params}, batch['image'], train=False)
    top1 = jnp.argmax(logits, axis=-1)
    hit = jnp.take_along_axis(batch['label'], top1[:, None], axis=-1)[:, 0]
    correct = jnp.sum((hit > 0) * batch['mask'])
    count = jnp.sum(batch['mask'])
    return jax.lax.psum(correct, AXIS), jax.lax.psum(count, AXIS)

  return jax.pmap(eval_fn, axis_name=AXIS)


def evaluate(eval_fn, params_repl, ds_test, n_prefetch: int) -> float:
  """Top-1 accuracy over one pass of `ds_test` (each example counted once)."""
  correct = count = 0.
  for batch in input_pipeline.prefetch(ds_test, n_prefetch):
    c, n = eval_fn(params_repl, batch)
    correct += float(_first(c))
    count += float(_first(n))
  if not count:
    raise ValueError('The test split is empty; check --config.test_split.')
  return correct / count


# ------------------------------------------------------------------ model


def create_model(config: ml_collections.ConfigDict,
                 num_classes: int) -> models.VisionTransformer:
  """The model of `config.model` (a zoo ConfigDict copy or a custom one)."""
  if config.get('model') is None:
    raise ValueError('config.model is not set; copy one from '
                     'vit_jax.configs.models.MODEL_CONFIGS (see configs/).')
  return models.VisionTransformer(num_classes=num_classes, **config.model)


def pretrained_path(config: ml_collections.ConfigDict) -> Optional[str]:
  """`config.pretrained_path`, else `<pretrained_dir>/<model_name>.npz`."""
  if config.get('pretrained_path'):
    return config.pretrained_path
  if config.get('pretrained_dir'):
    name = config.get('model_name') or config.model.get('model_name')
    return os.path.join(config.pretrained_dir, f'{name}.npz')
  return None


def init_params(model, config: ml_collections.ConfigDict, *,
                load_pretrained: bool = True) -> Dict[str, Any]:
  """Fresh parameters (seeded by config.seed), optionally the pre-trained ones.

  Every process computes the same values from the same seed, so replicas
  start equal without communication.
  """
  height, width = input_pipeline.get_image_size(config)
  seed = config.seed

  @jax.jit
  def init():
    return model.init(jax.random.PRNGKey(seed),
                      jnp.zeros([1, height, width, 3]), train=False)

  params = flax.core.unfreeze(init()['params'])
  path = pretrained_path(config) if load_pretrained else None
  if path:
    logging.info('Fine-tuning from %s', path)
    params = checkpoint.load_pretrained(
        pretrained_path=path, init_params=params, model_config=config.model,
        image_size=(height, width))
  return jax.tree_util.tree_map(np.asarray, params)


# ----------------------------------------------------------- loop helpers


def _check_config(config, device_count: int) -> None:
  """Errors a user can fix, before any data is read or anything compiled."""
  if config.total_steps <= 0:
    raise ValueError(f'config.total_steps={config.total_steps} must be > 0.')
  for name in ('log_every', 'eval_every', 'checkpoint_every'):
    if config.get(name, 1) <= 0:
      raise ValueError(f'config.{name} must be > 0 (got {config.get(name)}).')
  if config.get('loss', 'softmax_xent') not in LOSSES:
    raise ValueError(f'Unknown config.loss {config.loss!r}; use one of '
                     f'{sorted(LOSSES)}.')
  global_devices = device_count * jax.process_count()
  if config.batch % global_devices:
    raise ValueError(
        f'config.batch={config.batch} is not divisible by the {global_devices} '
        f'devices; set --config.batch to a multiple of {global_devices}.')
  per_device = config.batch // global_devices
  accum = config.get('accum_steps', 1) or 1
  if per_device % accum:
    raise ValueError(
        f'The per-device batch {per_device} (config.batch={config.batch} over '
        f'{global_devices} devices) is not divisible by config.accum_steps='
        f'{accum}; choose accum_steps dividing {per_device}.')


def _first(x_repl) -> np.ndarray:
  """The first local replica of a pmapped array, as numpy.

  Copies one device's shard; unlike `x[0]` on the jax array this compiles
  nothing (each distinct shape would otherwise compile a slice).
  """
  return np.asarray(x_repl.addressable_shards[0].data)[0]


class _StepKeys:
  """Dropout keys `fold_in(PRNGKey(seed), step)` as host arrays.

  Computed for chunks of steps by one compiled function, so that the loop
  hands the step numpy data (no per-step device work or compilation) and a
  resumed run gets the same key for the same step.
  """

  CHUNK = 1024

  def __init__(self, seed: int):
    base = jax.random.PRNGKey(seed)
    self._fold = jax.jit(jax.vmap(lambda step: jax.random.fold_in(base, step)))
    self._start = None
    self._keys = None

  def __call__(self, step: int) -> np.ndarray:
    if self._start is None or not 0 <= step - self._start < self.CHUNK:
      self._start = step
      self._keys = np.asarray(self._fold(
          np.arange(step, step + self.CHUNK, dtype=np.uint32)))
    return self._keys[step - self._start]


class _LossWatch:
  """Losses not yet looked at; stops the run at the first NaN/inf.

  Reading a loss waits for its step, so losses are only read when logging
  or checkpointing; a checkpoint is written only after every earlier loss
  was found finite.
  """

  def __init__(self, ckpts: train_checkpoint.TrainCheckpoints):
    self._ckpts = ckpts
    self._pending = []

  def add(self, step: int, loss_repl) -> None:
    self._pending.append((step, loss_repl))

  def check(self) -> None:
    for step, loss_repl in self._pending:
      loss = float(_first(loss_repl))
      if not np.isfinite(loss):
        raise NonFiniteLossError(
            f'The training loss is {loss} at step {step}. Training stopped; '
            f'the last good checkpoint (step {self._ckpts.latest_step()}) is '
            f'kept in {self._ckpts.directory} and nothing later was saved. '
            'Lower --config.base_lr, raise --config.warmup_steps, or set '
            '--config.grad_norm_clip.')
    self._pending.clear()


def _init_or_restore(config, model, tx, ckpts, start_step):
  """The train state {'params', 'opt_state'} (numpy) to start from.

  A fresh run starts from `init_params` (pre-trained weights if the config
  names them); a resumed one from its checkpoint, which must fit the model.
  """
  params = init_params(model, config, load_pretrained=not start_step)
  state = {'params': params,
           'opt_state': jax.device_get(jax.jit(tx.init)(params))}
  if not start_step:
    return state
  fix = 'Use a new --workdir, or the config the run was started with.'
  try:
    restored = ckpts.restore(start_step, state)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f'Cannot resume from step {start_step} in {ckpts.directory}: its '
        f'train state does not fit this config ({type(e).__name__}: {e}). '
        f'{fix}') from e
  mismatch = train_checkpoint.tree_mismatch(restored, state)
  if mismatch:
    raise ValueError(f'Cannot resume from step {start_step} in '
                     f'{ckpts.directory}: {mismatch}. {fix}')
  return restored


def _write_json_atomically(path: str, data: Dict[str, Any]) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


# ------------------------------------------------------------------- main


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> Dict[str, Any]:
  """Trains `config`'s model, evaluating and checkpointing into `workdir`.

  Resumes from the newest checkpoint in `<workdir>/checkpoints` if there is
  one. On SIGTERM it saves a checkpoint after the current step and returns.

  Args:
    config: experiment config (see configs/common.py for every field).
    workdir: output folder: checkpoints/, TensorBoard events, summary.json.

  Returns:
    The summary (also written to `<workdir>/summary.json` by process 0 when
    the run finished): accuracy, steps, times, images/s, config.

  Raises:
    NonFiniteLossError: the loss became NaN/inf; the last good checkpoint is
      kept and nothing later is saved.
  """
  with contextlib.ExitStack() as cleanup:
    return _train_and_evaluate(config, workdir, cleanup)


def _train_and_evaluate(config, workdir, cleanup: contextlib.ExitStack):
  """`train_and_evaluate`; `cleanup` closes what it opens, also on errors."""
  t_start = time.time()
  device_count = jax.local_device_count()
  _check_config(config, device_count)
  # A missing dataset fails here, before the checkpoint manager starts its
  # background threads (which would otherwise outlive a quick exit).
  num_classes = input_pipeline.get_dataset_info(
      config.dataset, config.train_split,
      data_dir=config.get('tfds_data_dir'))['num_classes']
  os.makedirs(workdir, exist_ok=True)
  ckpts = train_checkpoint.TrainCheckpoints(workdir)
  cleanup.callback(ckpts.close)
  total_steps = config.total_steps
  start_step = ckpts.latest_step() or 0
  if start_step:
    logging.info('Resuming from %s at step %d', ckpts.directory, start_step)

  # Input pipeline: the batches of steps start_step + 1, start_step + 2, ...
  ds_train, ds_test = input_pipeline.get_datasets(
      config, start_step=min(start_step, total_steps))

  # Model, optimizer and train state.
  model = create_model(config, num_classes)
  tx, lr_fn = optim.make_optimizer(config)
  state = _init_or_restore(config, model, tx, ckpts, start_step)
  num_params = sum(np.size(p) for p in
                   jax.tree_util.tree_leaves(state['params']))
  logging.info('Model %s: %s parameters, %d classes, %d local devices, '
               '%d processes.', config.get('model_name'), f'{num_params:,}',
               num_classes, device_count, jax.process_count())
  # Replicated with the pmap's own axis name, so that the first step sees
  # the same input sharding as every later one: the step compiles once.
  params_repl, opt_state_repl = flax.jax_utils.replicate(
      (state['params'], state['opt_state']), axis_name=AXIS)
  del state

  # Train step and evaluation.
  update_fn = make_update_fn(apply_fn=model.apply,
                             accum_steps=config.get('accum_steps', 1),
                             tx=tx, loss=config.get('loss', 'softmax_xent'))
  eval_fn = make_eval_fn(model.apply)
  step_keys = _StepKeys(config.seed)
  lr_jit = jax.jit(lr_fn)
  compiles = progress.CompileCounter()
  out = progress.Progress(workdir, total_steps=total_steps, batch=config.batch)
  cleanup.callback(out.close)
  losses = _LossWatch(ckpts)
  eval_history, accuracy, last_loss = [], None, None
  step, interrupted = start_step, False
  t_train = time.time()
  train_iter = input_pipeline.prefetch(ds_train, config.prefetch)
  with train_checkpoint.SigtermFlag() as sigterm:
    for step in range(start_step + 1, total_steps + 1):
      batch = next(train_iter)
      rng_repl = np.broadcast_to(step_keys(step), (device_count, 2))
      with compiles:
        params_repl, opt_state_repl, loss_repl, _ = update_fn(
            params_repl, opt_state_repl, batch, rng_repl)
      losses.add(step, loss_repl)
      if step == start_step + 1:
        jax.block_until_ready(loss_repl)
        out.first_step_done(step)

      is_last = step == total_steps
      if step % config.log_every == 0 or is_last:
        losses.check()
        last_loss = float(_first(loss_repl))
        # optax counts updates from 0: step s used lr_fn(s - 1).
        out.log_train(step, last_loss, float(lr_jit(step - 1)))

      with out.paused():
        if step % config.checkpoint_every == 0 or is_last or sigterm.received:
          losses.check()
          ckpts.save(step, jax.tree_util.tree_map(
              _first, {'params': params_repl, 'opt_state': opt_state_repl}))
        if sigterm.received and not is_last:
          interrupted = True
          break
        if step % config.eval_every == 0 or is_last:
          accuracy = evaluate(eval_fn, params_repl, ds_test, config.prefetch)
          eval_history.append([step, accuracy])
          out.log_eval(step, accuracy)
  train_time = time.time() - t_train
  if start_step >= total_steps:  # finished before: report, do not train
    accuracy = evaluate(eval_fn, params_repl, ds_test, config.prefetch)

  summary = {
      'accuracy': accuracy,
      'eval_history': eval_history,
      'final_train_loss': last_loss,
      'step': step,
      'total_steps': total_steps,
      'start_step': start_step,
      'interrupted': interrupted,
      'train_time_s': train_time,
      'total_time_s': time.time() - t_start,
      'images_per_s': out.images_per_s,
      'train_step_compilations': compiles.count,
      'num_params': int(num_params),
      'devices': jax.device_count(),
      'processes': jax.process_count(),
      'checkpoint_dir': ckpts.directory,
      'config': json.loads(config.to_json_best_effort()),
  }
  summary_path = os.path.join(workdir, SUMMARY_FILE)
  if interrupted:
    logging.warning('Stopped by SIGTERM after step %d; checkpoint saved.', step)
    if out.is_chief:
      print(f'Interrupted after step {step}; checkpoint saved in '
            f'{ckpts.directory}. Run the same command to resume.', flush=True)
  elif out.is_chief:  # summary.json marks a finished run
    _write_json_atomically(summary_path, summary)
    print(f'Final test accuracy {accuracy:.4f} after {step} steps '
          f'({progress.format_duration(summary["total_time_s"])}). '
          f'Summary: {summary_path}', flush=True)
  return summary

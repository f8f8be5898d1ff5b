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
from vit_jax.data import dataset_report
from vit_jax.evaluation import fewshot
from vit_jax import input_pipeline
from vit_jax.training import masked_patch
from vit_jax import inference_time
from vit_jax import models
from vit_jax.training import objectives
from vit_jax.training import optim
from vit_jax.run_config import original_configs
from vit_jax.training import progress
from vit_jax.training import run_plots
from vit_jax.training import sharding
from vit_jax.training import train_checkpoint
from vit_jax.training import trainable
from vit_jax.training import weight_ema
from vit_jax import utils
from vit_jax.run_config import validation

# The pmap axis; gradients, losses and eval counts are reduced over it.
AXIS = 'batch'
SUMMARY_FILE = 'summary.json'
class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or inf."""


def make_update_fn(*, apply_fn: Callable[..., Any], accum_steps: int,
                   tx: optax.GradientTransformation,
                   loss: str = 'softmax_xent',
                   loss_fn: Optional[Callable[..., Any]] = None,
                   trainable_mask: Any = None) -> Callable[..., Any]:
  """Returns the pmapped update step of data-parallel training.

  Args:
    apply_fn: the model's `apply`.
    accum_steps: micro-batches per device batch (`utils.accumulate_gradient`).
    tx: the optimizer.
    loss: a key of objectives.LOSSES.
    loss_fn: instead of apply_fn and loss, `(params, images, labels, rng) ->
      loss` (`objectives.make_loss_fn`).
    trainable_mask: tree of bools (`trainable.trainable_mask`); only the
      True leaves get gradients and updates, and `opt_state` must be
      `tx.init` of those leaves alone. None: everything trains.

  Returns:
    `update_fn(params, opt_state, batch, rng) -> (params, opt_state, loss,
    new_rng)`, every argument and result with a leading axis of local
    devices; `batch = {'image': [devices, b, H, W, C], 'label': [devices, b,
    classes]}`. The loss is the mean over the global batch. params and
    opt_state are donated: do not use the arrays passed in afterwards.
  """
  loss_fn = loss_fn or objectives.classification_loss_fn(apply_fn, loss)

  def update_fn(params, opt_state, batch, rng):
    _, new_rng = jax.random.split(rng)
    # Device index across all processes: every device drops out differently.
    device_rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS))
    train_part, _, merge = trainable.partition(params, trainable_mask)

    def loss_wrt(train_part, images, labels):
      return loss_fn(merge(train_part), images, labels, device_rng)

    l, g = utils.accumulate_gradient(
        jax.value_and_grad(loss_wrt), train_part, batch['image'],
        batch['label'], accum_steps)
    g = jax.lax.pmean(g, axis_name=AXIS)
    updates, opt_state = tx.update(g, opt_state, train_part)
    params = merge(optax.apply_updates(train_part, updates))
    l = jax.lax.pmean(l, axis_name=AXIS)
    return params, opt_state, l, new_rng

  return jax.pmap(update_fn, axis_name=AXIS, donate_argnums=(0, 1))


def make_eval_fn(apply_fn: Callable[..., Any], *,
                 counts_fn: Optional[Callable[..., Any]] = None
                 ) -> Callable[..., Any]:
  """Returns the pmapped `eval_fn(params, batch) -> (correct, count)`.

  Both are summed over all devices of all processes; `counts_fn` (default:
  `objectives.top1_counts(apply_fn)`) gives one device's counts.
  """
  counts_fn = counts_fn or objectives.top1_counts(apply_fn)

  def eval_fn(params, batch):
    correct, count = counts_fn(params, batch)
    return jax.lax.psum(correct, AXIS), jax.lax.psum(count, AXIS)

  return jax.pmap(eval_fn, axis_name=AXIS)


class PmapRunner:
  """The original's data parallelism: a full copy of the train state on
  every local device and a `jax.pmap`ped step (gradients `pmean`ed over all
  devices of all processes).

  `vit_jax.training.sharding.FsdpRunner` has the same methods for the
  sharded step;
  `train_and_evaluate` only talks to this interface.
  """

  def __init__(self, *, loss_fn, counts_fn, tx, accum_steps: int,
               trainable_mask, n_prefetch: int, confusion_fn=None):
    self.devices = jax.local_device_count()
    self._update = make_update_fn(apply_fn=None, accum_steps=accum_steps,
                                  tx=tx, loss_fn=loss_fn,
                                  trainable_mask=trainable_mask)
    self._eval = make_eval_fn(None, counts_fn=counts_fn)
    self._confusion = confusion_fn and jax.pmap(
        lambda p, b: jax.lax.psum(confusion_fn(p, b), AXIS), axis_name=AXIS)
    self._n_prefetch = n_prefetch

  def place(self, params, opt_state):
    """Host state -> device state. Replicated with the pmap's own axis name,
    so that the first step sees the same input sharding as every later one:
    the step compiles once."""
    return flax.jax_utils.replicate((params, opt_state), axis_name=AXIS)

  def batches(self, dataset):
    return input_pipeline.prefetch(dataset, self._n_prefetch)

  def step(self, params, opt_state, batch, key):
    """One update; returns (params, opt_state, loss on the devices)."""
    rng = np.broadcast_to(key, (self.devices,) + np.shape(key))
    return self._update(params, opt_state, batch, rng)[:3]

  def scalar(self, x) -> float:
    return float(_first(x))

  def to_host(self, tree):
    return jax.tree_util.tree_map(_first, tree)

  def eval_params(self, params):
    return params

  def counts(self, params, batch):
    correct, count = self._eval(params, batch)
    return self.scalar(correct), self.scalar(count)

  def confusion(self, params, batch) -> np.ndarray:
    """The batch's confusion matrix over all devices
    (`objectives.top1_confusion`)."""
    return _first(self._confusion(params, batch))


def evaluate(runner, params, ds_test) -> float:
  """Accuracy over one pass of `ds_test` (each example counted once)."""
  correct = count = 0.
  for batch in runner.batches(ds_test):
    c, n = runner.counts(params, batch)
    correct += c
    count += n
  if not count:
    raise ValueError('The test split is empty; check --config.test_split.')
  return correct / count


def confusion_matrix(runner, params, ds_test) -> np.ndarray:
  """[classes, classes] int64 counts over one pass of `ds_test`."""
  total = None
  for batch in runner.batches(ds_test):
    m = np.rint(runner.confusion(params, batch)).astype(np.int64)
    total = m if total is None else total + m
  return total


# ------------------------------------------------------------------ model


def create_model(config: ml_collections.ConfigDict,
                 num_classes: int) -> models.VisionTransformer:
  """The model of `config.model` (a zoo ConfigDict copy or a custom one):
  a VisionTransformer, or an MlpMixer for a Mixer's fields.

  With `config.objective='mpp'` a `masked_patch.MaskedPatchPredictor` with
  the same encoder (its fields from `config.mpp`); `num_classes` is unused.
  """
  if config.get('model') is None:
    raise ValueError('config.model is not set; copy one from '
                     'vit_jax.configs.models.MODEL_CONFIGS (see configs/).')
  objective = config.get('objective') or 'classification'
  if objective == 'mpp':
    fields = {k: v for k, v in config.model.items() if k != 'num_classes'}
    return masked_patch.MaskedPatchPredictor(
        num_classes=None, **fields, **(config.get('mpp') or {}))
  return models.model_class(config.model)(num_classes=num_classes,
                                          **config.model)


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
    key = jax.random.PRNGKey(seed)
    # 'mpp': the corruption of masked patch prediction (unused otherwise).
    return model.init({'params': key, 'mpp': jax.random.fold_in(key, 1)},
                      jnp.zeros([1, height, width, 3]), train=False)

  params = flax.core.unfreeze(init()['params'])
  path = validation.pretrained_path(config) if load_pretrained else None
  if path:
    logging.info('Fine-tuning from %s', path)
    params = checkpoint.load_pretrained(
        pretrained_path=path, init_params=params, model_config=config.model,
        image_size=(height, width))
  return jax.tree_util.tree_map(np.asarray, params)


# ----------------------------------------------------------- loop helpers


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

  def __init__(self, ckpts: train_checkpoint.TrainCheckpoints,
               scalar: Callable[[Any], float]):
    self._ckpts = ckpts
    self._scalar = scalar
    self._pending = []

  def add(self, step: int, loss_on_devices) -> None:
    self._pending.append((step, loss_on_devices))

  def check(self) -> None:
    for step, loss_on_devices in self._pending:
      loss = self._scalar(loss_on_devices)
      if not np.isfinite(loss):
        last = self._ckpts.latest_step()
        kept = (f'the last good checkpoint (step {last}) is kept in '
                f'{self._ckpts.directory} and nothing later was saved'
                if last is not None else
                'no checkpoint was saved before it, so the same command '
                'starts again from step 0')
        raise NonFiniteLossError(
            f'The training loss is {loss} at step {step}. Training stopped; '
            f'{kept}. Lower --config.base_lr, raise --config.warmup_steps, or '
            'set --config.grad_norm_clip.')
    self._pending.clear()


def _init_or_restore(config, model, tx, ckpts, start_step):
  """The train state {'params', 'opt_state'} (numpy) and the trainable mask.

  A fresh run starts from `init_params` (pre-trained weights if the config
  names them); a resumed one from its checkpoint, which must fit the model.
  The optimizer state covers the trainable parameters only
  (`config.trainable`).
  """
  params = init_params(model, config, load_pretrained=not start_step)
  mask = None
  if trainable.pattern(config.get('trainable')) is not None:
    mask = trainable.trainable_mask(params, config.trainable)
  train_part = trainable.partition(params, mask)[0]
  state = {'params': params,
           'opt_state': jax.device_get(jax.jit(tx.init)(train_part))}
  if not start_step:
    return state, mask
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
  return restored, mask


def make_runner(config, model, tx, mask, params):
  """The PmapRunner or sharding.FsdpRunner of `config.parallelism`."""
  is_mpp = (config.get('objective') or 'classification') == 'mpp'
  kwargs = dict(loss_fn=objectives.make_loss_fn(model, config),
                counts_fn=objectives.make_counts_fn(model, config), tx=tx,
                accum_steps=config.get('accum_steps', 1),
                trainable_mask=mask,
                confusion_fn=None if is_mpp else objectives.top1_confusion(
                    model.apply, model.num_classes))
  if (config.get('parallelism') or 'pmap') == 'fsdp':
    return sharding.FsdpRunner(
        params=params, min_shard_size=config.get(
            'fsdp_min_shard_size', sharding.MIN_SHARD_SIZE), **kwargs)
  return PmapRunner(n_prefetch=config.prefetch, **kwargs)


def _fewshot(config, model):
  """(every_steps, evaluator) of config.fewshot; every_steps 0 is off."""
  every = int((config.get('fewshot') or {}).get('every_steps') or 0)
  if not every:
    return 0, None
  return every, fewshot.make_fewshot_evaluator(config)


def _write_json_atomically(path: str, data: Dict[str, Any]) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _finish_run(config, workdir: str, summary: Dict[str, Any]) -> None:
  """Process 0 at the end of a finished run: pictures, summary.json, and the
  closing lines (result, what the workdir holds, what to run next)."""
  class_names = None
  names_path = os.path.join(workdir, dataset_report.CLASS_NAMES_FILE)
  if os.path.exists(names_path):
    with open(names_path) as f:
      class_names = json.load(f)
  title = f'{config.get("model_name") or "model"} on {config.dataset}'
  summary['plots'] = run_plots.write_run_plots(
      workdir, last_step=summary['step'], confusion=summary.get('confusion'),
      class_names=class_names, title=title)
  summary_path = os.path.join(workdir, SUMMARY_FILE)
  _write_json_atomically(summary_path, summary)
  what = (f'test accuracy {summary["accuracy"]:.4f}'
          if summary['objective'] == 'classification' else
          f'test {summary["objective"]} accuracy {summary["accuracy"]:.4f}')
  print(f'Final {what} after {summary["step"]} steps '
        f'({progress.format_duration(summary["train_time_s"])} of training, '
        f'{progress.format_duration(summary["total_time_s"])} in all).',
        flush=True)
  print(workdir_contents(workdir), flush=True)
  print(next_commands(config, workdir, summary), flush=True)


def workdir_contents(workdir: str) -> str:
  """A few lines: the workdir and what a finished run left in it."""
  notes = {
      SUMMARY_FILE: 'accuracy, history, config',
      run_plots.CURVES_FILE: 'training loss and test accuracy',
      run_plots.CONFUSION_FILE: 'test confusion matrix',
      train_checkpoint.CHECKPOINT_SUBDIR: 'train state (resume, export)',
      progress.METRICS_FILE: 'metrics, one JSON line each',
      'log.txt': 'the full log (python -m vit_jax.main writes it)',
  }
  names = sorted(os.listdir(workdir))
  lines = [f'Workdir {workdir}:']
  for name in names:
    if name in notes:
      lines.append(f'  {name:<16} {notes[name]}')
  others = [n for n in names if n not in notes and not n.startswith('.')]
  events = [n for n in others if n.startswith('events.out.tfevents')]
  rest = [n for n in others if n not in events]
  if events:
    lines.append(f'  {"events.out.*":<16} TensorBoard events')
  if rest:
    lines.append(f'  also: {", ".join(rest)}')
  return '\n'.join(lines)


def next_commands(config, workdir: str, summary: Dict[str, Any]) -> str:
  """The commands a person runs next on this workdir."""
  lines = ['Next:']
  if summary['objective'] == 'classification':
    lines.append(f'  classify an image:  python -m vit_jax.predict '
                 f'--workdir={workdir} IMAGE.png')
  lines.append(f'  TensorBoard:        tensorboard --logdir={workdir}')
  lines.append(f'  export weights:     python -m vit_jax.interop.export '
               f'--workdir={workdir} --output=model.npz')
  if config.dataset == input_pipeline.EMBEDDED_MNIST:
    lines.append('  fine-tune at 42x42: the commands in '
                 'configs/embedded_pretrain.py')
  return '\n'.join(lines)


# ------------------------------------------------------------------- main


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> Dict[str, Any]:
  """Trains `config`'s model, evaluating and checkpointing into `workdir`.

  Resumes from the newest checkpoint in `<workdir>/checkpoints` if there is
  one. On SIGTERM it saves a checkpoint after the current step and returns.

  Args:
    config: experiment config (see configs/common.py for every field), or
      one in the original vit_jax's shape (vit_jax/configs/common.py),
      translated by `original_configs.to_project_config`. With
      `trainer='inference_time'` it times inference instead
      (`vit_jax.inference_time`) and returns its numbers.
    workdir: output folder: checkpoints/, TensorBoard events, summary.json.

  Returns:
    The summary (also written to `<workdir>/summary.json` by process 0 when
    the run finished): accuracy, steps, times, images/s, config.

  Raises:
    NonFiniteLossError: the loss became NaN/inf; the last good checkpoint is
      kept and nothing later is saved.
  """
  if original_configs.trainer(config) == 'inference_time':
    return inference_time.inference_time(config, workdir)
  config = original_configs.to_project_config(config)
  with contextlib.ExitStack() as cleanup:
    return _train_and_evaluate(config, workdir, cleanup)


def _train_and_evaluate(config, workdir, cleanup: contextlib.ExitStack):
  """`train_and_evaluate`; `cleanup` closes what it opens, also on errors."""
  t_start = time.time()
  device_count = jax.local_device_count()
  validation.check_config(config, device_count=device_count,
                          process_count=jax.process_count())
  validation.check_data_and_paths(config)
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

  # What the class indices mean and how the data was split.
  if jax.process_index() == 0:
    report = dataset_report.write_dataset_report(config, workdir)
    print(report['table'], flush=True)

  # Input pipeline: the batches of steps start_step + 1, start_step + 2, ...
  ds_train, ds_test = input_pipeline.get_datasets(
      config, start_step=min(start_step, total_steps))

  # Model, optimizer and train state.
  model = create_model(config, num_classes)
  tx, lr_fn = optim.make_optimizer(config)
  state, mask = _init_or_restore(config, model, tx, ckpts, start_step)
  num_params = trainable.count(state['params'])
  num_trainable = trainable.count(trainable.partition(state['params'], mask)[0])
  logging.info('Model %s: %s parameters (%s trainable), %d classes, %d local '
               'devices, %d processes, %s.', config.get('model_name'),
               f'{num_params:,}', f'{num_trainable:,}', num_classes,
               device_count, jax.process_count(),
               config.get('parallelism') or 'pmap')
  if mask is not None and jax.process_index() == 0:
    print(trainable.describe(state['params'], mask), flush=True)

  # Train step and evaluation.
  runner = make_runner(config, model, tx, mask, state['params'])
  params, opt_state = runner.place(state['params'], state['opt_state'])
  del state
  fewshot_every, fewshot_eval = _fewshot(config, model)
  is_mpp = (config.get('objective') or 'classification') == 'mpp'
  step_keys = _StepKeys(config.seed)
  lr_jit = jax.jit(lr_fn)
  compiles = progress.CompileCounter()
  out = progress.Progress(workdir, total_steps=total_steps, batch=config.batch,
                          start_step=min(start_step, total_steps))
  cleanup.callback(out.close)
  losses = _LossWatch(ckpts, runner.scalar)
  eval_history, fewshot_history, accuracy, last_loss = [], [], None, None
  step, interrupted = start_step, False

  def evaluated():  # the weights evaluated: their average if config.ema_decay
    return weight_ema.averaged_params(params, opt_state, mask)

  t_train = time.time()
  train_iter = runner.batches(ds_train)
  with train_checkpoint.SigtermFlag() as sigterm:
    for step in range(start_step + 1, total_steps + 1):
      batch = next(train_iter)
      if is_mpp:  # example indices: each micro-batch corrupts differently
        batch = dict(batch, label=objectives.mpp_labels(
            batch['image'].shape[:-3]))
      key = step_keys(step)
      with compiles:
        params, opt_state, loss = runner.step(params, opt_state, batch, key)
      losses.add(step, loss)
      out.step_done()
      if step == start_step + 1:
        jax.block_until_ready(loss)
        out.first_step_done(step)

      is_last = step == total_steps
      if step % config.log_every == 0 or is_last:
        losses.check()
        last_loss = runner.scalar(loss)
        # optax counts updates from 0: step s used lr_fn(s - 1).
        out.log_train(step, last_loss, float(lr_jit(step - 1)))

      with out.paused():
        if step % config.checkpoint_every == 0 or is_last or sigterm.received:
          losses.check()
          ckpts.save(step, runner.to_host(
              {'params': params, 'opt_state': opt_state}))
        if sigterm.received and not is_last:
          interrupted = True
          break
        if step % config.eval_every == 0 or is_last:
          accuracy = evaluate(runner, evaluated(), ds_test)
          eval_history.append([step, accuracy])
          out.log_eval(step, accuracy)
        if fewshot_every and (step % fewshot_every == 0 or is_last):
          results = fewshot_eval(runner.eval_params(evaluated()))
          fewshot_history.append([step, results])
          out.log_scalars(step, results)
  train_time = time.time() - t_train
  if start_step >= total_steps:  # finished before: report, do not train
    accuracy = evaluate(runner, evaluated(), ds_test)

  summary = {
      'accuracy': accuracy,
      'eval_history': eval_history,
      'fewshot_history': fewshot_history,
      'objective': config.get('objective') or 'classification',
      'num_trainable_params': int(num_trainable),
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
  if interrupted:
    logging.warning('Stopped by SIGTERM after step %d; checkpoint saved.', step)
    out.print(f'Interrupted after step {step}; checkpoint saved in '
              f'{ckpts.directory}. Run the same command to resume.')
    return summary
  if not is_mpp:  # all processes take part; process 0 writes
    summary['confusion'] = confusion_matrix(runner, evaluated(),
                                            ds_test).tolist()
  out.close()
  if out.is_chief:  # summary.json marks a finished run
    _finish_run(config, workdir, summary)
  return summary

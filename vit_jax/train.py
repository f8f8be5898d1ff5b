"""Data-parallel training and evaluation (paper Sec. 4 / Appendix B).

Config -> input pipeline -> model -> train step -> checkpoint -> evaluation,
on one CPU, the devices of a host, or several hosts
(`python -m vit_jax.main`). A run is a pure function of its config: step
`s`'s batch and dropout key depend only on `s`, so a resumed run ends with
the parameters of an uninterrupted one.
"""

import contextlib
import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Dict

from absl import logging
import flax
import flax.jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vit_jax import checkpoint
from vit_jax import inference_time
from vit_jax import input_pipeline
from vit_jax import models
from vit_jax import models_mpp
from vit_jax.checkpoints import resume
from vit_jax.checkpoints import train_checkpoint
from vit_jax.configs import choices
from vit_jax.data import dataset_checks
from vit_jax.evaluation import fewshot
from vit_jax.guards import memory_fit
from vit_jax.guards import stop_signals
from vit_jax.parallel import runners
from vit_jax.parallel import sharding
from vit_jax.reporting import dataset_report
from vit_jax.reporting import progress
from vit_jax.reporting import run_end
from vit_jax.run_config import original_configs
from vit_jax.run_config import validation
from vit_jax.training import objectives
from vit_jax.training import optim
from vit_jax.training import pmap_step
from vit_jax.training import step_guards
from vit_jax.training import trainable
from vit_jax.training import weight_ema


def make_update_fn(*,
                   apply_fn: Callable[..., Any],
                   accum_steps: int,
                   tx: optax.GradientTransformation,
                   trainable_mask: Any = None) -> Callable[..., Any]:
  """The pmapped softmax cross-entropy step `update_fn(params, opt_state,
  batch, rng) -> (params, opt_state, loss, new_rng)`.

  Each has a leading axis of local devices; `batch` holds 'image' and
  one-hot 'label'; params and opt_state are donated. With `trainable_mask`
  only its True leaves train and `opt_state` covers them alone.
  """
  return pmap_step.make_update_fn(
      loss_fn=objectives.classification_loss_fn(apply_fn),
      accum_steps=accum_steps,
      tx=tx,
      trainable_mask=trainable_mask,
      axis_name=runners.AXIS)


# ------------------------------------------------------------------ model


def create_model(config: ml_collections.ConfigDict,
                 num_classes: int) -> models.VisionTransformer:
  """The model of `config.model` (ViT, Mixer or BiT ResNet); with objective
  'mpp' a `models_mpp.MaskedPatchPredictor` (`config.mpp`'s fields, no head)."""
  if config.get('model') is None:
    raise ValueError('config.model is not set; copy one from '
                     'vit_jax.configs.models.MODEL_CONFIGS (see configs/).')
  if config.objective == 'mpp':
    fields = {k: v for k, v in config.model.items() if k != 'num_classes'}
    return models_mpp.MaskedPatchPredictor(
        num_classes=None, **fields, **(config.get('mpp') or {}))
  return models.model_class(config.model)(
      num_classes=num_classes, **config.model)


def init_params(model,
                config: ml_collections.ConfigDict,
                *,
                load_pretrained: bool = True) -> Dict[str, Any]:
  """Parameters seeded by config.seed (equal on every process), adapted
  from the pre-trained checkpoint if `load_pretrained` and it names one."""
  height, width = input_pipeline.get_image_size(config)
  seed = config.seed

  @jax.jit
  def init():
    key = jax.random.PRNGKey(seed)
    # 'mpp': the corruption of masked patch prediction (unused otherwise).
    return model.init({
        'params': key,
        'mpp': jax.random.fold_in(key, 1)
    },
                      jnp.zeros([1, height, width, 3]),
                      train=False)

  params = flax.core.unfreeze(init()['params'])
  path = validation.pretrained_path(config) if load_pretrained else None
  if path:
    logging.info('Fine-tuning from %s', path)
    params = checkpoint.load_pretrained(
        pretrained_path=path,
        init_params=params,
        model_config=config.model,
        image_size=(height, width))
  return jax.tree_util.tree_map(np.asarray, params)


# ----------------------------------------------------------- loop helpers


def _fresh_state(config, model, tx, *, load_pretrained: bool):
  """(train state {'params', 'opt_state'} as numpy, trainable mask) of a
  fresh run."""
  params = init_params(model, config, load_pretrained=load_pretrained)
  mask = None
  if choices.trainable_pattern(config.get('trainable')) is not None:
    mask = trainable.trainable_mask(params, config.trainable)
  train_part = trainable.partition(params, mask)[0]
  return {
      'params': params,
      'opt_state': jax.device_get(jax.jit(tx.init)(train_part))
  }, mask


def _init_or_restore(config, model, tx, ckpts):
  """(train state, trainable mask, step, runner): a fresh state at step 0,
  or the newest readable checkpoint in the runner's layout."""
  steps = ckpts.all_steps()
  state, mask = _fresh_state(config, model, tx, load_pretrained=not steps)
  runner = make_runner(config, model, tx, mask, state['params'])
  restored, step = resume.restore_newest(ckpts, runner.restore_template(state))
  if restored is not None:
    return restored, mask, step, runner
  if steps:  # none was readable, all moved aside: start afresh
    state = _fresh_state(config, model, tx, load_pretrained=True)[0]
  return state, mask, 0, runner


def make_runner(config, model, tx, mask, params):
  """The PmapRunner or sharding.FsdpRunner of `config.parallelism`."""
  is_mpp = config.objective == 'mpp'
  loss_fn = objectives.make_loss_fn(model, config)
  kwargs = dict(
      counts_fn=objectives.make_counts_fn(model, config),
      confusion_fn=None if is_mpp else objectives.top1_confusion(
          model.apply, model.num_classes))
  accum_steps = config.accum_steps
  if config.parallelism == 'fsdp':
    return sharding.FsdpRunner(
        params=params,
        loss_fn=loss_fn,
        tx=tx,
        accum_steps=accum_steps,
        trainable_mask=mask,
        min_shard_size=config.fsdp_min_shard_size,
        mesh_sizes=config.mesh,
        **kwargs)
  update_fn = pmap_step.make_update_fn(
      loss_fn=loss_fn,
      accum_steps=accum_steps,
      tx=tx,
      trainable_mask=mask,
      axis_name=runners.AXIS)
  return runners.PmapRunner(
      update_fn=update_fn, n_prefetch=config.prefetch, **kwargs)


def _fewshot(config):
  """(every_steps, evaluator) of config.fewshot; every_steps 0 is off."""
  every = int((config.get('fewshot') or {}).get('every_steps') or 0)
  if not every:
    return 0, None
  return every, fewshot.make_fewshot_evaluator(config)


# ------------------------------------------------------------------- main


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> Dict[str, Any]:
  """Trains `config`'s model, evaluating and checkpointing into `workdir`.

  Resumes from `workdir`'s newest checkpoint; on SIGTERM or Ctrl-C saves one
  after the current step and returns (`summary['stopped_by']`).

  Args:
    config: vit_jax/configs/schema.py's fields, or the original vit_jax's
      (`original_configs.to_project_config`); `trainer='inference_time'`
      times inference instead.

  Returns:
    The summary: accuracy, steps, times, images/s, config (also
    `<workdir>/summary.json` once the run finished).

  Raises:
    step_guards.NonFiniteLossError: the loss became NaN/inf; later steps are
      not saved.
  """
  if original_configs.trainer(config) == 'inference_time':
    return inference_time.inference_time(config, workdir)
  config = original_configs.to_project_config(config)
  with contextlib.ExitStack() as cleanup:
    return _train_and_evaluate(config, workdir, cleanup)


@dataclasses.dataclass
class _Run:
  """A run set up to train: its data, model, step and state on the devices."""
  config: ml_collections.ConfigDict
  ckpts: train_checkpoint.TrainCheckpoints
  start_step: int
  ds_train: Any
  ds_test: Any
  model: Any
  lr_fn: optim.LrFn
  mask: Any
  runner: Any
  params: Any
  opt_state: Any
  num_params: int
  num_trainable: int

  def evaluated(self):
    """The weights evaluated: their average if config.ema_decay is set."""
    return weight_ema.averaged_params(self.params, self.opt_state, self.mask)


def _close_checkpoints(ckpts, exc_type, exc, tb) -> None:
  """Closes `ckpts`, unless an error ends a multi-process run: a lost peer
  would hold the pending write at orbax's commit barrier; the next start
  removes the unfinished step."""
  del exc, tb
  if exc_type is None or jax.process_count() == 1:
    ckpts.close()


def _set_up(config, workdir, cleanup: contextlib.ExitStack) -> _Run:
  """Checks the config; builds checkpoints, data, model, optimizer, runner
  and the fresh or restored train state on the devices."""
  device_count = jax.local_device_count()
  validation.check_config(
      config, device_count=device_count, process_count=jax.process_count())
  validation.check_data_and_paths(config)
  # A missing dataset fails here, before the checkpoint manager starts its
  # background threads (which would otherwise outlive a quick exit).
  num_classes = input_pipeline.get_dataset_info(
      config.dataset, config.train_split,
      data_dir=config.get('tfds_data_dir'))['num_classes']
  dataset_checks.check(config)
  os.makedirs(workdir, exist_ok=True)
  ckpts = train_checkpoint.TrainCheckpoints(workdir)
  cleanup.push(functools.partial(_close_checkpoints, ckpts))
  if jax.process_index() == 0:  # what the classes are and how data was split
    print(
        dataset_report.write_dataset_report(config, workdir)['table'],
        flush=True)
  model = create_model(config, num_classes)
  tx, lr_fn = optim.make_optimizer(config)
  state, mask, start_step, runner = _init_or_restore(config, model, tx, ckpts)
  if start_step:
    logging.info('Resuming from %s at step %d', ckpts.directory, start_step)
  # The batches of steps start_step + 1, start_step + 2, ...
  ds_train, ds_test = input_pipeline.get_datasets(
      config, start_step=min(start_step, config.total_steps))
  num_params = trainable.count(state['params'])
  num_trainable = trainable.count(trainable.partition(state['params'], mask)[0])
  logging.info(
      'Model %s: %s parameters (%s trainable), %d classes, %d local '
      'devices, %d processes, %s.', config.get('model_name'),
      f'{num_params:,}', f'{num_trainable:,}', num_classes, device_count,
      jax.process_count(), config.parallelism)
  if mask is not None and jax.process_index() == 0:
    print(trainable.describe(state['params'], mask), flush=True)
  memory_fit.check_batch_fits(config, num_params)
  ckpts.check_room(state, start_step, config)
  params, opt_state = runner.place(state['params'], state['opt_state'])
  return _Run(config, ckpts, start_step, ds_train, ds_test, model, lr_fn, mask,
              runner, params, opt_state, num_params, num_trainable)


def _train_loop(run: _Run, out: progress.Progress) -> Dict[str, Any]:
  """Trains steps start_step + 1 .. total_steps (or until a stop signal),
  logging, checkpointing and evaluating on schedule; returns the results."""
  config, runner = run.config, run.runner
  fewshot_every, fewshot_eval = _fewshot(config)
  is_mpp = config.objective == 'mpp'
  step_keys = step_guards.StepKeys(config.seed)
  lr_jit = jax.jit(run.lr_fn)
  compiles = progress.CompileCounter()
  losses = step_guards.LossWatch(run.ckpts, runner.scalar)
  res = dict(
      eval_history=[],
      fewshot_history=[],
      accuracy=None,
      final_train_loss=None,
      step=run.start_step,
      interrupted=False,
      input_wait_s=0.,
      stopped_by=None)
  t_train = time.time()
  train_iter = runner.batches(run.ds_train)
  with stop_signals.StopSignals(run.ckpts.directory) as stop:
    for step in range(run.start_step + 1, config.total_steps + 1):
      res['step'] = step
      t_wait = time.time()
      batch = next(train_iter)
      res['input_wait_s'] += time.time() - t_wait
      if is_mpp:  # example indices: each micro-batch corrupts differently
        batch = dict(
            batch, label=objectives.mpp_labels(batch['image'].shape[:-3]))
      key = step_keys(step)  # outside `compiles`: its first call compiles
      with compiles:
        run.params, run.opt_state, loss = runner.step(run.params, run.opt_state,
                                                      batch, key)
      losses.add(step, loss)
      run.ckpts.check_save()  # a save that failed stops the run at once
      out.step_done()
      if step == run.start_step + 1:
        jax.block_until_ready(loss)
        out.first_step_done(step)
      is_last = step == config.total_steps
      if step % config.log_every == 0 or is_last:
        losses.check()
        res['final_train_loss'] = runner.scalar(loss)
        # optax counts updates from 0: step s used lr_fn(s - 1).
        out.log_train(step, res['final_train_loss'], float(lr_jit(step - 1)))
      with out.paused():
        if step % config.checkpoint_every == 0 or is_last or stop.received:
          losses.check()
          stop.saving = step if stop.received or is_last else None
          run.ckpts.save(step, {
              'params': run.params,
              'opt_state': run.opt_state
          }, runner.saved_state)
        if stop.received and not is_last:
          res['interrupted'], res['stopped_by'] = True, stop.name
          break
        if step % config.eval_every == 0 or is_last:
          res['accuracy'] = _evaluate(run, res, final=is_last)
          res['eval_history'].append([step, res['accuracy']])
          out.log_eval(step, res['accuracy'])
        if fewshot_every and (step % fewshot_every == 0 or is_last):
          results = fewshot_eval(runner.eval_params(run.evaluated()))
          res['fewshot_history'].append([step, results])
          out.log_scalars(step, results)
    run.ckpts.wait_until_finished()  # the last save on disk before reporting
  res['train_time_s'] = time.time() - t_train
  res['train_step_compilations'] = compiles.count
  return res


def _evaluate(run: _Run, res: Dict[str, Any], *, final: bool) -> float:
  """Test accuracy of the evaluated weights (all processes take part).

  The final evaluation of a classifier is one pass for the accuracy and the
  confusion matrix (`res['confusion']`): the pipeline's labels are one-hot, so
  the matrix's trace counts the top-1 hits.
  """
  params = run.evaluated()
  if final and run.config.objective != 'mpp':
    matrix = runners.confusion_matrix(run.runner, params, run.ds_test)
    accuracy = runners.confusion_accuracy(matrix)
    res['confusion'] = matrix.tolist()
    return accuracy
  return runners.evaluate(run.runner, params, run.ds_test)


def _train_and_evaluate(config, workdir, cleanup: contextlib.ExitStack):
  """`train_and_evaluate`; `cleanup` closes what it opens, also on errors."""
  t_start = time.time()
  run = _set_up(config, workdir, cleanup)
  total_steps = config.total_steps
  out = progress.Progress(
      workdir,
      total_steps=total_steps,
      batch=config.batch,
      start_step=min(run.start_step, total_steps))
  cleanup.callback(out.close)
  res = _train_loop(run, out)
  if run.start_step >= total_steps:  # finished before: report, do not train
    res['accuracy'] = _evaluate(run, res, final=True)
  confusion = res.pop('confusion', None)
  summary = dict(
      res,
      objective=config.objective,
      num_trainable_params=int(run.num_trainable),
      total_steps=total_steps,
      start_step=run.start_step,
      total_time_s=time.time() - t_start,
      images_per_s=out.images_per_s,
      num_params=int(run.num_params),
      devices=jax.device_count(),
      processes=jax.process_count(),
      checkpoint_dir=run.ckpts.directory,
      config=json.loads(config.to_json_best_effort()))
  if res['interrupted']:
    out.print(f'Interrupted by {res["stopped_by"]} after step {res["step"]}; '
              f'checkpoint {res["step"]} saved in {run.ckpts.directory}.')
    return summary
  if confusion is not None:
    summary['confusion'] = confusion
  out.close()
  if out.is_chief:  # summary.json marks a finished run
    run_end.finish_run(config, workdir, summary)
  return summary

"""A trained model loaded for inference: a zoo model or a training run.

`load_model` builds the zoo model that fits a checkpoint;
`load_model_from_workdir` and `load_model_from_config_file` rebuild a
training run's model, image size and class names. They back
`python -m vit_jax.predict --model / --workdir / --config`.
"""

import dataclasses
import importlib.util
import json
import math
import os
import re
from typing import Any, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import checkpoint
from vit_jax import models
from vit_jax.checkpoints import npz
from vit_jax.checkpoints import trees
from vit_jax.evaluation import label_names

Params = Any


class TrainedModel(NamedTuple):
  """A training run's model, parameters, image size (height, width), class
  names (or None) and config, ready for `predict.classify`."""
  model: Any
  params: Params
  image_size: Tuple[int, int]
  class_names: Optional[List[str]]
  config: ml_collections.ConfigDict


# Fields of the training config that only shape the training computation:
# an exported `.npz` always holds per-layer blocks (checkpoint.save), and
# inference needs no rematerialisation.
_INFERENCE_OVERRIDES = {'scan': False, 'remat_policy': 'none'}
_DTYPE_NAMES = ('bfloat16', 'float16', 'float32', 'float64')


def _parse_dtype(value):
  """A dtype, or its text in summary.json ("<class 'jax.numpy.bfloat16'>")."""
  if not isinstance(value, str):
    return value
  match = re.search('|'.join(_DTYPE_NAMES), value)
  if match is None:
    raise ValueError(f'config.model.dtype={value!r} is not a dtype; expected '
                     f'one of {_DTYPE_NAMES}.')
  return getattr(jnp, match.group(0))  # what configs write: jnp.bfloat16


def model_from_config(model_config,
                      *,
                      num_classes: Optional[int],
                      representation_size: Optional[int] = None):
  """The VisionTransformer of a training config's `config.model`.

  `model_config` is a ConfigDict or the dict in `summary.json`; head sizes
  come from the checkpoint. Built for inference (`_INFERENCE_OVERRIDES`);
  'cudnn' attention becomes 'xla' off GPUs. Raises ValueError for unknown
  fields.
  """
  if model_config is None:
    raise ValueError('The config has no config.model (the VisionTransformer '
                     'fields); it cannot describe a trained model.')
  fields = (
      model_config.to_dict()
      if hasattr(model_config, 'to_dict') else dict(model_config))
  known = {f.name for f in dataclasses.fields(models.VisionTransformer)
          } - {'parent', 'name'}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f'config.model has fields {unknown} that '
                     'VisionTransformer does not know; known fields: '
                     f'{sorted(known)}.')
  if 'dtype' in fields:
    fields['dtype'] = _parse_dtype(fields['dtype'])
  fields.update(_INFERENCE_OVERRIDES)
  if fields.get('attention_impl') == 'cudnn' and jax.default_backend() != 'gpu':
    fields['attention_impl'] = 'xla'
  fields.update(
      num_classes=num_classes, representation_size=representation_size)
  return models.from_config(fields)


def load_model_from_config(
    model_config,
    checkpoint_path: str,
    *,
    num_classes: Optional[int] = None,
    params: Optional[Params] = None) -> Tuple[Any, Params]:
  """Loads a checkpoint into the model of a training config; (model, params).

  `params`, if given, are used instead of reading `checkpoint_path` (then only
  named in messages). `num_classes`, if given, must match the head.
  """
  if params is None:
    params = checkpoint.load(checkpoint_path)
  head_classes, representation_size = head_sizes(params, checkpoint_path,
                                                 num_classes)
  model = model_from_config(
      model_config,
      num_classes=head_classes,
      representation_size=representation_size)
  return model, params


def workdir_params(workdir: str) -> Tuple[Params, str]:
  """(parameters, description) of the newest train-state checkpoint.

  Scanned encoder blocks come back per layer, as an exported `.npz` has them.
  """
  from vit_jax.checkpoints import train_checkpoint  # pylint: disable=g-import-not-at-top
  ckpts = train_checkpoint.TrainCheckpoints(workdir)
  try:
    step = ckpts.latest_step()
    params = npz.canonicalize(ckpts.restore_params(step))
  finally:
    ckpts.close()
  return params, f'step {step} of {ckpts.directory}'


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of a finished training run, from `<workdir>/summary.json`."""
  from vit_jax.reporting import run_report  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    raise ValueError(f'Workdir {workdir!r} does not exist (or is not a '
                     'folder).')
  path = os.path.join(workdir, run_report.SUMMARY_FILE)
  if not os.path.isfile(path):
    raise ValueError(
        f'Workdir {workdir!r} has no {run_report.SUMMARY_FILE}: it is '
        'written when a training run (python -m vit_jax.main --workdir=...) '
        'finishes. Finish the run (the same command resumes it), or pass its '
        'config file with --config instead of --workdir.')
  try:
    with open(path) as f:
      summary = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'Cannot read {path}: {e}.') from e
  config = summary.get('config') if isinstance(summary, dict) else None
  if not isinstance(config, dict):
    raise ValueError(f'{path} holds no training config (no "config" '
                     'object); was it written by vit_jax.train?')
  return ml_collections.ConfigDict(config)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Runs `get_config()` of `FILE.py` or `FILE.py:ARG`, as `vit_jax.main`
  does."""
  path, _, arg = spec.partition(':')
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise ValueError(f'Config file {spec!r}: no such file ({path}).')
  name = '_vit_predict_config_' + re.sub(r'\W', '_', path)
  try:
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'Config file {spec!r} failed to load: '
                     f'{type(e).__name__}: {e}') from e
  return config


def _image_size_of(config) -> Tuple[int, int]:
  # As input_pipeline.get_image_size (without importing tf.data machinery).
  return as_hw((config.get('pp') or {}).get('crop', 224))


def _dataset_class_names(config, num_classes: int) -> Optional[List[str]]:
  """Class names of the config's dataset, or None when it cannot be read."""
  dataset = config.get('dataset')
  if not dataset:
    return None
  try:
    return label_names.load_labels(
        dataset, num_classes, data_dir=config.get('tfds_data_dir'))
  except ValueError:
    return None


def _load_trained(config,
                  checkpoint_path: str,
                  source: str,
                  class_names_file: Optional[str],
                  num_classes: Optional[int],
                  params=None) -> TrainedModel:
  """A `TrainedModel` of `config` with the checkpoint's parameters."""
  if config.get('model') is None:
    raise ValueError(f'{source} has no config.model (the VisionTransformer '
                     'fields), so it cannot describe a trained model.')
  model, params = load_model_from_config(
      config.model, checkpoint_path, num_classes=num_classes, params=params)
  if not model.num_classes:
    raise ValueError(f'{checkpoint_path} has no head, so it cannot '
                     'classify; fine-tune it first.')
  image_size = _image_size_of(config)
  check_params_fit(
      model,
      params,
      image_size,
      fix=f'{checkpoint_path} does not hold a model of {source}: pass the '
      'checkpoint that run exported (python -m vit_jax.checkpoints.export '
      '--workdir=W '
      '--output=FILE.npz).')
  if class_names_file and os.path.isfile(class_names_file):
    names = label_names.load_labels(class_names_file, model.num_classes)
  else:
    names = _dataset_class_names(config, model.num_classes)
  return TrainedModel(model, params, image_size, names, config)


def load_model_from_workdir(workdir: str,
                            checkpoint_path: Optional[str] = None,
                            *,
                            num_classes: Optional[int] = None) -> TrainedModel:
  """A model trained by `vit_jax.train` in `workdir`, as a `TrainedModel`.

  The model and image size come from `summary.json`, class names from
  `class_names.json` or the config's dataset. `checkpoint_path` is an
  exported `.npz`; None takes the newest train-state checkpoint.

  Raises:
    ValueError: no workdir or summary.json, or a checkpoint that does not fit.
    checkpoint.CheckpointError: an unreadable checkpoint.
  """
  config = read_run_config(workdir)
  params = None
  if checkpoint_path is None:
    params, checkpoint_path = workdir_params(workdir)
  return _load_trained(config, checkpoint_path, f'the run in {workdir}',
                       os.path.join(workdir, label_names.CLASS_NAMES_FILE),
                       num_classes, params)


def load_model_from_config_file(
    config_file: str,
    checkpoint_path: str,
    *,
    num_classes: Optional[int] = None) -> TrainedModel:
  """As `load_model_from_workdir`, from the run's `FILE.py[:ARG]` instead.

  Class names come from `class_names.json` next to the checkpoint, else the
  config's dataset.
  """
  config = load_config_file(config_file)
  return _load_trained(
      config, checkpoint_path, f'config {config_file}',
      os.path.join(
          os.path.dirname(os.path.abspath(checkpoint_path)),
          label_names.CLASS_NAMES_FILE), num_classes)


# ----------------------------------------------------------- zoo models


def as_hw(image_size) -> Tuple[int, int]:
  """An image size (side, or (height, width)) as (height, width)."""
  if isinstance(image_size, (int, np.integer)):
    return int(image_size), int(image_size)
  height, width = image_size
  return int(height), int(width)


def image_size_from_params(model, params: Params) -> Optional[int]:
  """The image size a learned position embedding was trained for, or None
  when there is none or its grid is not square."""
  pe = (
      params.get('Transformer', {}).get('posembed_input',
                                        {}).get('pos_embedding'))
  if pe is None:
    return None
  n = pe.shape[1] - int(model.has_class_token)
  g = math.isqrt(max(n, 0))
  if g * g != n or model.stride[0] != model.stride[1]:
    return None
  return g * model.stride[0]


def head_is_zero(params: Params) -> bool:
  """True if the checkpoint has a head whose kernel and bias are all zeros."""
  head = params.get('head')
  if not head:
    return False
  return all(not np.any(np.asarray(v)) for v in head.values())


def check_params_fit(model,
                     params: Params,
                     image_size,
                     fix: Optional[str] = None):
  """Raises ValueError listing parameters whose shapes do not fit `model`.

  `fix` ends the message (default: advice to pass the right --model).
  """
  height, width = as_hw(image_size)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros(
          (1, height, width, 3)), train=False))['params']
  expected = trees.flatten_tree(shapes)
  got = trees.flatten_tree(params)
  missing = sorted(set(expected) - set(got))
  wrong = [
      f'{k}: checkpoint {tuple(got[k].shape)} vs model '
      f'{tuple(expected[k].shape)}'
      for k in sorted(set(expected) & set(got))
      if tuple(got[k].shape) != tuple(expected[k].shape) and
      not k.endswith('pos_embedding')
  ]  # checked by the model itself
  if missing or wrong:
    name = model.model_name or 'the model'
    lines = ([f'  missing in checkpoint: {k}' for k in missing[:8]] +
             [f'  shape mismatch {w}' for w in wrong[:8]])
    raise ValueError(
        f'The checkpoint does not fit {name}:\n' + '\n'.join(lines) + '\n' +
        (fix or 'Pass the --model the checkpoint was trained with (e.g. the '
         'stem of an official file name: ViT-B_16.npz -> ViT-B_16).'))


def load_model(model_name: str,
               checkpoint_path: str,
               *,
               num_classes: Optional[int] = None,
               **kw) -> Tuple[Any, Params]:
  """Loads an `.npz` checkpoint and builds the zoo model that fits it.

  Head and `pre_logits` sizes come from the checkpoint (`num_classes`, if
  given, must match); `**kw` are further `VisionTransformer` fields. Returns
  (model, params).
  """
  params = checkpoint.load(checkpoint_path)
  head_classes, representation_size = head_sizes(params, checkpoint_path,
                                                 num_classes)
  kw.setdefault('representation_size', representation_size)
  model = models.get_model(model_name, num_classes=head_classes, **kw)
  return model, params


def head_sizes(
    params: Params, checkpoint_path: str,
    num_classes: Optional[int]) -> Tuple[Optional[int], Optional[int]]:
  """(head classes, pre_logits size) of a checkpoint; None where it has none."""
  head = params.get('head', {}).get('kernel')
  head_classes = None if head is None else int(head.shape[-1])
  if num_classes is not None and head_classes != num_classes:
    raise ValueError(
        f'--num-classes={num_classes}, but the checkpoint {checkpoint_path} ' +
        (f'has a {head_classes}-way head.' if head_classes else 'has no head.'
        ) + ' Drop --num-classes or use a matching checkpoint.')
  rep = params.get('pre_logits', {}).get('kernel')
  return head_classes, None if rep is None else int(rep.shape[-1])

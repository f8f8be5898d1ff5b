"""The original `vit_jax`'s config shape, translated to this project's.

A config without `train_split` is the original's: `to_project_config`
copies its fields onto this project's base config and resolves the
checkpoint as the original did (`model_or_filename`: an AugReg file stem or
the best ImageNet-21k pre-training in `index.csv`; else
`{pretrained_dir}/{model.model_name}.npz`).
"""

from typing import Any, Iterator, Tuple

from absl import logging
import ml_collections

from vit_jax.data import filesystem
from vit_jax.run_config import errors

# The original's names -> this project's, where they differ.
RENAMED = {
    'progress_every': 'log_every',
    'pp.train': 'train_split',
    'pp.test': 'test_split',
}
# The original's fields that are resolved here rather than copied. pp.resize
# is accepted and unused: this project's pipeline resizes straight to crop.
_RESOLVED = ('model', 'model_type', 'model_or_filename', 'pretrained_dir',
             'trainer', 'pp.resize')
# Must be set (not None or '') in the original's shape.
_REQUIRED = ('dataset', 'total_steps', 'model', 'pp.train', 'pp.test',
             'pp.crop')
# Not needed for an image folder: the original reads <dataset>/train and
# <dataset>/test, this project's default splits.
_FOLDER_SPLITS = ('pp.train', 'pp.test')
TRAINERS = ('train', 'inference_time')

# Where the released checkpoints live.
RELEASED = {
    'ViT': 'gs://vit_models/imagenet21k',
    'Mixer': 'gs://mixer_models/imagenet21k',
    'AugReg': 'gs://vit_models/augreg',
}


def trainer(config: ml_collections.ConfigDict) -> str:
  """`config.trainer`, else the original's `config.train`, else 'train'."""
  name = config.get('trainer') or ('inference_time' if config.get('train')
                                   == 'inference_time' else 'train')
  if name not in TRAINERS:
    raise errors.ConfigError(
        f'Unknown config.trainer {name!r}; use one of {", ".join(TRAINERS)}.')
  return name


def _fields(config, prefix='') -> Iterator[Tuple[str, Any]]:
  """(dotted name, value) of every field; `model` and `pp` one level deep."""
  for key, value in config.items():
    name = prefix + key
    if isinstance(value, (dict, ml_collections.ConfigDict)) and name != 'model':
      yield from _fields(value, name + '.')
    else:
      yield name, value


def _get(config, name: str):
  node = config
  for part in name.split('.'):
    if not isinstance(node, (dict, ml_collections.ConfigDict)):
      return None
    node = node.get(part)
  return node


def _has(config, name: str) -> bool:
  *parents, leaf = name.split('.')
  node = _get(config, '.'.join(parents)) if parents else config
  return isinstance(node, ml_collections.ConfigDict) and leaf in node


def _set(config, name: str, value) -> None:
  *parents, leaf = name.split('.')
  node = _get(config, '.'.join(parents)) if parents else config
  node[leaf] = value


def _is_folder(config) -> bool:
  """Whether `config.dataset` names an image folder, as the pipeline decides."""
  # Imported here: it loads TensorFlow, which only this case needs.
  from vit_jax.data import image_folders  # pylint: disable=g-import-not-at-top
  return image_folders.is_folder(config.get('dataset') or '')


def to_project_config(
    config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` in this project's shape (itself if it already is).

  Raises:
    errors.ConfigError: a field of neither shape, a required one unset,
      or no pre-trained checkpoint where the config says.
    FileNotFoundError: no AugReg index.csv in `pretrained_dir`.
  """
  if 'train_split' in config:
    return config
  from vit_jax.configs import schema  # pylint: disable=g-import-not-at-top
  project = schema.get_config()
  for name in _REQUIRED:
    if _get(config, name) in (None, '') and not (name in _FOLDER_SPLITS and
                                                 _is_folder(config)):
      theirs = RENAMED.get(name, name)
      raise errors.ConfigError(
          f'config.{name} is not set (the original vit_jax\'s field; this '
          f'project\'s configs call it config.{theirs}). Set it, e.g. '
          f'--config.{name}=...')
  for name, value in _fields(config):
    if name in _RESOLVED:
      continue
    target = RENAMED.get(name, name)
    if not _has(project, target):
      raise errors.ConfigError(
          f'config.{name} is a field of neither this project\'s configs '
          '(vit_jax/configs/schema.py) nor the original vit_jax\'s '
          '(vit_jax/configs/common.py).')
    if name.endswith('_every') and not value:  # the original's 0: never
      value = config.total_steps
    _set(project, target, value)
  project.model = config.model.copy_and_resolve_references()
  project.model_name = config.model.get('model_name')
  project.pretrained_path = pretrained_path(config)
  return project


def pretrained_path(config: ml_collections.ConfigDict) -> str:
  """The original's checkpoint of `config`; ConfigError if it is not there."""
  directory = config.get('pretrained_dir') or '.'
  model_or_filename = config.get('model_or_filename')
  if model_or_filename:
    released = RELEASED['AugReg']
    name = (
        model_or_filename if '-' in model_or_filename else best_augreg_filename(
            directory, model_or_filename))
  else:
    released = RELEASED['Mixer' if 'num_blocks' in config.model else 'ViT']
    name = config.model.get('model_name')
  path = filesystem.join(directory, f'{name}.npz')
  if not filesystem.exists(path):
    raise errors.ConfigError(
        f'Pre-trained checkpoint {path} does not exist. The released '
        f'{name}.npz is in {released}/: download it into '
        f'--config.pretrained_dir, or set --config.pretrained_dir={released} '
        'to read it from there.')
  return path


def best_augreg_filename(directory: str, model: str) -> str:
  """The `.npz` stem of AugReg `model`'s best ImageNet-21k `final_val`."""
  # Imported here: it loads JAX, which a config's checks before training
  # (vit_jax.main) must not.
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  index = checkpoint.get_augreg_df(directory=directory)
  stems = index.filename.str.split('-').str[0]
  rows = index[(stems == model) & (index.ds == 'i21k')]
  if rows.empty:
    raise errors.ConfigError(
        f'{filesystem.join(directory, "index.csv")} lists no ImageNet-21k '
        f'(ds == "i21k") checkpoint of {model!r}; it lists: '
        f'{", ".join(sorted(set(stems)))}.')
  best = rows.sort_values('final_val').iloc[-1]
  logging.info('AugReg: picked %s for %s (final_val %.4f).', best.filename,
               model, best.final_val)
  return best.filename

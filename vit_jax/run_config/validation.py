"""Checks of a run's inputs, before any data is read or a model is built.

Unknown keys, impossible values and unusable data options or paths each
raise one `ConfigError` paragraph: the field, what is wrong, what to do
(docs/troubleshooting.md).
"""

import os
import re
import tempfile
from typing import Iterable, List, Optional, Sequence

import ml_collections

from vit_jax.configs import choices
from vit_jax.data import filesystem
from vit_jax.data import tf_import
from vit_jax.run_config import errors
from vit_jax.run_config.errors import ConfigError

# Compute dtypes a model or optimizer state may be given by name.
DTYPES = ('float32', 'bfloat16', 'float16')
# config.parallelism: the original's pmap (`vit_jax.train`) or the FSDP-style
# sharded step of `vit_jax.parallel.sharding` on the data x fsdp mesh of
# config.mesh.
PARALLELISMS = ('pmap', 'fsdp')
# What users of other trainers type, and this config's name for it.
_SYNONYMS = {
    'learning_rate': 'base_lr',
    'lr': 'base_lr',
    'batch_size': 'batch',
    'global_batch_size': 'batch',
    'eval_batch_size': 'batch_eval',
    'steps': 'total_steps',
    'num_steps': 'total_steps',
    'train_steps': 'total_steps',
    'num_train_steps': 'total_steps',
    'epochs': 'total_steps',
    'num_epochs': 'total_steps',
    'wd': 'weight_decay',
    'warmup': 'warmup_steps',
    'image_size': 'pp.crop',
    'resolution': 'pp.crop',
    'model': 'model_name',
    'arch': 'model_name',
}

# ------------------------------------------------------------ unknown keys


def config_keys(config, prefix: str = '') -> List[str]:
  """Every dotted key of `config`: leaves and nested blocks."""
  keys = []
  for name, value in config.items():
    key = f'{prefix}{name}'
    keys.append(key)
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      keys.extend(config_keys(value, f'{key}.'))
  return keys


def _missing_part(config, key: str) -> Optional[str]:
  """The first dotted prefix of `key` that `config` lacks, else None."""
  node = config
  parts = key.split('.')
  for i, part in enumerate(parts):
    if not isinstance(node,
                      (ml_collections.ConfigDict, dict)) or (part not in node):
      return '.'.join(parts[:i + 1])
    node = node[part]
  return None


def _suggestions(key: str, keys: Sequence[str]) -> List[str]:
  """Existing keys a user may have meant by `key`."""
  leaf = key.rsplit('.', 1)[-1]
  found = [_SYNONYMS[leaf]] if _SYNONYMS.get(leaf) in keys else []
  found += errors.closest(key, keys, cutoff=0.5)
  by_leaf = {k.rsplit('.', 1)[-1]: k for k in keys}
  found += [by_leaf[m] for m in errors.closest(leaf, by_leaf, cutoff=0.75)]
  return list(dict.fromkeys(found))[:errors.MAX_SUGGESTIONS]


def check_override_keys(config, keys: Iterable[str], config_file: str):
  """Raises ConfigError for the first `--config.<key>` `config` lacks."""
  for key in keys:
    missing = _missing_part(config, key)
    if missing is None:
      continue
    all_keys = config_keys(config)
    close = _suggestions(key, all_keys)
    where = (f'config.{missing.rsplit(".", 1)[0]} has no field '
             f'{missing.rsplit(".", 1)[1]!r}'
             if '.' in missing else f'the config has no field {missing!r}')
    hint = (f'Did you mean: {", ".join(close)}?' if close else
            f'The top-level keys are: {", ".join(sorted(config.keys()))}.')
    raise ConfigError(
        f'Unknown config key --config.{key}: {where}. {hint} Every field '
        f'is listed, with a comment, in {config_file} and '
        'vit_jax/configs/schema.py; a config never gains fields from the '
        'command line.')


# ---------------------------------------------------------------- values


def _choices(config) -> dict:
  """{dotted field: valid values} of the model and optimizer options."""
  valid = {
      'optimizer': choices.OPTIMIZERS,
      'decay_type': choices.DECAY_TYPES,
      'optim_dtype': (None,) + DTYPES
  }
  if config.get('model') is not None:
    valid.update({
        'model.classifier': choices.CLASSIFIERS,
        'model.posemb': choices.POSEMB_TYPES,
        'model.posemb_where': choices.POSEMB_WHERE,
        'model.attention_impl': choices.ATTENTION_IMPLS,
        'model.remat_policy': choices.REMAT_POLICY_NAMES,
        'model.dtype': DTYPES,
    })
  return valid


def _run_choices() -> dict:
  """{field: valid values} of the options the trainer itself reads."""
  return {
      'loss': choices.LOSS_NAMES,
      'objective': choices.OBJECTIVES,
      'parallelism': PARALLELISMS
  }


def _get(config, key: str, default=None):
  node = config
  for part in key.split('.'):
    if not isinstance(node,
                      (ml_collections.ConfigDict, dict)) or (part not in node):
      return default
    node = node[part]
  return node


def _check_choices(config, choices) -> None:
  for key, valid in choices.items():
    value = _get(config, key, valid[0])
    if not isinstance(value, str) and value is not None:
      continue  # e.g. a jnp dtype given in Python
    if value not in valid:
      close = errors.closest(
          value or '', [v for v in valid if v], n=1, cutoff=0.5)
      raise ConfigError(
          f'Unknown config.{key}={value!r}'
          f'{f" (did you mean {close[0]!r}?)" if close else ""}; set '
          f'--config.{key} to one of {list(valid)}.')


# (keys, lowest valid value, the rule).
_BOUNDS = (
    (('total_steps', 'batch', 'batch_eval', 'log_every', 'eval_every',
      'checkpoint_every', 'accum_steps', 'shuffle_buffer'), 1,
     'must be at least 1'),
    (('warmup_steps', 'prefetch', 'base_lr', 'weight_decay', 'linear_end',
      'grad_norm_clip', 'label_smoothing', 'fewshot.every_steps', 'ema_decay'),
     0, 'must not be negative'),
)
# Fields where 0 switches something off.
_ZERO_IS_OFF = ('fewshot.every_steps', 'prefetch', 'grad_norm_clip',
                'weight_decay', 'label_smoothing', 'warmup_steps', 'ema_decay')


def _check_numbers(config) -> None:
  for keys, lowest, rule in _BOUNDS:
    for key in keys:
      value = _get(config, key)
      if value is not None and value < lowest:
        off = '; 0 turns it off' if key in _ZERO_IS_OFF else ''
        raise ConfigError(f'config.{key}={value} {rule}{off}. Set '
                          f'--config.{key} to a value >= {lowest}.')


def _check_batch(config, device_count: int, process_count: int) -> None:
  devices = device_count * process_count
  where = (f'{devices} devices ({process_count} processes x {device_count} '
           'local devices)' if process_count > 1 else f'{devices} devices')
  for key in ('batch', 'batch_eval'):
    value = config.get(key)
    if value and value % devices:
      raise ConfigError(
          f'config.{key}={value} is not divisible by the {where}; set '
          f'--config.{key} to a multiple of {devices}, e.g. '
          f'{max(value // devices, 1) * devices}.')
  per_device = config.batch // devices
  accum = config.get('accum_steps', 1) or 1
  if per_device % accum:
    raise ConfigError(
        f'The per-device batch {per_device} (config.batch={config.batch} over '
        f'{devices} devices) is not divisible by config.accum_steps={accum}; '
        f'choose accum_steps dividing {per_device}.')


def _check_mesh(config, device_count: int, process_count: int) -> None:
  """config.mesh must cover the devices of all processes exactly once."""
  if config.get('parallelism') != 'fsdp':
    return
  from vit_jax.parallel import device_mesh  # pylint: disable=g-import-not-at-top
  mesh = config.get('mesh') or {}
  data, fsdp = mesh.get('data', 1), mesh.get('fsdp', -1)
  devices = device_count * process_count
  try:
    device_mesh.mesh_shape(data, fsdp, devices)
  except ValueError as e:
    raise ConfigError(
        f'config.mesh (data={data}, fsdp={fsdp}) does not fit the {devices} '
        f'devices of this run: {e} Set --config.mesh.data and '
        f'--config.mesh.fsdp so that data x fsdp = {devices}, or one of them '
        'to -1 for the devices the other leaves (e.g. --config.mesh.data=1 '
        '--config.mesh.fsdp=-1 shards over every device).') from None


def _check_model(config) -> None:
  model = config.get('model')
  if model is None:
    raise ConfigError('config.model is not set; copy one from '
                      'vit_jax.configs.models.MODEL_CONFIGS (see configs/).')
  if model.get('patches') is not None:  # a BiT ResNet takes any image size
    _check_crop(config, model)
  _check_posemb(model)
  _check_model_name(config)


def _check_crop(config, model) -> None:
  """The crop is a multiple of the pixels per token."""
  stem = 1
  if model.get('resnet') is not None:
    stem = choices.stem_stride(model.resnet.num_layers)
  patch = tuple(model.patches.size)
  stride = (stem * patch[0], stem * patch[1])
  crop = config.pp.crop
  size = (crop, crop) if isinstance(crop, int) else tuple(crop)
  if size[0] % stride[0] or size[1] % stride[1]:
    what = (f'the patch size {patch[0]}x{patch[1]}' if stem == 1 else
            f'{stride[0]}x{stride[1]} (ResNet stem stride {stem} x patch)')
    good = [
        max(size[0] // stride[0], 1) * stride[0],
        -(-size[0] // stride[0]) * stride[0]
    ]
    raise ConfigError(
        f'config.pp.crop={config.pp.crop} gives {size[0]}x{size[1]} images, '
        f'not a multiple of {what}; set --config.pp.crop to a multiple, e.g. '
        f'{" or ".join(str(g) for g in dict.fromkeys(good))}.')


def _check_posemb(model) -> None:
  """`posemb_where` only with a learned table (paper Table 8)."""
  problem = choices.where_problem(
      model.get('posemb', 'learn'), model.get('posemb_where', 'input'))
  if problem:
    raise ConfigError(f'config.model: {problem} Set --config.model.posemb or '
                      '--config.model.posemb_where accordingly.')


def _check_model_name(config) -> None:
  """A `model_name` that is not the model's would load another checkpoint."""
  from vit_jax.configs import project_models  # pylint: disable=g-import-not-at-top
  name, own = config.get('model_name'), config.model.get('model_name')
  if not name or not own or name == own:
    return
  known = list(project_models.ALL_MODEL_CONFIGS) + [own]
  close = ', '.join(errors.closest(name, known, n=3, cutoff=0.5))
  raise ConfigError(
      f'config.model_name={name!r} is not the model this config trains '
      f'(config.model is {own!r}). model_name does not choose the model: it '
      'labels the run and names the pre-trained file '
      '<pretrained_dir>/<model_name>.npz. To train a zoo model, pick a config '
      'that builds it, e.g. --config=configs/finetune.py:ViT-B_16,cifar10'
      f'{f" (close names: {close})" if close else ""}; or leave '
      '--config.model_name out.')


def check_values(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for a model, optimizer, step or `trainable` value
  that cannot work on any devices. Imports neither JAX nor TensorFlow.

  Args:
    config: a training config (vit_jax/configs/schema.py lists every field).
  """
  _check_numbers(config)
  _check_choices(config, _choices(config))
  _check_model(config)
  _check_trainable(config.get('trainable'))


def check_devices(config: ml_collections.ConfigDict,
                  *,
                  device_count: int,
                  process_count: int = 1) -> None:
  """Raises ConfigError for a batch or mesh that does not fit the devices.

  Args:
    config: a training config.
    device_count: local devices of this process.
    process_count: processes of the run.
  """
  _check_batch(config, device_count, process_count)
  _check_mesh(config, device_count, process_count)


def check_config(config: ml_collections.ConfigDict,
                 *,
                 device_count: int,
                 process_count: int = 1) -> None:
  """`check_values`, then `check_devices`. Does not import TensorFlow."""
  check_values(config)
  check_devices(config, device_count=device_count, process_count=process_count)


def check_data_and_paths(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for an unusable trainer option, augmentation or
  pre-trained checkpoint.
  """
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  _check_choices(config, _run_choices())
  try:
    input_pipeline.Augment.from_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.get('objective') == 'mpp' and pretrained_path(config):
    raise ConfigError('Masked patch prediction pre-trains from scratch; unset '
                      'config.pretrained_path / pretrained_dir.')
  _check_pretrained(pretrained_path(config), config)


def _check_trainable(spec: Optional[str]) -> None:
  regex = choices.trainable_pattern(spec)
  if regex is None:
    return
  try:
    re.compile(regex)
  except re.error as e:
    raise ConfigError(
        f'config.trainable={spec!r} is not a valid regular expression ({e}); '
        f'use one of {sorted(choices.TRAINABLE_PRESETS)} or a regex on '
        "'/'-joined parameter paths.") from None


# ----------------------------------------------------------------- paths


def check_remote(path: str, what: str) -> None:
  """Raises ConfigError if nothing installed can read `path`'s scheme."""
  if not filesystem.has_scheme(path):
    return
  scheme = path.split('://', 1)[0]
  try:
    tf = tf_import.import_tensorflow()
    schemes = tf.io.gfile.get_registered_schemes()
  except ImportError:
    schemes = []
  if scheme not in schemes:
    raise ConfigError(
        f'{what} {path!r} is a {scheme}:// path, and no installed filesystem '
        f'reads {scheme}:// (TensorFlow here reads '
        f'{", ".join(s + "://" for s in schemes if s)}). Copy the file to a '
        'local disk first, or install a TensorFlow build with that '
        'filesystem (for gs://: `pip install tensorflow`, with network access '
        'and `gcloud auth application-default login`).')


def check_workdir(workdir: str) -> str:
  """`workdir`'s absolute path, created if missing; ConfigError if unusable."""
  if filesystem.has_scheme(workdir):
    check_remote(workdir, '--workdir')
    return workdir
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(
        f'--workdir={workdir} is a file, not a folder. The workdir is a folder '
        'for checkpoints, logs and summary.json (created if missing): choose '
        'another path, e.g. --workdir=/tmp/vit_run.')
  try:
    os.makedirs(path, exist_ok=True)
    # A name of its own: the processes of a run share the workdir.
    fd, probe = tempfile.mkstemp(dir=path, prefix='.write_test')
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise ConfigError(
        f'--workdir={workdir} cannot be written: {e.strerror} ({path}). '
        'Choose a folder you can write to, e.g. --workdir=/tmp/vit_run.'
    ) from None
  return path


def _check_pretrained(path: Optional[str], config) -> None:
  """Raises ConfigError for a pre-trained file that cannot be read."""
  if not path:
    return
  if filesystem.has_scheme(path):
    check_remote(path, 'The pre-trained checkpoint')
    return
  if os.path.exists(path):
    return
  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  name = os.path.basename(path)[:-len('.npz')] if path.endswith('.npz') else ''
  field = ('--config.pretrained_path' if config.get('pretrained_path') else
           '--config.pretrained_dir (<pretrained_dir>/<model_name>.npz)')
  get = (f' The released file: gsutil cp gs://vit_models/imagenet21k/'
         f'{name}.npz {os.path.dirname(path) or "."}/'
         if name in models.MODEL_CONFIGS else '')
  raise ConfigError(
      f'The pre-trained checkpoint {path} (from {field}) does not exist.{get} '
      'Or point --config.pretrained_path at a .npz you have, or set '
      '--config.pretrained_dir= (empty) to train from scratch.')


def pretrained_path(config: ml_collections.ConfigDict) -> Optional[str]:
  """`config.pretrained_path`, else `<pretrained_dir>/<model_name>.npz`."""
  if config.get('pretrained_path'):
    return config.pretrained_path
  if config.get('pretrained_dir'):
    name = config.get('model_name') or config.model.get('model_name')
    return os.path.join(config.pretrained_dir, f'{name}.npz')
  return None

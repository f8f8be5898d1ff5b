"""The files and names of a Hugging Face `transformers` ViT directory.

What `convert_hf` and `export_hf` share: file names, the supported
architectures and the per-block module names (`BLOCK_MODULES`). Readers
raise `checkpoint.CheckpointError`; `.bin` files need `torch`.
"""

import json
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from vit_jax import checkpoint
from vit_jax.checkpoints import torch_layouts

PathLike = Union[str, os.PathLike]

MODEL_TYPE = 'vit'
ARCHITECTURES = ('ViTModel', 'ViTForImageClassification')
CONFIG_NAME = 'config.json'
PREPROCESSOR_NAME = 'preprocessor_config.json'
SAFETENSORS_NAME = 'model.safetensors'
TORCH_BIN_NAME = 'pytorch_model.bin'

# The names `transformers` >= 5 gives the modules in memory (a `state_dict()`
# saved with `torch.save`); files written by `save_pretrained` use the
# original names on the right, which every version reads.
_V5_RENAMES = (
    (r'^layers\.(\d+)\.attention\.q_proj\.',
     r'encoder.layer.\1.attention.attention.query.'),
    (r'^layers\.(\d+)\.attention\.k_proj\.',
     r'encoder.layer.\1.attention.attention.key.'),
    (r'^layers\.(\d+)\.attention\.v_proj\.',
     r'encoder.layer.\1.attention.attention.value.'),
    (r'^layers\.(\d+)\.attention\.o_proj\.',
     r'encoder.layer.\1.attention.output.dense.'),
    (r'^layers\.(\d+)\.mlp\.fc1\.', r'encoder.layer.\1.intermediate.dense.'),
    (r'^layers\.(\d+)\.mlp\.fc2\.', r'encoder.layer.\1.output.dense.'),
    (r'^layers\.(\d+)\.', r'encoder.layer.\1.'),
)
# Per encoder block: HF module (original names) -> our module path.
BLOCK_MODULES = (
    ('layernorm_before', 'LayerNorm_0'),
    ('attention.attention.query', 'MultiHeadDotProductAttention_0/query'),
    ('attention.attention.key', 'MultiHeadDotProductAttention_0/key'),
    ('attention.attention.value', 'MultiHeadDotProductAttention_0/value'),
    ('attention.output.dense', 'MultiHeadDotProductAttention_0/out'),
    ('layernorm_after', 'LayerNorm_1'),
    ('intermediate.dense', 'MlpBlock_0/Dense_0'),
    ('output.dense', 'MlpBlock_0/Dense_1'),
)


def _read_json(path: str, what: str) -> Dict[str, Any]:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise checkpoint.CheckpointError(
        f'Cannot read the {what} {path!r}: {e}. Re-export the model with '
        '`save_pretrained`.') from e


def read_hf_config(path: PathLike) -> Dict[str, Any]:
  """`config.json` of an HF ViT directory, as a dict.

  Raises:
    CheckpointError: not a directory, no `config.json`, another model type
      or an architecture other than ViTModel / ViTForImageClassification.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise checkpoint.CheckpointError(
        f'{path!r} is not a directory. load_hf expects a Hugging Face model '
        'directory (config.json + model.safetensors), e.g. one written by '
        '`model.save_pretrained(dir)` or downloaded with '
        '`huggingface_hub.snapshot_download`.')
  config_path = os.path.join(path, CONFIG_NAME)
  if not os.path.exists(config_path):
    raise checkpoint.CheckpointError(
        f'{path!r} has no {CONFIG_NAME} (it holds {sorted(os.listdir(path))}). '
        'A Hugging Face model directory needs the config next to the weights; '
        'write both with `model.save_pretrained(dir)`.')
  config = _read_json(config_path, 'model config')
  model_type = config.get('model_type')
  if model_type != MODEL_TYPE:
    hint = {
        'deit': ' DeiT adds a distillation token that this ViT does not have.',
        'vit_hybrid': ' Hybrid HF checkpoints use a BiT backbone; load the '
                      'released R50+ViT .npz with vit_jax.checkpoint instead.',
    }.get(model_type, '')
    raise checkpoint.CheckpointError(
        f'{config_path} has model_type={model_type!r}; only {MODEL_TYPE!r} '
        f'(transformers.ViTModel / ViTForImageClassification) is supported.' +
        hint)
  unsupported = [
      a for a in config.get('architectures') or () if a not in ARCHITECTURES
  ]
  if unsupported:
    raise checkpoint.CheckpointError(
        f'{config_path} is a {unsupported[0]}; only {", ".join(ARCHITECTURES)} '
        'can be converted (masked image modelling heads have no counterpart '
        'here). Load the backbone into a ViTModel and `save_pretrained` it.')
  return config


def read_hf_weights(path: PathLike) -> Dict[str, np.ndarray]:
  """{name: float32 array} of `model.safetensors` or `pytorch_model.bin`.

  Sharded forms (`*.index.json`) are read too.
  """
  path = os.fspath(path)
  for name in (SAFETENSORS_NAME, TORCH_BIN_NAME):
    single = os.path.join(path, name)
    if os.path.exists(single):
      return torch_layouts.read_weights_file(single)
    index = single + '.index.json'
    if os.path.exists(index):
      weight_map = _read_json(index, 'shard index').get('weight_map', {})
      weights = {}
      for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(path, shard)
        if not os.path.exists(shard_path):
          raise checkpoint.CheckpointError(
              f'{index} lists the shard {shard!r}, which is missing. '
              'Download all shards.')
        weights.update(torch_layouts.read_weights_file(shard_path))
      return weights
  raise checkpoint.CheckpointError(
      f'{path!r} has no weights: expected {SAFETENSORS_NAME} or '
      f'{TORCH_BIN_NAME} (or a sharded *.index.json); it holds '
      f'{sorted(os.listdir(path))}.')


def canonical_names(weights: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Strips the `vit.` prefix of task models; v5 module names -> file names."""
  out = {}
  for name, value in weights.items():
    if name.startswith('vit.'):
      name = name[len('vit.'):]
    for pattern, replacement in _V5_RENAMES:
      new = re.sub(pattern, replacement, name)
      if new != name:
        name = new
        break
    out[name] = value
  return out


def as_pair(x) -> Tuple[int, int]:
  """An HF size (`patch_size`, `image_size`): an int or (h, w) -> (h, w)."""
  return (int(x), int(x)) if np.ndim(x) == 0 else tuple(int(v) for v in x)


def input_normalization(
    path: str, num_channels: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
  """(scale, offset) from [-1, 1] pixels to the model's inputs, or None.

  None when the preprocessor (or its defaults) gives exactly [-1, 1].
  """
  pp_path = os.path.join(path, PREPROCESSOR_NAME)
  if not os.path.exists(pp_path):
    return None
  pp = _read_json(pp_path, 'image processor config')
  # Our x in [-1, 1] is the pixel p in [0, 255] as x = (p - 127.5) / 127.5.
  # HF feeds ((p * rescale) - mean) / std.
  rescale = (
      pp.get('rescale_factor', 1 / 255) if pp.get('do_rescale', True) else 1.)
  if pp.get('do_normalize', True):
    mean = np.broadcast_to(
        np.asarray(pp.get('image_mean', 0.5), np.float64), (num_channels,))
    std = np.broadcast_to(
        np.asarray(pp.get('image_std', 0.5), np.float64), (num_channels,))
  else:
    mean, std = np.zeros(num_channels), np.ones(num_channels)
  scale = 127.5 * rescale / std
  offset = (127.5 * rescale - mean) / std
  if np.allclose(
      scale, 1., rtol=0, atol=1e-6) and np.allclose(
          offset, 0., rtol=0, atol=1e-6):
    return None
  return scale, offset

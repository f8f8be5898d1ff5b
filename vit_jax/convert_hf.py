"""Hugging Face `transformers` ViT checkpoints <-> this project's ViT.

`load_hf(path)` reads a `ViTModel` or `ViTForImageClassification` directory
(`config.json` + `model.safetensors` or `pytorch_model.bin`, also sharded)
into our parameter tree and a `VisionTransformer` config;
`save_hf(params, model_config, path)` writes one that
`transformers.ViTForImageClassification.from_pretrained(path)` (or `ViTModel`
for a model without head) loads with no missing or unexpected weights.
Neither direction imports `transformers`; reading `.bin` files needs `torch`.

The two models are the same network (Google converted its released `.npz`
files into the `google/vit-*` checkpoints), up to these differences, each
handled here (docs/interop.md has the full table):

  * Layouts. HF `nn.Linear` weights are (out, in), ours (in, out); HF q/k/v
    weights are (heads*head_dim, D), our kernels (D, heads, head_dim); HF's
    attention output weight is (D, heads*head_dim), ours (heads, head_dim, D);
    the patch convolution is OIHW there, HWIO here. Position embeddings
    (1, 1+N, D) with the class row first and the class token (1, 1, D) are
    the same arrays.
  * Numerics. HF LayerNorms use `config.layer_norm_eps` (1e-12 by default,
    ours 1e-6) and `hidden_act='gelu'` is the exact (erf) GELU, ours the tanh
    approximation. The returned config sets `layernorm_epsilon` and
    `approximate_gelu` so that our model computes what HF's does; exports
    write our numerics into `config.json` (`gelu_pytorch_tanh`, eps 1e-6).
  * Heads. `ViTForImageClassification` puts its `classifier` on token 0 after
    the final LayerNorm, with no pooler in between: our `classifier='token'`,
    `representation_size=None`. `ViTModel`'s pooler (Dense + tanh on token 0)
    is our `pre_logits`; it has no head (`num_classes=None`).
  * Inputs. HF models take NCHW `pixel_values`; ours NHWC. The `google/vit-*`
    image processors normalise with mean 0.5 and std 0.5, which is exactly
    our [-1, 1] scaling `(x - 127.5) / 127.5`. A checkpoint whose
    `preprocessor_config.json` says otherwise (e.g. ImageNet mean/std) gets
    its normalisation folded into the patch embedding (`fold_input_
    normalization`), so the loaded model takes [-1, 1] images like every
    model of this project.

Layout helpers, also used by `convert_torchvision`: `dense_from_linear`,
`attention_from_linear` and their inverses, `conv_from_torch`,
`fold_input_normalization`, `read_weights_file`.
"""

import json
import math
import os
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import ml_collections
import numpy as np

from vit_jax import checkpoint

Params = Dict[str, Any]
PathLike = Union[str, os.PathLike]

MODEL_TYPE = 'vit'
ARCHITECTURES = ('ViTModel', 'ViTForImageClassification')
CONFIG_NAME = 'config.json'
PREPROCESSOR_NAME = 'preprocessor_config.json'
SAFETENSORS_NAME = 'model.safetensors'
TORCH_BIN_NAME = 'pytorch_model.bin'

# HF `hidden_act` -> our `approximate_gelu`. 'gelu' is torch's exact erf GELU;
# the others are the tanh approximation (flax's `nn.gelu` default).
_GELU_APPROXIMATE = {
    'gelu': False,
    'gelu_python': False,
    'gelu_pytorch_tanh': True,
    'gelu_new': True,
    'gelu_fast': True,
    'gelu_python_tanh': True,
}
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
_BLOCK_MODULES = (
    ('layernorm_before', 'LayerNorm_0'),
    ('attention.attention.query', 'MultiHeadDotProductAttention_0/query'),
    ('attention.attention.key', 'MultiHeadDotProductAttention_0/key'),
    ('attention.attention.value', 'MultiHeadDotProductAttention_0/value'),
    ('attention.output.dense', 'MultiHeadDotProductAttention_0/out'),
    ('layernorm_after', 'LayerNorm_1'),
    ('intermediate.dense', 'MlpBlock_0/Dense_0'),
    ('output.dense', 'MlpBlock_0/Dense_1'),
)
# Weights an HF model holds but does not use for the outputs we reproduce.
_UNUSED = (
    'embeddings.mask_token',  # masked image modelling only
)


# ----------------------------------------------------------------------------
# Layout helpers (also used by convert_torchvision).


def to_numpy(x) -> np.ndarray:
  """A torch tensor, jax or numpy array as a float32 numpy array."""
  if hasattr(x, 'detach'):  # torch; .float() also handles bfloat16.
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, dtype=np.float32)


def dense_from_linear(weight_OxI, bias_O=None) -> Params:
  """`nn.Linear` weight (out, in) -> flax Dense {'kernel': (in, out), 'bias'};
  a missing bias becomes zeros."""
  weight_OxI = to_numpy(weight_OxI)
  out = weight_OxI.shape[0]
  bias = np.zeros(out, np.float32) if bias_O is None else to_numpy(bias_O)
  return {'kernel': np.ascontiguousarray(weight_OxI.T), 'bias': bias}


def attention_from_linear(weight, bias, num_heads: int, *,
                          is_out: bool = False) -> Params:
  """One `nn.Linear` of attention -> a flax DenseGeneral of MHA.

  Args:
    weight: q/k/v: (heads*head_dim, D); out: (D, heads*head_dim).
    bias: q/k/v: (heads*head_dim,) or None (no bias: zeros); out: (D,).
    num_heads: number of heads.
    is_out: the output projection.

  Returns:
    q/k/v: kernel (D, heads, head_dim), bias (heads, head_dim);
    out: kernel (heads, head_dim, D), bias (D,).
  """
  dense = dense_from_linear(weight, bias)
  kernel = dense['kernel']
  if is_out:
    hd, d = kernel.shape
    return {'kernel': kernel.reshape(num_heads, hd // num_heads, d),
            'bias': dense['bias']}
  d, hd = kernel.shape
  return {'kernel': kernel.reshape(d, num_heads, hd // num_heads),
          'bias': dense['bias'].reshape(num_heads, hd // num_heads)}


def linear_from_dense(dense: Mapping[str, Any]
                     ) -> Tuple[np.ndarray, np.ndarray]:
  """The inverse of `dense_from_linear`: (weight (out, in), bias (out,))."""
  kernel = np.asarray(dense['kernel'], np.float32)
  return (np.ascontiguousarray(kernel.T),
          np.asarray(dense['bias'], np.float32))


def conv_from_torch(weight_OxIxHxW, bias_O) -> Params:
  """`nn.Conv2d` OIHW weight -> flax Conv {'kernel': HWIO, 'bias'}."""
  kernel = to_numpy(weight_OxIxHxW).transpose(2, 3, 1, 0)
  return {'kernel': np.ascontiguousarray(kernel), 'bias': to_numpy(bias_O)}


def fold_input_normalization(embedding: Mapping[str, Any], scale_C,
                             offset_C) -> Params:
  """Folds a per-channel affine input map into the patch-embedding conv.

  A model trained on inputs `x' = scale * x + offset` (per channel) computes
  on `x` what the returned parameters compute, exactly: the patch conv has
  VALID padding, so every kernel tap sees a pixel and
  `conv(x', W) + b = conv(x, W * scale) + (b + sum_hwc W * offset)`.

  Args:
    embedding: {'kernel': (ph, pw, C, D), 'bias': (D,)}.
    scale_C: (C,) multiplier.
    offset_C: (C,) offset.

  Returns:
    The folded {'kernel', 'bias'}.
  """
  kernel = np.asarray(embedding['kernel'], np.float64)
  scale = np.asarray(scale_C, np.float64)
  offset = np.asarray(offset_C, np.float64)
  new_kernel = kernel * scale[None, None, :, None]
  new_bias = (np.asarray(embedding['bias'], np.float64)
              + np.einsum('hwcd,c->d', kernel, offset))
  return {'kernel': new_kernel.astype(np.float32),
          'bias': new_bias.astype(np.float32)}


def linear_from_attention(dense: Mapping[str, Any], *,
                           is_out: bool) -> Tuple[np.ndarray, np.ndarray]:
  """The inverse of `attention_from_linear`: (weight (out, in), bias)."""
  kernel = np.asarray(dense['kernel'], np.float32)
  bias = np.asarray(dense['bias'], np.float32)
  if is_out:  # (heads, head_dim, D) -> (heads*head_dim, D)
    kernel = kernel.reshape(-1, kernel.shape[-1])
  else:  # (D, heads, head_dim) -> (D, heads*head_dim)
    kernel = kernel.reshape(kernel.shape[0], -1)
  return np.ascontiguousarray(kernel.T), bias.reshape(-1)


# ----------------------------------------------------------------------------
# Reading.


def _read_json(path: str, what: str) -> Dict[str, Any]:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise checkpoint.CheckpointError(
        f'Cannot read the {what} {path!r}: {e}. Re-export the model with '
        '`save_pretrained`.') from e


def read_hf_config(path: PathLike) -> Dict[str, Any]:
  """`config.json` of an HF ViT directory, checked to be a supported ViT.

  Args:
    path: the model directory.

  Returns:
    The config as a dict.

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
        f'(transformers.ViTModel / ViTForImageClassification) is supported.'
        + hint)
  unsupported = [a for a in config.get('architectures') or ()
                 if a not in ARCHITECTURES]
  if unsupported:
    raise checkpoint.CheckpointError(
        f'{config_path} is a {unsupported[0]}; only {", ".join(ARCHITECTURES)} '
        'can be converted (masked image modelling heads have no counterpart '
        'here). Load the backbone into a ViTModel and `save_pretrained` it.')
  return config


def read_weights_file(file_path: str) -> Dict[str, np.ndarray]:
  """One `.safetensors` or torch (`.bin`) file -> {name: float32 array}."""
  if file_path.endswith('.safetensors'):
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    try:
      return {k: to_numpy(v)
              for k, v in safetensors_numpy.load_file(file_path).items()}
    except TypeError:
      # numpy has no bfloat16: read through torch, which has.
      pass
    except Exception as e:  # safetensors raises its own error types.
      raise checkpoint.CheckpointError(
          f'Cannot read {file_path!r}: {e}. Re-download or re-export it.'
      ) from e
    _import_torch(f'{file_path} holds bfloat16 tensors; reading them')
    from safetensors import torch as safetensors_torch  # pylint: disable=g-import-not-at-top
    return {k: to_numpy(v)
            for k, v in safetensors_torch.load_file(file_path).items()}
  torch = _import_torch(f'Reading {file_path}')
  try:
    state = torch.load(file_path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises many types for bad files.
    raise checkpoint.CheckpointError(
        f'Cannot read {file_path!r}: {e}. Re-download or re-export it.') from e
  return {k: to_numpy(v) for k, v in state.items()}


def _import_torch(what: str):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise checkpoint.CheckpointError(
        f'{what} needs torch, which is not installed: pip install torch '
        '(or re-save the model as model.safetensors).') from e
  return torch


def read_hf_weights(path: PathLike) -> Dict[str, np.ndarray]:
  """All weights of an HF model directory, as float32 numpy arrays.

  Reads `model.safetensors`, else `pytorch_model.bin`, or their sharded forms
  (`*.index.json`).

  Args:
    path: the model directory.

  Returns:
    {HF parameter name: array}, names as in the file.
  """
  path = os.fspath(path)
  for name in (SAFETENSORS_NAME, TORCH_BIN_NAME):
    single = os.path.join(path, name)
    if os.path.exists(single):
      return read_weights_file(single)
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
        weights.update(read_weights_file(shard_path))
      return weights
  raise checkpoint.CheckpointError(
      f'{path!r} has no weights: expected {SAFETENSORS_NAME} or '
      f'{TORCH_BIN_NAME} (or a sharded *.index.json); it holds '
      f'{sorted(os.listdir(path))}.')


def _canonical_names(weights: Mapping[str, np.ndarray]
                    ) -> Dict[str, np.ndarray]:
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


def _pair(x) -> Tuple[int, int]:
  return (int(x), int(x)) if np.ndim(x) == 0 else tuple(int(v) for v in x)


def _input_normalization(path: str, num_channels: int
                        ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
  """(scale, offset) taking our [-1, 1] pixels to the model's inputs; None
  when the preprocessor (or its absence: ViTImageProcessor's defaults) gives
  exactly [-1, 1]."""
  pp_path = os.path.join(path, PREPROCESSOR_NAME)
  if not os.path.exists(pp_path):
    return None
  pp = _read_json(pp_path, 'image processor config')
  # Our x in [-1, 1] is the pixel p in [0, 255] as x = (p - 127.5) / 127.5.
  # HF feeds ((p * rescale) - mean) / std.
  rescale = (pp.get('rescale_factor', 1 / 255) if pp.get('do_rescale', True)
             else 1.)
  if pp.get('do_normalize', True):
    mean = np.broadcast_to(np.asarray(pp.get('image_mean', 0.5), np.float64),
                           (num_channels,))
    std = np.broadcast_to(np.asarray(pp.get('image_std', 0.5), np.float64),
                          (num_channels,))
  else:
    mean, std = np.zeros(num_channels), np.ones(num_channels)
  scale = 127.5 * rescale / std
  offset = (127.5 * rescale - mean) / std
  if np.allclose(scale, 1., rtol=0, atol=1e-6) and np.allclose(
      offset, 0., rtol=0, atol=1e-6):
    return None
  return scale, offset


def load_hf(path: PathLike, *,
            fold_normalization: bool = True
           ) -> Tuple[Params, ml_collections.ConfigDict]:
  """Loads an HF `ViTModel` / `ViTForImageClassification` directory.

  Args:
    path: directory with `config.json` and `model.safetensors` (or
      `pytorch_model.bin`, or shards), e.g. from `save_pretrained`.
    fold_normalization: when the directory's `preprocessor_config.json`
      normalises pixels other than to [-1, 1] (mean/std not 0.5), fold that
      map into the patch embedding so the model takes [-1, 1] images like
      every model here. False keeps the weights as they are: feed the
      processor's normalisation then (NHWC).

  Returns:
    (params, model_config): the nested parameter dict (numpy float32, linen
    names) and a ConfigDict of `VisionTransformer` fields, so that
    `models.VisionTransformer(**model_config).apply({'params': params},
    images_NHWC, train=False)` gives HF's `logits` (classification) or
    `pooler_output` (ViTModel with pooler), or the final `last_hidden_state`
    token 0 (ViTModel without pooler). The numerics fields
    (`layernorm_epsilon`, `approximate_gelu`) are HF's.

  Raises:
    CheckpointError: missing or unreadable files, an unsupported model,
      missing or unexpected weights, or shapes that disagree with the config.
  """
  path = os.fspath(path)
  config = read_hf_config(path)
  weights = _canonical_names(read_hf_weights(path))

  hidden = int(config.get('hidden_size', 768))
  num_heads = int(config.get('num_attention_heads', 12))
  num_layers = int(config.get('num_hidden_layers', 12))
  mlp_dim = int(config.get('intermediate_size', 3072))
  patch = _pair(config.get('patch_size', 16))
  hidden_act = config.get('hidden_act', 'gelu')
  if hidden_act not in _GELU_APPROXIMATE:
    raise checkpoint.CheckpointError(
        f'{path}: hidden_act={hidden_act!r} is not a GELU; this ViT supports '
        f'{sorted(_GELU_APPROXIMATE)}.')
  if hidden % num_heads:
    raise checkpoint.CheckpointError(
        f'{path}: hidden_size {hidden} is not divisible by '
        f'num_attention_heads {num_heads}.')

  is_classifier = 'classifier.weight' in weights
  has_pooler = 'pooler.dense.weight' in weights and not is_classifier
  if has_pooler and config.get('pooler_act', 'tanh') != 'tanh':
    raise checkpoint.CheckpointError(
        f'{path}: pooler_act={config.get("pooler_act")!r}; our pre_logits '
        'layer is Dense + tanh only.')

  expected = _expected_names(num_layers, is_classifier, has_pooler,
                             qkv_bias=config.get('qkv_bias', True))
  layer_ids = {int(m.group(1)) for n in weights
               if (m := re.match(r'^encoder\.layer\.(\d+)\.', n))}
  if layer_ids and max(layer_ids) + 1 != num_layers:
    raise checkpoint.CheckpointError(
        f'{path}: config.json says num_hidden_layers={num_layers} but the '
        f'weights hold {max(layer_ids) + 1} layers. Fix the config.')
  missing = sorted(set(expected) - set(weights))
  ignored = set(_UNUSED) | {n for n in weights if n.startswith('pooler.')}
  unexpected = sorted(set(weights) - set(expected) - ignored)
  if missing or unexpected:
    raise checkpoint.CheckpointError(
        f'{path}: the weights do not form a ViTModel / '
        'ViTForImageClassification of its config.json.'
        + (f'\n  missing: {_short_list(missing)}' if missing else '')
        + (f'\n  unexpected: {_short_list(unexpected)}' if unexpected else '')
        + '\nRe-export the model with `save_pretrained`, or fix config.json.')

  w = weights
  params: Params = {
      'embedding': conv_from_torch(
          w['embeddings.patch_embeddings.projection.weight'],
          w['embeddings.patch_embeddings.projection.bias']),
      'cls': w['embeddings.cls_token'],
      'Transformer': {
          'posembed_input': {
              'pos_embedding': w['embeddings.position_embeddings']},
          'encoder_norm': _layernorm(w, 'layernorm'),
      },
  }
  for i in range(num_layers):
    params['Transformer'][f'encoderblock_{i}'] = _block_from_hf(
        w, f'encoder.layer.{i}.', num_heads)
  if has_pooler:
    params['pre_logits'] = dense_from_linear(w['pooler.dense.weight'],
                                             w['pooler.dense.bias'])
  if is_classifier:
    params['head'] = dense_from_linear(w['classifier.weight'],
                                       w['classifier.bias'])

  num_channels = int(config.get('num_channels', 3))
  _check_shapes(path, params, hidden=hidden, mlp_dim=mlp_dim, patch=patch,
                num_channels=num_channels,
                image_size=_pair(config.get('image_size', 224)))

  normalization = (_input_normalization(path, num_channels)
                   if fold_normalization else None)
  if normalization is not None:
    params['embedding'] = fold_input_normalization(params['embedding'],
                                                   *normalization)

  model_config = ml_collections.ConfigDict(dict(
      model_name=os.path.basename(os.path.normpath(path)),
      num_classes=(int(params['head']['bias'].shape[0]) if is_classifier
                   else None),
      patches=ml_collections.ConfigDict({'size': patch}),
      hidden_size=hidden,
      transformer=ml_collections.ConfigDict(dict(
          num_layers=num_layers,
          mlp_dim=mlp_dim,
          num_heads=num_heads,
          dropout_rate=float(config.get('hidden_dropout_prob', 0.)),
          attention_dropout_rate=float(
              config.get('attention_probs_dropout_prob', 0.)),
      )),
      representation_size=(int(params['pre_logits']['bias'].shape[0])
                           if has_pooler else None),
      classifier='token',
      layernorm_epsilon=float(config.get('layer_norm_eps', 1e-12)),
      approximate_gelu=_GELU_APPROXIMATE[hidden_act],
  ))
  return params, model_config


def load_hf_labels(path: PathLike) -> Optional[Dict[int, str]]:
  """`id2label` of an HF classification directory ({class index: name});
  None for a ViTModel (whose config carries HF's default two labels)."""
  config = read_hf_config(path)
  id2label = config.get('id2label')
  if not id2label or 'ViTModel' in (config.get('architectures') or ()):
    return None
  return {int(k): v for k, v in id2label.items()}


def _expected_names(num_layers: int, is_classifier: bool, has_pooler: bool,
                    qkv_bias: bool) -> Sequence[str]:
  names = ['embeddings.cls_token', 'embeddings.position_embeddings',
           'embeddings.patch_embeddings.projection.weight',
           'embeddings.patch_embeddings.projection.bias',
           'layernorm.weight', 'layernorm.bias']
  for i in range(num_layers):
    for module, _ in _BLOCK_MODULES:
      names.append(f'encoder.layer.{i}.{module}.weight')
      if qkv_bias or module.split('.')[-1] not in ('query', 'key', 'value'):
        names.append(f'encoder.layer.{i}.{module}.bias')
  if has_pooler:
    names += ['pooler.dense.weight', 'pooler.dense.bias']
  if is_classifier:
    names += ['classifier.weight', 'classifier.bias']
  return names


def _layernorm(w, name: str) -> Params:
  return {'scale': w[f'{name}.weight'], 'bias': w[f'{name}.bias']}


def _block_from_hf(w, prefix: str, num_heads: int) -> Params:
  block: Params = {}
  for module, ours in _BLOCK_MODULES:
    weight = w[f'{prefix}{module}.weight']
    bias = w.get(f'{prefix}{module}.bias')  # None: qkv_bias=False.
    if ours.startswith('LayerNorm'):
      value = _layernorm(w, f'{prefix}{module}')
    elif ours.startswith('MultiHeadDotProductAttention'):
      value = attention_from_linear(weight, bias, num_heads,
                                    is_out=ours.endswith('/out'))
    else:
      value = dense_from_linear(weight, bias)
    parent, name = ours.split('/', 1) if '/' in ours else (ours, None)
    if name is None:
      block[parent] = value
    else:
      block.setdefault(parent, {})[name] = value
  return block


def _check_shapes(path: str, params: Params, *, hidden: int, mlp_dim: int,
                  patch: Tuple[int, int], num_channels: int,
                  image_size: Tuple[int, int]) -> None:
  """Shapes that disagree with config.json fail here rather than in apply."""
  expected = {
      'embedding/kernel': (*patch, num_channels, hidden),
      'cls': (1, 1, hidden),
      'Transformer/encoder_norm/scale': (hidden,),
      'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel': (hidden, mlp_dim),
  }
  grid = (image_size[0] // patch[0], image_size[1] // patch[1])
  expected['Transformer/posembed_input/pos_embedding'] = (
      1, grid[0] * grid[1] + 1, hidden)
  flat = checkpoint.flatten_tree(params)
  for name, shape in expected.items():
    if name in flat and tuple(flat[name].shape) != shape:
      raise checkpoint.CheckpointError(
          f'{path}: {name} has shape {tuple(flat[name].shape)} but config.json '
          f'(hidden_size={hidden}, intermediate_size={mlp_dim}, patch_size='
          f'{patch}, image_size={image_size}, num_channels={num_channels}) '
          f'implies {shape}. Fix config.json.')


def _short_list(names, limit: int = 12) -> str:
  more = f' ... and {len(names) - limit} more' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


# ----------------------------------------------------------------------------
# Writing.


def _field(model_config, name: str, default=None):
  """A VisionTransformer field from a ConfigDict, a dict or the module."""
  if isinstance(model_config, nn.Module):
    return getattr(model_config, name, default)
  return model_config.get(name, default)


def save_hf(params: Mapping[str, Any], model_config, path: PathLike, *,
            id2label: Optional[Union[Mapping[int, str], Sequence[str]]] = None,
            image_size: Optional[Union[int, Sequence[int]]] = None) -> None:
  """Writes a Hugging Face model directory of our parameters.

  Writes `config.json`, `model.safetensors` and `preprocessor_config.json`
  (a ViTImageProcessor normalising to [-1, 1], our input convention). A model
  with a head becomes a `ViTForImageClassification`; one without
  (`num_classes` 0/None) a `ViTModel`, whose pooler is our `pre_logits`
  (without `representation_size` it has no pooler: load it with
  `ViTModel.from_pretrained(path, add_pooling_layer=False)`). The config
  records our numerics (`layernorm_epsilon`, default 1e-6; GELU tanh
  approximation `gelu_pytorch_tanh` unless `approximate_gelu=False`), so HF
  computes our outputs.

  Args:
    params: the model's parameters (numpy or jax; linen or released names;
      per-layer or scanned blocks).
    model_config: the `VisionTransformer` fields (ConfigDict or dict, as
      `models.MODEL_CONFIGS[...]` plus `num_classes`), or the module.
    path: the directory to write (created if needed; files replaced).
    id2label: class names, {index: name} or a list; default `LABEL_{i}`.
    image_size: the training resolution (int or (h, w)); default: from the
      position embedding, which must then be a square grid.

  Raises:
    ValueError: a model HF's ViT cannot express (classifier other than
      'token', a ResNet stem, a non-learned position embedding, a
      `pre_logits` layer in front of a head), or bad `id2label`/`image_size`.
  """
  classifier = _field(model_config, 'classifier', 'token')
  if classifier != 'token':
    raise ValueError(
        f'save_hf: classifier={classifier!r}; HF ViT classifies token 0 only '
        "(classifier='token'). Models pooled otherwise cannot be exported.")
  if _field(model_config, 'resnet') is not None:
    raise ValueError('save_hf: hybrid (ResNet + ViT) models have no HF ViT '
                     'counterpart; export them with vit_jax.checkpoint.save.')
  posemb = _field(model_config, 'posemb', 'learn')
  if posemb != 'learn':
    raise ValueError(f'save_hf: posemb={posemb!r}; HF ViT has a learned 1-D '
                     "position embedding only (posemb='learn').")
  num_classes = _field(model_config, 'num_classes') or 0
  representation_size = _field(model_config, 'representation_size')
  if num_classes and representation_size is not None:
    raise ValueError(
        'save_hf: the model has a pre_logits layer (representation_size='
        f'{representation_size}) in front of its head; '
        'ViTForImageClassification applies its classifier to token 0 directly. '
        'Export the backbone as a ViTModel (num_classes=0: pre_logits becomes '
        'the pooler, the head is dropped) or fine-tune with '
        'representation_size=None.')

  tree = checkpoint.canonicalize(params)
  flat = {k: np.asarray(v, np.float32)
          for k, v in checkpoint.flatten_tree(tree).items()}
  tree = checkpoint.recover_tree(list(flat), list(flat.values()))
  transformer = tree.get('Transformer', {})
  layers = sorted(int(k.rsplit('_', 1)[1]) for k in transformer
                  if re.match(r'^encoderblock_\d+$', k))
  if 'embedding' not in tree or 'cls' not in tree or not layers:
    raise ValueError('save_hf: params lack embedding, cls or encoder blocks; '
                     'pass the ViT parameters (the "params" collection).')
  if num_classes and 'head' not in tree:
    raise ValueError(f'save_hf: num_classes={num_classes} but params have no '
                     'head.')
  if representation_size is not None and 'pre_logits' not in tree:
    raise ValueError(f'save_hf: representation_size={representation_size} '
                     'but params have no pre_logits.')

  ph, pw, channels, hidden = tree['embedding']['kernel'].shape
  query = transformer['encoderblock_0']['MultiHeadDotProductAttention_0'][
      'query']['kernel']
  num_heads = query.shape[1]
  mlp_dim = transformer['encoderblock_0']['MlpBlock_0']['Dense_0'][
      'kernel'].shape[1]
  num_tokens = transformer['posembed_input']['pos_embedding'].shape[1] - 1
  image_hw = _image_size(image_size, num_tokens, (ph, pw))

  weights = _hf_weights(tree, layers, num_classes, representation_size)
  prefix = 'vit.' if num_classes else ''
  weights = {(k if k.startswith('classifier.') else prefix + k): v
             for k, v in weights.items()}

  labels = _id2label(id2label, num_classes)
  transformer_config = _field(model_config, 'transformer') or {}
  config = {
      'architectures': ['ViTForImageClassification' if num_classes
                        else 'ViTModel'],
      'model_type': MODEL_TYPE,
      'hidden_size': int(hidden),
      'num_hidden_layers': len(layers),
      'num_attention_heads': int(num_heads),
      'intermediate_size': int(mlp_dim),
      'hidden_act': ('gelu_pytorch_tanh'
                     if _field(model_config, 'approximate_gelu', True)
                     else 'gelu'),
      'hidden_dropout_prob': float(transformer_config.get('dropout_rate', 0.)),
      'attention_probs_dropout_prob': float(
          transformer_config.get('attention_dropout_rate', 0.)),
      'layer_norm_eps': float(_field(model_config, 'layernorm_epsilon', 1e-6)),
      'image_size': (image_hw[0] if image_hw[0] == image_hw[1]
                     else list(image_hw)),
      'patch_size': int(ph) if ph == pw else [int(ph), int(pw)],
      'num_channels': int(channels),
      'qkv_bias': True,
      'encoder_stride': int(ph),
      'pooler_output_size': int(representation_size or hidden),
      'pooler_act': 'tanh',
      'initializer_range': 0.02,
      'dtype': 'float32',
  }
  if labels is not None:
    config['id2label'] = {str(k): v for k, v in labels.items()}
    config['label2id'] = {v: k for k, v in labels.items()}
  preprocessor = {
      'image_processor_type': 'ViTImageProcessor',
      'do_resize': True,
      'size': {'height': image_hw[0], 'width': image_hw[1]},
      'resample': 2,  # bilinear
      'do_rescale': True,
      'rescale_factor': 1 / 255,
      'do_normalize': True,
      # (p / 255 - 0.5) / 0.5 = (p - 127.5) / 127.5: our [-1, 1] scaling.
      'image_mean': [0.5] * channels,
      'image_std': [0.5] * channels,
  }

  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  safetensors_numpy.save_file(
      {k: np.ascontiguousarray(v) for k, v in weights.items()},
      os.path.join(path, SAFETENSORS_NAME),
      # transformers refuses safetensors files without a framework tag.
      metadata={'format': 'pt'})
  for name, content in ((CONFIG_NAME, config),
                        (PREPROCESSOR_NAME, preprocessor)):
    with open(os.path.join(path, name), 'w', encoding='utf-8') as f:
      json.dump(content, f, indent=2, sort_keys=True)
      f.write('\n')


def _image_size(image_size, num_tokens: int,
                patch: Tuple[int, int]) -> Tuple[int, int]:
  if image_size is not None:
    h, w = _pair(image_size)
    if h % patch[0] or w % patch[1] or (
        (h // patch[0]) * (w // patch[1]) != num_tokens):
      raise ValueError(
          f'save_hf: image_size {h}x{w} with patch {patch[0]}x{patch[1]} does '
          f'not give the {num_tokens} patch tokens of the position embedding.')
    return h, w
  g = math.isqrt(num_tokens)
  if g * g != num_tokens:
    raise ValueError(
        f'save_hf: the position embedding has {num_tokens} patch tokens, not '
        'a square grid; pass image_size=(height, width).')
  return g * patch[0], g * patch[1]


def _id2label(id2label, num_classes: int) -> Optional[Dict[int, str]]:
  if not num_classes:
    if id2label:
      raise ValueError('save_hf: id2label given for a model without head.')
    return None
  if id2label is None:
    return {i: f'LABEL_{i}' for i in range(num_classes)}
  if isinstance(id2label, Mapping):
    labels = {int(k): str(v) for k, v in id2label.items()}
  else:
    labels = {i: str(v) for i, v in enumerate(id2label)}
  if sorted(labels) != list(range(num_classes)):
    raise ValueError(
        f'save_hf: id2label must name classes 0..{num_classes - 1} '
        f'(num_classes={num_classes}); got indices {sorted(labels)[:10]}...')
  return labels


def _hf_weights(tree: Params, layers: Sequence[int], num_classes: int,
                representation_size) -> Dict[str, np.ndarray]:
  """Our tree -> HF names (without the `vit.` prefix), original layout."""
  transformer = tree['Transformer']
  kernel = tree['embedding']['kernel']  # HWIO -> OIHW
  weights = {
      'embeddings.cls_token': tree['cls'],
      'embeddings.position_embeddings':
          transformer['posembed_input']['pos_embedding'],
      'embeddings.patch_embeddings.projection.weight':
          kernel.transpose(3, 2, 0, 1),
      'embeddings.patch_embeddings.projection.bias': tree['embedding']['bias'],
      'layernorm.weight': transformer['encoder_norm']['scale'],
      'layernorm.bias': transformer['encoder_norm']['bias'],
  }
  for i in layers:
    block = transformer[f'encoderblock_{i}']
    for module, ours in _BLOCK_MODULES:
      node = block
      for part in ours.split('/'):
        node = node[part]
      name = f'encoder.layer.{i}.{module}'
      if ours.startswith('LayerNorm'):
        weights[f'{name}.weight'] = node['scale']
        weights[f'{name}.bias'] = node['bias']
        continue
      if ours.startswith('MultiHeadDotProductAttention'):
        weight, bias = linear_from_attention(node,
                                              is_out=ours.endswith('/out'))
      else:
        weight, bias = linear_from_dense(node)
      weights[f'{name}.weight'] = weight
      weights[f'{name}.bias'] = bias
  if representation_size is not None:
    weights['pooler.dense.weight'], weights['pooler.dense.bias'] = (
        linear_from_dense(tree['pre_logits']))
  if num_classes:
    weights['classifier.weight'], weights['classifier.bias'] = (
        linear_from_dense(tree['head']))
  return weights

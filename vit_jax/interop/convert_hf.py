"""Hugging Face `transformers` ViT checkpoints -> this project's ViT.

`load_hf(path)` reads a `ViTModel` or `ViTForImageClassification` directory
into our parameter tree and a `VisionTransformer` config; the writer is
`export_hf.save_hf`. No `transformers` import; `.bin` files need `torch`.

Both are the same network up to weight layouts, HF's numerics (LayerNorm
eps 1e-12, exact GELU: kept in the returned config), NCHW inputs and the
processor's normalisation, folded into the patch embedding when it is not
[-1, 1]. docs/interop.md has the full table.
"""

import os
import re
from typing import (
    Any,
    Dict,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import ml_collections
import numpy as np

from vit_jax import checkpoint
from vit_jax.checkpoints import converter_output
from vit_jax.checkpoints import torch_layouts
from vit_jax.checkpoints import trees
from vit_jax.interop import hf_format

Params = Dict[str, Any]
PathLike = Union[str, os.PathLike]

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
# Weights an HF model holds but does not use for the outputs we reproduce.
_UNUSED = (
    'embeddings.mask_token',  # masked image modelling only
)


def load_hf(
    path: PathLike,
    *,
    fold_normalization: bool = True
) -> Tuple[Params, ml_collections.ConfigDict]:
  """Loads an HF `ViTModel` / `ViTForImageClassification` directory.

  Args:
    path: directory with `config.json` and `model.safetensors` (or
      `pytorch_model.bin`, or shards), e.g. from `save_pretrained`.
    fold_normalization: fold a `preprocessor_config.json` normalisation other
      than [-1, 1] into the patch embedding. False keeps the weights as they
      are: feed the processor's normalisation then (NHWC).

  Returns:
    (params, model_config): numpy float32 parameters under linen names and the
    `VisionTransformer` fields (with HF's numerics) whose output is HF's
    `logits`, `pooler_output` or token 0 of `last_hidden_state`.

  Raises:
    CheckpointError: missing or unreadable files, an unsupported model,
      missing or unexpected weights, or shapes that disagree with the config.
  """
  path = os.fspath(path)
  config = hf_format.read_hf_config(path)
  weights = hf_format.canonical_names(hf_format.read_hf_weights(path))
  sizes = _read_sizes(path, config)
  is_classifier = 'classifier.weight' in weights
  has_pooler = 'pooler.dense.weight' in weights and not is_classifier
  _check_names(
      path,
      config,
      weights,
      num_layers=sizes.num_layers,
      is_classifier=is_classifier,
      has_pooler=has_pooler)

  params = _params_from_hf(
      weights, sizes, is_classifier=is_classifier, has_pooler=has_pooler)
  num_channels = int(config.get('num_channels', 3))
  _check_shapes(
      path,
      params,
      hidden=sizes.hidden,
      mlp_dim=sizes.mlp_dim,
      patch=sizes.patch,
      num_channels=num_channels,
      image_size=hf_format.as_pair(config.get('image_size', 224)))

  normalization = (
      hf_format.input_normalization(path, num_channels)
      if fold_normalization else None)
  if normalization is not None:
    params['embedding'] = torch_layouts.fold_input_normalization(
        params['embedding'], *normalization)
  return params, _model_config(path, config, params, sizes)


def load_hf_labels(path: PathLike) -> Optional[Dict[int, str]]:
  """`id2label` of an HF classification directory; None for a ViTModel."""
  config = hf_format.read_hf_config(path)
  id2label = config.get('id2label')
  if not id2label or 'ViTModel' in (config.get('architectures') or ()):
    return None
  return {int(k): v for k, v in id2label.items()}


class _Sizes(NamedTuple):
  """The architecture `config.json` describes."""
  hidden: int
  num_heads: int
  num_layers: int
  mlp_dim: int
  patch: Tuple[int, int]
  approximate_gelu: bool


def _read_sizes(path: str, config: Mapping[str, Any]) -> _Sizes:
  """The sizes and GELU of `config.json`, checked to describe our ViT."""
  hidden = int(config.get('hidden_size', 768))
  num_heads = int(config.get('num_attention_heads', 12))
  num_layers = int(config.get('num_hidden_layers', 12))
  mlp_dim = int(config.get('intermediate_size', 3072))
  patch = hf_format.as_pair(config.get('patch_size', 16))
  hidden_act = config.get('hidden_act', 'gelu')
  if hidden_act not in _GELU_APPROXIMATE:
    raise checkpoint.CheckpointError(
        f'{path}: hidden_act={hidden_act!r} is not a GELU; this ViT supports '
        f'{sorted(_GELU_APPROXIMATE)}.')
  if hidden % num_heads:
    raise checkpoint.CheckpointError(
        f'{path}: hidden_size {hidden} is not divisible by '
        f'num_attention_heads {num_heads}.')
  return _Sizes(
      hidden=hidden,
      num_heads=num_heads,
      num_layers=num_layers,
      mlp_dim=mlp_dim,
      patch=patch,
      approximate_gelu=_GELU_APPROXIMATE[hidden_act])


def _check_names(path: str, config: Mapping[str, Any],
                 weights: Mapping[str, np.ndarray], *, num_layers: int,
                 is_classifier: bool, has_pooler: bool) -> None:
  """The weights are exactly those of a ViT of `config.json`."""
  if has_pooler and config.get('pooler_act', 'tanh') != 'tanh':
    raise checkpoint.CheckpointError(
        f'{path}: pooler_act={config.get("pooler_act")!r}; our pre_logits '
        'layer is Dense + tanh only.')

  expected = _expected_names(
      num_layers,
      is_classifier,
      has_pooler,
      qkv_bias=config.get('qkv_bias', True))
  layer_ids = {
      int(m.group(1))
      for n in weights
      if (m := re.match(r'^encoder\.layer\.(\d+)\.', n))
  }
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
        'ViTForImageClassification of its config.json.' +
        (f'\n  missing: {_short_list(missing)}' if missing else '') +
        (f'\n  unexpected: {_short_list(unexpected)}' if unexpected else '') +
        '\nRe-export the model with `save_pretrained`, or fix config.json.')


def _params_from_hf(w: Mapping[str, np.ndarray], sizes: _Sizes, *,
                    is_classifier: bool, has_pooler: bool) -> Params:
  """HF weights (canonical names, checked) -> our parameter tree."""
  pre_logits = head = None
  if has_pooler:
    pre_logits = torch_layouts.dense_from_linear(w['pooler.dense.weight'],
                                                 w['pooler.dense.bias'])
  if is_classifier:
    head = torch_layouts.dense_from_linear(w['classifier.weight'],
                                           w['classifier.bias'])
  return converter_output.params_tree(
      embedding=torch_layouts.conv_from_torch(
          w['embeddings.patch_embeddings.projection.weight'],
          w['embeddings.patch_embeddings.projection.bias']),
      cls=w['embeddings.cls_token'],
      pos_embedding=w['embeddings.position_embeddings'],
      encoder_norm=_layernorm(w, 'layernorm'),
      blocks=[
          _block_from_hf(w, f'encoder.layer.{i}.', sizes.num_heads)
          for i in range(sizes.num_layers)
      ],
      pre_logits=pre_logits,
      head=head)


def _model_config(path: str, config: Mapping[str, Any], params: Params,
                  sizes: _Sizes) -> ml_collections.ConfigDict:
  """The `VisionTransformer` fields of the loaded model, HF's numerics."""
  return converter_output.model_config(
      params,
      model_name=os.path.basename(os.path.normpath(path)),
      patch=sizes.patch,
      hidden_size=sizes.hidden,
      num_layers=sizes.num_layers,
      mlp_dim=sizes.mlp_dim,
      num_heads=sizes.num_heads,
      dropout_rate=float(config.get('hidden_dropout_prob', 0.)),
      attention_dropout_rate=float(
          config.get('attention_probs_dropout_prob', 0.)),
      layernorm_epsilon=float(config.get('layer_norm_eps', 1e-12)),
      approximate_gelu=sizes.approximate_gelu)


def _expected_names(num_layers: int, is_classifier: bool, has_pooler: bool,
                    qkv_bias: bool) -> Sequence[str]:
  names = [
      'embeddings.cls_token', 'embeddings.position_embeddings',
      'embeddings.patch_embeddings.projection.weight',
      'embeddings.patch_embeddings.projection.bias', 'layernorm.weight',
      'layernorm.bias'
  ]
  for i in range(num_layers):
    for module, _ in hf_format.BLOCK_MODULES:
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
  for module, ours in hf_format.BLOCK_MODULES:
    weight = w[f'{prefix}{module}.weight']
    bias = w.get(f'{prefix}{module}.bias')  # None: qkv_bias=False.
    if ours.startswith('LayerNorm'):
      value = _layernorm(w, f'{prefix}{module}')
    elif ours.startswith('MultiHeadDotProductAttention'):
      value = torch_layouts.attention_from_linear(
          weight, bias, num_heads, is_out=ours.endswith('/out'))
    else:
      value = torch_layouts.dense_from_linear(weight, bias)
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
  expected['Transformer/posembed_input/pos_embedding'] = (1,
                                                          grid[0] * grid[1] + 1,
                                                          hidden)
  flat = trees.flatten_tree(params)
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

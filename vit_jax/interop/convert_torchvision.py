"""torchvision `VisionTransformer` state dicts (`vit_b_16`, ...) -> our ViT.

torchvision's ViT is the paper's network under other names, with the exact
erf GELU (the returned config sets `approximate_gelu=False`) and ImageNet
mean/std inputs. `load_torchvision` folds that normalisation into the patch
embedding by default, so the model takes [-1, 1] images like every model
here; with `fold_normalization=False` feed `imagenet_normalize(images)`.

The state dict does not give the number of heads: it defaults by width
(`DEFAULT_NUM_HEADS`) and can be overridden.
"""

import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import ml_collections
import numpy as np

from vit_jax import checkpoint
from vit_jax.checkpoints import converter_output
from vit_jax.checkpoints import torch_layouts

Params = Dict[str, Any]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Width -> heads of torchvision's vit_b/l/h and of the Ti/S zoo models.
DEFAULT_NUM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
LAYERNORM_EPSILON = 1e-6
PREPROCESSING = (
    'torchvision ViT weights were trained on ImageNet mean/std-normalised '
    'inputs, (x / 255 - {mean}) / {std}, not on [-1, 1].'.format(
        mean=IMAGENET_MEAN, std=IMAGENET_STD))

_LAYER = re.compile(r'^encoder\.layers\.encoder_layer_(\d+)\.')
# Legacy (torchvision < 0.13) MLP names, which torchvision still loads.
_LEGACY_MLP = (('.mlp.linear_1.', '.mlp.0.'), ('.mlp.linear_2.', '.mlp.3.'))


def imagenet_normalize(images_NHWC):
  """[-1, 1] NHWC images -> torchvision's ImageNet mean/std inputs.

  Only for parameters loaded with `fold_normalization=False`.
  """
  mean = np.asarray(IMAGENET_MEAN, np.float32)
  std = np.asarray(IMAGENET_STD, np.float32)
  return ((images_NHWC + 1) / 2 - mean) / std


def _normalization_for_minus1_1() -> Tuple[np.ndarray, np.ndarray]:
  """(scale, offset) with torchvision's input = scale * x + offset."""
  mean = np.asarray(IMAGENET_MEAN, np.float64)
  std = np.asarray(IMAGENET_STD, np.float64)
  return 0.5 / std, (0.5 - mean) / std


def read_state_dict(
    state_dict_or_path: Union[str, os.PathLike, Mapping[str, Any]]
) -> Dict[str, np.ndarray]:
  """A torchvision ViT state dict (or file of one) as float32 numpy arrays.

  Accepts a mapping, a `torch.save` file or a `.safetensors` file; unwraps
  `{'model': state_dict, ...}` training checkpoints and DDP's `module.` prefix.
  """
  return torch_layouts.read_state_dict(
      state_dict_or_path, marker='conv_proj.weight', renames=_LEGACY_MLP)


def load_torchvision(
    state_dict_or_path: Union[str, os.PathLike, Mapping[str, Any]],
    *,
    num_heads: Optional[int] = None,
    fold_normalization: bool = True
) -> Tuple[Params, ml_collections.ConfigDict]:
  """Converts a torchvision `VisionTransformer` state dict.

  Sizes come from the shapes.

  Args:
    state_dict_or_path: `model.state_dict()` of `torchvision.models.vit_b_16`
      and friends, or a file of one (see `read_state_dict`).
    num_heads: attention heads; default by width (DEFAULT_NUM_HEADS).
    fold_normalization: fold torchvision's input normalisation into the patch
      embedding so the model takes [-1, 1] images.

  Returns:
    (params, model_config): numpy float32 parameters under our names and the
    `VisionTransformer` fields whose output is torchvision's logits.

  Raises:
    CheckpointError: missing or unexpected weights, inconsistent shapes, a
      conv-stem variant, or a width with no default head count.
  """
  w = read_state_dict(state_dict_or_path)
  _check_is_torchvision_vit(w)
  hidden, _, ph, pw = w['conv_proj.weight'].shape
  num_layers = _num_layers(w)
  num_heads = _num_heads(hidden, num_heads)
  has_head = 'heads.head.weight' in w
  has_pre_logits = 'heads.pre_logits.weight' in w
  _check_names(w, num_layers, has_head=has_head, has_pre_logits=has_pre_logits)
  mlp_dim = w['encoder.layers.encoder_layer_0.mlp.0.weight'].shape[0]
  _check_shapes(w, num_layers, hidden=hidden, mlp_dim=mlp_dim)

  params = _params(w, num_layers, num_heads)
  if fold_normalization:
    params['embedding'] = torch_layouts.fold_input_normalization(
        params['embedding'], *_normalization_for_minus1_1())
  return params, converter_output.model_config(
      params,
      model_name='torchvision',
      patch=(int(ph), int(pw)),
      hidden_size=int(hidden),
      num_layers=num_layers,
      mlp_dim=int(mlp_dim),
      num_heads=int(num_heads),
      dropout_rate=0.,
      attention_dropout_rate=0.,
      layernorm_epsilon=LAYERNORM_EPSILON,
      approximate_gelu=False)


def _check_is_torchvision_vit(w: Mapping[str, np.ndarray]) -> None:
  """A patch-embedding ViT with torchvision's names, or CheckpointError."""
  if any(n.startswith('conv_proj.conv_') for n in w):
    raise checkpoint.CheckpointError(
        'The state dict has a convolutional stem (conv_proj.conv_bn_relu_*, '
        'torchvision conv_stem_configs), which this ViT does not have.')
  for name in ('conv_proj.weight', 'encoder.pos_embedding'):
    if name not in w:
      raise checkpoint.CheckpointError(
          f'The state dict has no {name!r}; it is not a torchvision '
          f'VisionTransformer (keys start {sorted(w)[:6]}). Pass '
          '`torchvision.models.vit_b_16(...).state_dict()` or a file of one.')


def _num_layers(w: Mapping[str, np.ndarray]) -> int:
  """The number of encoder layers, checked to be numbered from 0."""
  layer_ids = sorted({int(m.group(1)) for n in w if (m := _LAYER.match(n))})
  num_layers = len(layer_ids)
  if layer_ids != list(range(num_layers)):
    raise checkpoint.CheckpointError(
        f'Encoder layers {layer_ids} are not numbered 0..{num_layers - 1}.')
  return num_layers


def _num_heads(hidden: int, num_heads: Optional[int]) -> int:
  """`num_heads`, or the default of the width; checked to divide it."""
  if num_heads is None:
    if hidden not in DEFAULT_NUM_HEADS:
      raise checkpoint.CheckpointError(
          f'Width {hidden} has no default number of heads (known: '
          f'{DEFAULT_NUM_HEADS}); pass num_heads=...')
    num_heads = DEFAULT_NUM_HEADS[hidden]
  if hidden % num_heads:
    raise checkpoint.CheckpointError(
        f'num_heads={num_heads} does not divide the width {hidden}.')
  return num_heads


def _check_names(w: Mapping[str, np.ndarray], num_layers: int, *,
                 has_head: bool, has_pre_logits: bool) -> None:
  """The state dict holds exactly the weights of its ViT."""
  expected = _expected_names(num_layers, has_head, has_pre_logits)
  missing = sorted(set(expected) - set(w))
  unexpected = sorted(set(w) - set(expected))
  if missing or unexpected:
    raise checkpoint.CheckpointError(
        'The state dict does not form a torchvision VisionTransformer:' +
        (f'\n  missing: {_short_list(missing)}' if missing else '') +
        (f'\n  unexpected: {_short_list(unexpected)}' if unexpected else '') +
        '\nPass the complete `model.state_dict()`.')


def _params(w: Mapping[str, np.ndarray], num_layers: int,
            num_heads: int) -> Params:
  """The state dict (checked) -> our parameter tree."""
  pre_logits = head = None
  if 'heads.pre_logits.weight' in w:
    pre_logits = torch_layouts.dense_from_linear(w['heads.pre_logits.weight'],
                                                 w['heads.pre_logits.bias'])
  if 'heads.head.weight' in w:
    head = torch_layouts.dense_from_linear(w['heads.head.weight'],
                                           w['heads.head.bias'])
  return converter_output.params_tree(
      embedding=torch_layouts.conv_from_torch(w['conv_proj.weight'],
                                              w['conv_proj.bias']),
      cls=w['class_token'],
      pos_embedding=w['encoder.pos_embedding'],
      encoder_norm=_layernorm(w, 'encoder.ln'),
      blocks=[
          _block(w, f'encoder.layers.encoder_layer_{i}.', num_heads)
          for i in range(num_layers)
      ],
      pre_logits=pre_logits,
      head=head)


def _expected_names(num_layers: int, has_head: bool, has_pre_logits: bool):
  names = [
      'conv_proj.weight', 'conv_proj.bias', 'class_token',
      'encoder.pos_embedding', 'encoder.ln.weight', 'encoder.ln.bias'
  ]
  for i in range(num_layers):
    p = f'encoder.layers.encoder_layer_{i}.'
    names += [
        p + 'ln_1.weight', p + 'ln_1.bias', p + 'self_attention.in_proj_weight',
        p + 'self_attention.in_proj_bias', p + 'self_attention.out_proj.weight',
        p + 'self_attention.out_proj.bias', p + 'ln_2.weight', p + 'ln_2.bias',
        p + 'mlp.0.weight', p + 'mlp.0.bias', p + 'mlp.3.weight',
        p + 'mlp.3.bias'
    ]
  if has_pre_logits:
    names += ['heads.pre_logits.weight', 'heads.pre_logits.bias']
  if has_head:
    names += ['heads.head.weight', 'heads.head.bias']
  return names


def _short_list(names, limit: int = 12) -> str:
  more = f' ... and {len(names) - limit} more' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


def _layernorm(w, name: str) -> Params:
  return {'scale': w[f'{name}.weight'], 'bias': w[f'{name}.bias']}


def _block(w, prefix: str, num_heads: int) -> Params:
  in_w = w[prefix + 'self_attention.in_proj_weight']
  in_b = w[prefix + 'self_attention.in_proj_bias']
  d = in_w.shape[1]  # Rows: q, k, v stacked.
  attention = {}
  for j, name in enumerate(('query', 'key', 'value')):
    attention[name] = torch_layouts.attention_from_linear(
        in_w[j * d:(j + 1) * d], in_b[j * d:(j + 1) * d], num_heads)
  attention['out'] = torch_layouts.attention_from_linear(
      w[prefix + 'self_attention.out_proj.weight'],
      w[prefix + 'self_attention.out_proj.bias'],
      num_heads,
      is_out=True)
  return {
      'LayerNorm_0': _layernorm(w, prefix + 'ln_1'),
      'MultiHeadDotProductAttention_0': attention,
      'LayerNorm_1': _layernorm(w, prefix + 'ln_2'),
      'MlpBlock_0': {
          'Dense_0':
              torch_layouts.dense_from_linear(w[prefix + 'mlp.0.weight'],
                                              w[prefix + 'mlp.0.bias']),
          'Dense_1':
              torch_layouts.dense_from_linear(w[prefix + 'mlp.3.weight'],
                                              w[prefix + 'mlp.3.bias']),
      },
  }


def _check_shapes(w: Mapping[str, np.ndarray], num_layers: int, *, hidden: int,
                  mlp_dim: int) -> None:
  """Every tensor against the sizes read from conv_proj and mlp.0."""
  d, m = hidden, mlp_dim
  want = {
      'conv_proj.bias': (d,),
      'class_token': (1, 1, d),
      'encoder.ln.weight': (d,),
      'encoder.ln.bias': (d,)
  }
  for i in range(num_layers):
    p = f'encoder.layers.encoder_layer_{i}.'
    want.update({
        p + 'ln_1.weight': (d,),
        p + 'ln_1.bias': (d,),
        p + 'self_attention.in_proj_weight': (3 * d, d),
        p + 'self_attention.in_proj_bias': (3 * d,),
        p + 'self_attention.out_proj.weight': (d, d),
        p + 'self_attention.out_proj.bias': (d,),
        p + 'ln_2.weight': (d,),
        p + 'ln_2.bias': (d,),
        p + 'mlp.0.weight': (m, d),
        p + 'mlp.0.bias': (m,),
        p + 'mlp.3.weight': (d, m),
        p + 'mlp.3.bias': (d,),
    })
  features = d
  if 'heads.pre_logits.weight' in w:
    features = w['heads.pre_logits.weight'].shape[0]
    want.update({
        'heads.pre_logits.weight': (features, d),
        'heads.pre_logits.bias': (features,)
    })
  if 'heads.head.weight' in w:
    num_classes = w['heads.head.weight'].shape[0]
    want.update({
        'heads.head.weight': (num_classes, features),
        'heads.head.bias': (num_classes,)
    })
  pe = w['encoder.pos_embedding'].shape
  if len(pe) != 3 or pe[0] != 1 or pe[2] != d:
    want['encoder.pos_embedding'] = (1, 'tokens', d)
  wrong = [
      f'{n}: {tuple(w[n].shape)}, expected {want[n]}' for n in want
      if tuple(w[n].shape) != want[n]
  ]
  if wrong:
    raise checkpoint.CheckpointError(
        f'Shapes do not fit a ViT of width {d} (conv_proj) and MLP width {m} '
        '(encoder_layer_0.mlp.0):\n  ' + '\n  '.join(wrong))

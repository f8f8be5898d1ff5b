"""This project's ViT -> a Hugging Face `transformers` ViT directory.

The inverse of `convert_hf.load_hf`; docs/interop.md lists the differences
between the two models.
"""

import json
import math
import os
import re
from typing import (
    Any,
    Dict,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import flax.linen as nn
import numpy as np

from vit_jax import checkpoint
from vit_jax.checkpoints import npz
from vit_jax.checkpoints import torch_layouts
from vit_jax.checkpoints import trees
from vit_jax.interop import hf_format

Params = Dict[str, Any]
PathLike = Union[str, os.PathLike]


def _field(model_config, name: str, default=None):
  """A VisionTransformer field from a ConfigDict, a dict or the module."""
  if isinstance(model_config, nn.Module):
    return getattr(model_config, name, default)
  return model_config.get(name, default)


def save_hf(params: Mapping[str, Any],
            model_config,
            path: PathLike,
            *,
            id2label: Optional[Union[Mapping[int, str], Sequence[str]]] = None,
            image_size: Optional[Union[int, Sequence[int]]] = None) -> None:
  """Writes a Hugging Face model directory of our parameters.

  Writes `config.json` (with our numerics), `model.safetensors` and a
  `preprocessor_config.json` normalising to [-1, 1]. A model with a head
  becomes a `ViTForImageClassification`, one without a `ViTModel` (whose
  pooler is our `pre_logits`; without one, load it with
  `add_pooling_layer=False`).

  Args:
    params: the parameters (numpy or jax; any naming or block layout).
    model_config: the `VisionTransformer` fields (ConfigDict or dict) or the
      module.
    path: the directory to write (created if needed; files replaced).
    id2label: class names, {index: name} or a list; default `LABEL_{i}`.
    image_size: int or (h, w); default: from the (square) position embedding.

  Raises:
    ValueError: a model HF's ViT cannot express (classifier other than
      'token', a ResNet stem, a non-learned position embedding, `pre_logits`
      before a head), or bad `id2label`/`image_size`.
  """
  num_classes, representation_size = _exportable(model_config)
  tree, layers = _float_tree(params, num_classes, representation_size)
  shapes = _read_shapes(tree)
  image_hw = _image_size(image_size, shapes.num_tokens, shapes.patch)

  weights = _hf_weights(tree, layers, num_classes, representation_size)
  prefix = 'vit.' if num_classes else ''
  weights = {
      (k if k.startswith('classifier.') else prefix + k): v
      for k, v in weights.items()
  }

  labels = _id2label(id2label, num_classes)
  config = _hf_config(
      model_config,
      shapes,
      num_layers=len(layers),
      image_hw=image_hw,
      num_classes=num_classes,
      representation_size=representation_size)
  if labels is not None:
    config['id2label'] = {str(k): v for k, v in labels.items()}
    config['label2id'] = {v: k for k, v in labels.items()}
  _write_files(path, weights, config,
               _preprocessor_config(image_hw, shapes.channels))


def _exportable(model_config) -> Tuple[int, Any]:
  """(num_classes, representation_size) of a model HF's ViT can express."""
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
  return num_classes, representation_size


def _float_tree(params: Mapping[str, Any], num_classes: int,
                representation_size) -> Tuple[Params, List[int]]:
  """Our float32 tree under linen names, and its encoder block indices."""
  tree = npz.canonicalize(params)
  flat = {
      k: np.asarray(v, np.float32) for k, v in trees.flatten_tree(tree).items()
  }
  tree = checkpoint.recover_tree(list(flat), list(flat.values()))
  transformer = tree.get('Transformer', {})
  layers = sorted(
      int(k.rsplit('_', 1)[1])
      for k in transformer
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
  return tree, layers


class _Shapes(NamedTuple):
  """The sizes of the model, read off its parameters."""
  patch: Tuple[int, int]
  channels: int
  hidden: int
  num_heads: int
  mlp_dim: int
  num_tokens: int


def _read_shapes(tree: Params) -> _Shapes:
  """Patch, channels, width, heads, MLP width and tokens of `tree`."""
  transformer = tree['Transformer']
  ph, pw, channels, hidden = tree['embedding']['kernel'].shape
  query = transformer['encoderblock_0']['MultiHeadDotProductAttention_0'][
      'query']['kernel']
  num_heads = query.shape[1]
  mlp_dim = transformer['encoderblock_0']['MlpBlock_0']['Dense_0'][
      'kernel'].shape[1]
  num_tokens = transformer['posembed_input']['pos_embedding'].shape[1] - 1
  return _Shapes(
      patch=(ph, pw),
      channels=channels,
      hidden=hidden,
      num_heads=num_heads,
      mlp_dim=mlp_dim,
      num_tokens=num_tokens)


def _hf_config(model_config, shapes: _Shapes, *, num_layers: int,
               image_hw: Tuple[int, int], num_classes: int,
               representation_size) -> Dict[str, Any]:
  """`config.json` (without labels): our sizes and numerics in HF's names."""
  ph, pw = shapes.patch
  transformer_config = _field(model_config, 'transformer') or {}
  return {
      'architectures': [
          'ViTForImageClassification' if num_classes else 'ViTModel'
      ],
      'model_type':
          hf_format.MODEL_TYPE,
      'hidden_size':
          int(shapes.hidden),
      'num_hidden_layers':
          num_layers,
      'num_attention_heads':
          int(shapes.num_heads),
      'intermediate_size':
          int(shapes.mlp_dim),
      'hidden_act': ('gelu_pytorch_tanh' if _field(
          model_config, 'approximate_gelu', True) else 'gelu'),
      'hidden_dropout_prob':
          float(transformer_config.get('dropout_rate', 0.)),
      'attention_probs_dropout_prob':
          float(transformer_config.get('attention_dropout_rate', 0.)),
      'layer_norm_eps':
          float(_field(model_config, 'layernorm_epsilon', 1e-6)),
      'image_size':
          (image_hw[0] if image_hw[0] == image_hw[1] else list(image_hw)),
      'patch_size':
          int(ph) if ph == pw else [int(ph), int(pw)],
      'num_channels':
          int(shapes.channels),
      'qkv_bias':
          True,
      'encoder_stride':
          int(ph),
      'pooler_output_size':
          int(representation_size or shapes.hidden),
      'pooler_act':
          'tanh',
      'initializer_range':
          0.02,
      'dtype':
          'float32',
  }


def _preprocessor_config(image_hw: Tuple[int, int],
                         channels: int) -> Dict[str, Any]:
  """`preprocessor_config.json`: a ViTImageProcessor giving [-1, 1] pixels."""
  return {
      'image_processor_type': 'ViTImageProcessor',
      'do_resize': True,
      'size': {
          'height': image_hw[0],
          'width': image_hw[1]
      },
      'resample': 2,  # bilinear
      'do_rescale': True,
      'rescale_factor': 1 / 255,
      'do_normalize': True,
      # (p / 255 - 0.5) / 0.5 = (p - 127.5) / 127.5: our [-1, 1] scaling.
      'image_mean': [0.5] * channels,
      'image_std': [0.5] * channels,
  }


def _write_files(path: PathLike, weights: Mapping[str, np.ndarray],
                 config: Mapping[str, Any], preprocessor: Mapping[str,
                                                                  Any]) -> None:
  """Writes the safetensors weights and the two JSON configs into `path`."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  safetensors_numpy.save_file(
      {
          k: np.ascontiguousarray(v) for k, v in weights.items()
      },
      os.path.join(path, hf_format.SAFETENSORS_NAME),
      # transformers refuses safetensors files without a framework tag.
      metadata={'format': 'pt'})
  for name, content in ((hf_format.CONFIG_NAME, config),
                        (hf_format.PREPROCESSOR_NAME, preprocessor)):
    with open(os.path.join(path, name), 'w', encoding='utf-8') as f:
      json.dump(content, f, indent=2, sort_keys=True)
      f.write('\n')


def _image_size(image_size, num_tokens: int,
                patch: Tuple[int, int]) -> Tuple[int, int]:
  if image_size is not None:
    h, w = hf_format.as_pair(image_size)
    if h % patch[0] or w % patch[1] or ((h // patch[0]) *
                                        (w // patch[1]) != num_tokens):
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
      'embeddings.cls_token':
          tree['cls'],
      'embeddings.position_embeddings':
          transformer['posembed_input']['pos_embedding'],
      'embeddings.patch_embeddings.projection.weight':
          kernel.transpose(3, 2, 0, 1),
      'embeddings.patch_embeddings.projection.bias':
          tree['embedding']['bias'],
      'layernorm.weight':
          transformer['encoder_norm']['scale'],
      'layernorm.bias':
          transformer['encoder_norm']['bias'],
  }
  for i in layers:
    block = transformer[f'encoderblock_{i}']
    for module, ours in hf_format.BLOCK_MODULES:
      node = block
      for part in ours.split('/'):
        node = node[part]
      name = f'encoder.layer.{i}.{module}'
      if ours.startswith('LayerNorm'):
        weights[f'{name}.weight'] = node['scale']
        weights[f'{name}.bias'] = node['bias']
        continue
      if ours.startswith('MultiHeadDotProductAttention'):
        weight, bias = torch_layouts.linear_from_attention(
            node, is_out=ours.endswith('/out'))
      else:
        weight, bias = torch_layouts.linear_from_dense(node)
      weights[f'{name}.weight'] = weight
      weights[f'{name}.bias'] = bias
  if representation_size is not None:
    weights['pooler.dense.weight'], weights['pooler.dense.bias'] = (
        torch_layouts.linear_from_dense(tree['pre_logits']))
  if num_classes:
    weights['classifier.weight'], weights['classifier.bias'] = (
        torch_layouts.linear_from_dense(tree['head']))
  return weights

"""timm `VisionTransformer` state dicts <-> this project's ViT.

timm's ViT is the paper's network under its own names (`patch_embed.proj`,
`cls_token`, `pos_embed`, `blocks.{i}.*` with a stacked `attn.qkv`, `norm`,
`head`, older `pre_logits.fc`), with LayerNorm eps 1e-6 and the exact GELU.
Also read: GAP models, attention without q/k/v bias, and layer scale (folded
into `attn.proj` and `mlp.fc2`). Head counts come from the model recognised
by its shapes (`TIMM_MODELS`), else from the width.
"""

import re
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import ml_collections
import numpy as np

from vit_jax.checkpoints import converter_output
from vit_jax.checkpoints import npz
from vit_jax.checkpoints import torch_layouts
from vit_jax.checkpoints import trees
from vit_jax.checkpoints.trees import CheckpointError

Params = Dict[str, Any]
LAYERNORM_EPSILON = 1e-6
# Width -> heads of the class-token zoo models, for widths not in the table.
DEFAULT_NUM_HEADS = {
    192: 3,
    384: 6,
    512: 8,
    640: 10,
    768: 12,
    1024: 16,
    1280: 16,
    1408: 16,
    1664: 16
}

# timm.create_model name: (width, depth, heads, mlp_dim, patch, image size,
# gap, qkv_bias, layer_scale); checked against timm by the tests.
TIMM_MODELS = {
    f'vit_{size}_patch{p}_{s}': (d, depth, h, 4 * d, p, s, False, True, False)
    for size, d, depth, h, ps in (('tiny', 192, 12, 3, ((16, 224), (16, 384))),
                                  ('small', 384, 12, 6,
                                   ((32, 224), (32, 384), (16, 224), (16, 384),
                                    (8, 224))), ('base', 768, 12, 12,
                                                 ((32, 224), (32, 384),
                                                  (16, 224), (16, 384), (8,
                                                                         224))),
                                  ('large', 1024, 24, 16,
                                   ((32, 224), (32, 384), (16, 224), (16, 384),
                                    (14, 224))), ('huge', 1280, 32, 16,
                                                  ((14, 224),))) for p, s in ps
}
TIMM_MODELS.update({
    'vit_giant_patch14_224': (1408, 40, 16, 6144, 14, 224, False, True, False),
    'vit_gigantic_patch14_224':
        (1664, 48, 16, 8192, 14, 224, False, True, False),
    'vit_base_patch16_gap_224': (768, 12, 16, 3072, 16, 224, True, True, False),
    'vit_betwixt_patch16_gap_256':
        (640, 12, 10, 2560, 16, 256, True, False, True),
    'vit_huge_patch14_gap_224':
        (1280, 32, 16, 5120, 14, 224, True, True, False),
    'vit_huge_patch16_gap_448':
        (1280, 32, 16, 5120, 16, 448, True, True, False),
    'vit_giant_patch16_gap_224':
        (1408, 40, 16, 6144, 16, 224, True, True, False),
})
TIMM_MODELS.update({
    f'vit_medium_patch16_gap_{s}': (512, 12, 8, 2048, 16, s, True, False, True)
    for s in (240, 256, 384)
})

_BLOCK = re.compile(r'^blocks\.(\d+)\.')
_BLOCK_PARTS = ('norm1.weight', 'norm1.bias', 'attn.qkv.weight',
                'attn.qkv.bias', 'attn.proj.weight', 'attn.proj.bias',
                'ls1.gamma', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight',
                'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias', 'ls2.gamma')
_TOP = ('cls_token', 'pos_embed', 'patch_embed.proj.weight',
        'patch_embed.proj.bias', 'norm.weight', 'norm.bias',
        'pre_logits.fc.weight', 'pre_logits.fc.bias', 'head.weight',
        'head.bias')
# Parts of other timm models, named in the error.
_OTHER = (('patch_embed.backbone.', 'a ResNet hybrid (vit_*_r50_*, '
           'vit_*_r26_*), whose ResNetV2 stem is not mapped; convert its '
           'released .npz instead'),
          ('fc_norm.', 'a LayerNorm after the pooling (fc_norm: MAE, BEiT '
           'style), which this model does not have'),
          ('dist_token', 'DeiT distillation (dist_token, head_dist)'),
          ('reg_token', 'register tokens (reg_token)'),
          ('norm_pre.', 'a LayerNorm before the blocks (norm_pre: CLIP)'),
          ('attn_pool.', 'attention pooling (attn_pool: SigLIP, MAP)'),
          ('.q_norm.', 'q/k normalisation (attn.q_norm)'))


class TimmModel(NamedTuple):
  """A `timm.create_model(name, **kwargs)` call."""
  name: str
  kwargs: Dict[str, Any]

  def __str__(self):
    args = ''.join(f', {k}={v!r}' for k, v in self.kwargs.items())
    return f'timm.create_model({self.name!r}{args})'


def is_timm_state_dict(names) -> bool:
  return 'pos_embed' in names and any(
      n.startswith('patch_embed.') for n in names)


def read(state_or_path) -> Tuple[Params, ml_collections.ConfigDict, TimmModel]:
  """A timm ViT state dict (mapping, `.pth` or `.safetensors`) -> ours.

  Returns (params, model_config, timm_model): float32 numpy parameters
  under our names, the `VisionTransformer` fields, and the recognised timm
  model. Raises CheckpointError for non-ViTs and unsupported variants.
  """
  w = torch_layouts.read_state_dict(state_or_path, marker='pos_embed')
  if not is_timm_state_dict(w):
    raise CheckpointError(
        'The state dict is not a timm VisionTransformer (no pos_embed and '
        f'patch_embed.proj; its names start {sorted(w)[:5]}). timm ViT '
        'weights, torch.save(model.state_dict()) or .safetensors, are read '
        'here; torchvision and Hugging Face ones with '
        'vit_jax.interop.convert_torchvision / convert_hf.')
  for part, what in _OTHER:
    if any(part in n or n.startswith(part) for n in w):
      raise CheckpointError(
          f'The timm state dict has {what}. Plain timm ViTs are read: class '
          'token or global average pooling without fc_norm, with or without '
          'pre_logits.')
  hidden, _, ph, pw = w['patch_embed.proj.weight'].shape
  ids = sorted({int(m.group(1)) for n in w if (m := _BLOCK.match(n))})
  if ids != list(range(len(ids))) or not ids:
    raise CheckpointError(f'timm blocks {ids} are not numbered 0..n-1.')
  unknown = sorted(
      n for n in w if n not in _TOP and
      not (_BLOCK.match(n) and n.split('.', 2)[2] in _BLOCK_PARTS))
  if unknown:
    raise CheckpointError(
        f'The timm state dict has weights this ViT has no place for: '
        f'{", ".join(unknown[:8])}. Pass a plain timm VisionTransformer.')
  gap = 'cls_token' not in w
  mlp_dim = w['blocks.0.mlp.fc1.weight'].shape[0]
  grid = w['pos_embed'].shape[1] - (0 if gap else 1)
  timm_model = recognise(
      hidden=hidden,
      depth=len(ids),
      mlp_dim=mlp_dim,
      patch=ph,
      grid=grid,
      gap=gap,
      qkv_bias='blocks.0.attn.qkv.bias' in w,
      layer_scale='blocks.0.ls1.gamma' in w,
      num_classes=w['head.weight'].shape[0] if 'head.weight' in w else 0)
  heads = timm_model.kwargs.get('num_heads',
                                TIMM_MODELS.get(timm_model.name, (0, 0, 0))[2])
  params = _params(w, len(ids), heads)
  return params, converter_output.model_config(
      params,
      model_name=timm_model.name,
      patch=(int(ph), int(pw)),
      hidden_size=int(hidden),
      num_layers=len(ids),
      mlp_dim=int(mlp_dim),
      num_heads=int(heads),
      dropout_rate=0.,
      attention_dropout_rate=0.,
      layernorm_epsilon=LAYERNORM_EPSILON,
      approximate_gelu=False,
      classifier='gap' if gap else 'token'), timm_model


def recognise(*,
              hidden,
              depth,
              mlp_dim,
              patch,
              grid,
              gap,
              qkv_bias=True,
              layer_scale=False,
              num_heads=None,
              num_classes=0) -> TimmModel:
  """The timm model of these sizes: a `TIMM_MODELS` name with the kwargs
  that differ from it (depth, image size, heads), else a generic one."""
  side = int(round(grid**0.5))
  if side * side != grid:
    raise CheckpointError(f'The position embedding has {grid} patch rows, '
                          'not a square grid; timm ViTs are square.')
  image = side * patch
  candidates = [
      (n, c)
      for n, c in TIMM_MODELS.items()
      if c[0] == hidden and c[3] == mlp_dim and c[4] == patch and c[6] == gap
      and c[7] == qkv_bias and c[8] == layer_scale and num_heads in (None, c[2])
  ]
  candidates.sort(key=lambda nc: (nc[1][1] != depth, nc[1][5] != image))
  kwargs = {'num_classes': int(num_classes)}
  if candidates:
    name, c = candidates[0]
  else:
    name = 'vit_base_patch16_gap_224' if gap else 'vit_base_patch16_224'
    c = TIMM_MODELS[name]
    if num_heads is None and hidden not in DEFAULT_NUM_HEADS:
      raise CheckpointError(
          f'Width {hidden} is no timm zoo width; the number of heads is '
          'not in the state dict.')
    kwargs.update(
        patch_size=int(patch),
        embed_dim=int(hidden),
        num_heads=int(num_heads or DEFAULT_NUM_HEADS[hidden]),
        mlp_ratio=mlp_dim / hidden)
    if not qkv_bias:
      kwargs['qkv_bias'] = False
    if layer_scale:
      kwargs['init_values'] = 1.0
  if c[1] != depth:
    kwargs['depth'] = int(depth)
  if c[5] != image:
    kwargs['img_size'] = int(image)
  return TimmModel(name, kwargs)


def _params(w: Mapping[str, np.ndarray], depth: int, heads: int) -> Params:
  """The checked state dict -> our parameter tree."""
  dense = torch_layouts.dense_from_linear
  hidden = w['patch_embed.proj.weight'].shape[0]
  blocks = []
  for i in range(depth):
    p = f'blocks.{i}.'
    qkv_w = w[p + 'attn.qkv.weight']
    qkv_b = w.get(p + 'attn.qkv.bias', np.zeros(3 * hidden, np.float32))
    ls1 = w.get(p + 'ls1.gamma', np.ones(hidden, np.float32))[:, None]
    ls2 = w.get(p + 'ls2.gamma', np.ones(hidden, np.float32))[:, None]
    attention = {
        name:
            torch_layouts.attention_from_linear(
                qkv_w[j * hidden:(j + 1) * hidden],
                qkv_b[j * hidden:(j + 1) * hidden], heads)
        for j, name in enumerate(('query', 'key', 'value'))
    }
    attention['out'] = torch_layouts.attention_from_linear(
        w[p + 'attn.proj.weight'] * ls1,
        w[p + 'attn.proj.bias'] * ls1[:, 0],
        heads,
        is_out=True)
    blocks.append({
        'LayerNorm_0': _layernorm(w, p + 'norm1'),
        'MultiHeadDotProductAttention_0': attention,
        'LayerNorm_1': _layernorm(w, p + 'norm2'),
        'MlpBlock_0': {
            'Dense_0':
                dense(w[p + 'mlp.fc1.weight'], w[p + 'mlp.fc1.bias']),
            'Dense_1':
                dense(w[p + 'mlp.fc2.weight'] * ls2,
                      w[p + 'mlp.fc2.bias'] * ls2[:, 0])
        }
    })
  optional = {
      name: dense(w[f'{key}.weight'], w[f'{key}.bias'])
      for name, key in (('pre_logits', 'pre_logits.fc'), ('head', 'head'))
      if f'{key}.weight' in w
  }
  return converter_output.params_tree(
      embedding=torch_layouts.conv_from_torch(
          w['patch_embed.proj.weight'],
          w.get('patch_embed.proj.bias', np.zeros(hidden, np.float32))),
      cls=w.get('cls_token'),
      pos_embedding=w['pos_embed'],
      encoder_norm=_layernorm(w, 'norm'),
      blocks=blocks,
      **optional)


def _layernorm(w, name: str) -> Params:
  return {'scale': w[f'{name}.weight'], 'bias': w[f'{name}.bias']}


def to_timm(
    params: Params,
    *,
    num_heads: Optional[int] = None) -> Tuple[Dict[str, np.ndarray], TimmModel]:
  """Our per-layer ViT parameters -> (timm state dict, the
  `timm.create_model` call that loads it strictly).

  Raises CheckpointError for what timm cannot build (`pre_logits`, a ResNet
  stem, no learned position embedding).
  """
  if trees.flatten_tree(params.get('pre_logits', {})):
    raise CheckpointError(
        'The model has a representation layer (pre_logits), which current '
        'timm ViTs do not build. Fine-tune with representation_size=None, '
        'or export the released .npz (checkpoint.save) instead.')
  if 'conv_root' in params or 'posembed_input' not in params.get(
      'Transformer', {}):
    raise CheckpointError(
        'Only plain ViTs with a learned position embedding are exported to '
        'timm (no ResNet stem, no sin-cos table).')
  params = npz.canonicalize(trees.to_dict(params))
  out = {}
  link = torch_layouts.linear_from_dense
  transformer = params['Transformer']
  depth = sum(1 for k in transformer if k.startswith('encoderblock_'))
  for i in range(depth):
    block, p = transformer[f'encoderblock_{i}'], f'blocks.{i}.'
    att = block['MultiHeadDotProductAttention_0']
    qkv = [
        torch_layouts.linear_from_attention(att[n], is_out=False)
        for n in ('query', 'key', 'value')
    ]
    out[p + 'norm1.weight'], out[p + 'norm1.bias'] = _norm(block, 0)
    out[p + 'attn.qkv.weight'] = np.concatenate([q[0] for q in qkv])
    out[p + 'attn.qkv.bias'] = np.concatenate([q[1] for q in qkv])
    out[p + 'attn.proj.weight'], out[p + 'attn.proj.bias'] = (
        torch_layouts.linear_from_attention(att['out'], is_out=True))
    out[p + 'norm2.weight'], out[p + 'norm2.bias'] = _norm(block, 1)
    mlp = block['MlpBlock_0']
    out[p + 'mlp.fc1.weight'], out[p + 'mlp.fc1.bias'] = link(mlp['Dense_0'])
    out[p + 'mlp.fc2.weight'], out[p + 'mlp.fc2.bias'] = link(mlp['Dense_1'])
  kernel = np.asarray(params['embedding']['kernel'], np.float32)
  out['patch_embed.proj.weight'] = np.ascontiguousarray(
      kernel.transpose(3, 2, 0, 1))
  out['patch_embed.proj.bias'] = np.asarray(params['embedding']['bias'],
                                            np.float32)
  posemb = np.asarray(transformer['posembed_input']['pos_embedding'],
                      np.float32)
  out['pos_embed'] = posemb
  if 'cls' in params:
    out['cls_token'] = np.asarray(params['cls'], np.float32)
  norm = transformer['encoder_norm']
  out['norm.weight'] = np.asarray(norm['scale'], np.float32)
  out['norm.bias'] = np.asarray(norm['bias'], np.float32)
  if 'head' in params:
    out['head.weight'], out['head.bias'] = link(params['head'])
  query = transformer['encoderblock_0']['MultiHeadDotProductAttention_0']
  hidden, heads = np.shape(query['query']['kernel'])[:2]
  timm_model = recognise(
      hidden=hidden,
      depth=depth,
      patch=kernel.shape[0],
      mlp_dim=out['blocks.0.mlp.fc1.weight'].shape[0],
      grid=posemb.shape[1] - int('cls' in params),
      gap='cls' not in params,
      num_heads=num_heads or heads,
      num_classes=out['head.weight'].shape[0] if 'head' in params else 0)
  return out, timm_model


def _norm(block, i: int) -> Tuple[np.ndarray, np.ndarray]:
  ln = block[f'LayerNorm_{i}']
  return (np.asarray(ln['scale'],
                     np.float32), np.asarray(ln['bias'], np.float32))

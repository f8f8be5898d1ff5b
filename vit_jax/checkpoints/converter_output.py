"""What every PyTorch ViT converter returns: our parameter tree and config.

`convert_hf.load_hf`, `convert_torchvision.load_torchvision` and
`timm_layout.read` map the
PyTorch weights into flax layouts part by part (`torch_layouts`); these
functions assemble the parts into the nested parameter dict of
`models.VisionTransformer` (linen names) and the ConfigDict of its fields, so
that the converters return the same `(params, model_config)`:

  params = converter_output.params_tree(
      embedding=..., cls=..., pos_embedding=..., encoder_norm=...,
      blocks=[...], pre_logits=None, head=...)
  model_config = converter_output.model_config(
      params, model_name=..., patch=(16, 16), hidden_size=768, ...)
  models.VisionTransformer(**model_config).apply({'params': params}, x,
                                                 train=False)
"""

from typing import Any, Dict, Optional, Sequence, Tuple

import ml_collections

Params = Dict[str, Any]


def params_tree(*, embedding: Params, cls, pos_embedding,
                encoder_norm: Params, blocks: Sequence[Params],
                pre_logits: Optional[Params] = None,
                head: Optional[Params] = None) -> Params:
  """Our ViT's parameter tree of its converted parts.

  Args:
    embedding: the patch embedding {'kernel' (HWIO), 'bias'}.
    cls: the class token (1, 1, D), or None (global average pooling).
    pos_embedding: the position embedding (1, 1+N, D), class row first.
    encoder_norm: the final LayerNorm {'scale', 'bias'}.
    blocks: the encoder blocks in order, each under linen names.
    pre_logits: the representation layer (Dense), or None.
    head: the classifier (Dense), or None.

  Returns:
    {'embedding', 'cls', 'Transformer': {'posembed_input', 'encoder_norm',
    'encoderblock_{i}'...}, 'pre_logits'?, 'head'?}.
  """
  params: Params = {
      'embedding': embedding,
      'Transformer': {
          'posembed_input': {'pos_embedding': pos_embedding},
          'encoder_norm': encoder_norm,
      },
  }
  if cls is not None:
    params['cls'] = cls
  for i, block in enumerate(blocks):
    params['Transformer'][f'encoderblock_{i}'] = block
  if pre_logits is not None:
    params['pre_logits'] = pre_logits
  if head is not None:
    params['head'] = head
  return params


def model_config(params: Params, *, model_name: str, patch: Tuple[int, int],
                 hidden_size: int, num_layers: int, mlp_dim: int,
                 num_heads: int, dropout_rate: float,
                 attention_dropout_rate: float, layernorm_epsilon: float,
                 approximate_gelu: bool,
                 classifier: str = 'token') -> ml_collections.ConfigDict:
  """The `VisionTransformer` fields of a converted model.

  `num_classes` and `representation_size` come from the widths of `params`'
  `head` and `pre_logits` (None without them).

  Args:
    params: the tree of `params_tree`.
    model_name: the config's `model_name`.
    patch: the patch size (h, w).
    hidden_size: the width D.
    num_layers: encoder blocks.
    mlp_dim: the MLP width.
    num_heads: attention heads.
    dropout_rate: dropout after attention and in the MLP.
    attention_dropout_rate: dropout on the attention weights.
    layernorm_epsilon: the LayerNorms' epsilon.
    approximate_gelu: the tanh GELU (True) or the exact erf one.
    classifier: 'token' (token 0) or 'gap'.

  Returns:
    A ConfigDict for `models.VisionTransformer(**model_config)`.
  """
  return ml_collections.ConfigDict(dict(
      model_name=model_name,
      num_classes=(int(params['head']['bias'].shape[0]) if 'head' in params
                   else None),
      patches=ml_collections.ConfigDict({'size': patch}),
      hidden_size=hidden_size,
      transformer=ml_collections.ConfigDict(dict(
          num_layers=num_layers,
          mlp_dim=mlp_dim,
          num_heads=num_heads,
          dropout_rate=dropout_rate,
          attention_dropout_rate=attention_dropout_rate,
      )),
      representation_size=(int(params['pre_logits']['bias'].shape[0])
                           if 'pre_logits' in params else None),
      classifier=classifier,
      layernorm_epsilon=layernorm_epsilon,
      approximate_gelu=approximate_gelu,
  ))

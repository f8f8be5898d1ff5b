"""What every PyTorch ViT converter returns: our parameter tree and config.

The Hugging Face, torchvision and timm converters map their weights part by
part (`torch_layouts`) and assemble them here, so that all return the same
`(params, model_config)` for `models.VisionTransformer`.
"""

from typing import Any, Dict, Optional, Sequence, Tuple

import ml_collections

Params = Dict[str, Any]


def params_tree(*,
                embedding: Params,
                cls,
                pos_embedding,
                encoder_norm: Params,
                blocks: Sequence[Params],
                pre_logits: Optional[Params] = None,
                head: Optional[Params] = None) -> Params:
  """Our ViT's (linen-named) parameter tree of its converted parts.

  `cls` is (1, 1, D) or None (GAP); `pos_embedding` is (1, 1+N, D) with the
  class row first; `blocks` are the encoder blocks in order; `pre_logits`
  and `head` are Dense parameters or None.
  """
  params: Params = {
      'embedding': embedding,
      'Transformer': {
          'posembed_input': {
              'pos_embedding': pos_embedding
          },
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


def model_config(params: Params,
                 *,
                 model_name: str,
                 patch: Tuple[int, int],
                 hidden_size: int,
                 num_layers: int,
                 mlp_dim: int,
                 num_heads: int,
                 dropout_rate: float,
                 attention_dropout_rate: float,
                 layernorm_epsilon: float,
                 approximate_gelu: bool,
                 classifier: str = 'token') -> ml_collections.ConfigDict:
  """The `VisionTransformer` fields of a converted model, as a ConfigDict.

  `num_classes` and `representation_size` come from the widths of `params`'
  `head` and `pre_logits` (None without them).
  """
  return ml_collections.ConfigDict(
      dict(
          model_name=model_name,
          num_classes=(int(params['head']['bias'].shape[0])
                       if 'head' in params else None),
          patches=ml_collections.ConfigDict({'size': patch}),
          hidden_size=hidden_size,
          transformer=ml_collections.ConfigDict(
              dict(
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

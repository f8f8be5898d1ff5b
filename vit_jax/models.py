"""Model front door: the module classes, the zoo lookup and probes.

`models.VisionTransformer`, `models.MlpMixer` and `models.get_model(name)`
work as in the original; `get_model` also builds this project's models
(`vit_jax/configs/project_models.py`, e.g. the BiT ResNets).
"""

import difflib
from typing import Any, List

import jax
import ml_collections

from vit_jax import models_bit
from vit_jax import models_mixer
from vit_jax import models_resnet
from vit_jax import models_vit
from vit_jax.configs import project_models

AddPositionEmbs = models_vit.AddPositionEmbs
MlpBlock = models_vit.MlpBlock
Encoder1DBlock = models_vit.Encoder1DBlock
Encoder = models_vit.Encoder
VisionTransformer = models_vit.VisionTransformer
StdConv = models_resnet.StdConv
ResidualUnit = models_resnet.ResidualUnit
ResNetStage = models_resnet.ResNetStage
MlpMixer = models_mixer.MlpMixer
MixerBlock = models_mixer.MixerBlock
BitResNet = models_bit.BitResNet

# Both registries: the original's names and this project's.
MODEL_CONFIGS = project_models.ALL_MODEL_CONFIGS


def canonical_name(name: str) -> str:
  """Maps 'ViT-B/16' or 'vit-b_16' to the zoo name 'ViT-B_16'; fails clearly."""
  if name in MODEL_CONFIGS:
    return name
  candidate = name.replace('/', '_')
  by_lower = {k.lower(): k for k in MODEL_CONFIGS}
  if candidate.lower() in by_lower:
    return by_lower[candidate.lower()]
  close = difflib.get_close_matches(candidate, list(MODEL_CONFIGS), n=3)
  raise ValueError(f'Unknown model name {name!r}.' +
                   (f' Did you mean {", ".join(close)}?' if close else '') +
                   f' Known models: {", ".join(sorted(MODEL_CONFIGS))}.')


def get_model(name: str, **kw):
  """Builds the zoo model `name` ('ViT-B_16', 'ViT-B/16', 'Mixer-B_16', ...).

  `kw` sets or overrides module fields, e.g. `num_classes=10`.
  """
  return from_config(MODEL_CONFIGS[canonical_name(name)], **kw)


def model_class(config: Any):
  """The module class of a config's fields.

  `MlpMixer` for a Mixer's (`num_blocks`), `BitResNet` for a ResNet without
  transformer, else `VisionTransformer`.
  """
  if 'num_blocks' in config:
    return MlpMixer
  if 'transformer' not in config and 'resnet' in config:
    return BitResNet
  return VisionTransformer


def from_config(config: Any, model_cls=None, **kw):
  """Builds a model from a zoo-style ConfigDict (or dict) and `kw` overrides.

  Args:
    config: module fields, as the zoo's ConfigDicts hold them.
    model_cls: the module class; None picks it by the fields (`model_class`).
    **kw: fields to set or override.

  Returns:
    The module; `num_classes` is None (no head) unless given.
  """
  fields = dict(config.to_dict() if hasattr(config, 'to_dict') else config)
  fields.update(kw)
  fields.setdefault('num_classes', None)
  model_cls = model_cls or model_class(fields)
  for key in ('patches', 'transformer', 'resnet'):
    # The original passes these as ConfigDicts; keep that for module fields.
    if isinstance(fields.get(key), dict):
      fields[key] = ml_collections.ConfigDict(fields[key])
  return model_cls(**fields)


def attention_weights(model: VisionTransformer, params: Any,
                      images: jax.Array) -> List[jax.Array]:
  """Attention probabilities of every encoder block, in order of depth.

  Returns:
    `num_layers` arrays [batch, heads, query tokens, key tokens].
  """
  _, state = model.apply({'params': params},
                         images,
                         train=False,
                         mutable=['intermediates'])
  encoder = state['intermediates']['Transformer']
  if 'encoderblock' in encoder:  # scan=True: one entry, a leading layer axis.
    stacked = encoder['encoderblock']['MultiHeadDotProductAttention_0']
    return list(stacked['attention_weights'][0])
  blocks = sorted((k for k in encoder if k.startswith('encoderblock_')),
                  key=lambda k: int(k.rsplit('_', 1)[1]))
  return [
      encoder[b]['MultiHeadDotProductAttention_0']['attention_weights'][0]
      for b in blocks
  ]

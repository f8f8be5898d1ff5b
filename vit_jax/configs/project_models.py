"""This project's models, beside the original's registry (`configs/models.py`).

`PROJECT_MODEL_CONFIGS` holds the names the original vit_jax does not
define: ViT-g/14, two more AugReg-style `-gap-norep` ViTs and the BiT ResNet
classifiers (`models_bit.BitResNet`, the paper's Sec. 4.2 baselines, its
Table 2 and Figs. 3-4 sizes). `ALL_MODEL_CONFIGS` is both registries, the
one `models.get_model` reads. Each config is locked and has no
`num_classes`; parameter counts are pinned in tests/zoo_sizes.py.
"""

import ml_collections

from vit_jax.configs import models

PROJECT_MODEL_CONFIGS = {}


def _register(get_config):
  config = get_config().lock()
  name = config.model_name
  if name in PROJECT_MODEL_CONFIGS or name in models.MODEL_CONFIGS:
    raise ValueError(f'Model {name!r} registered twice.')
  PROJECT_MODEL_CONFIGS[name] = config
  return get_config


@_register
def get_g14_config():
  """ViT-g/14 of "Scaling Vision Transformers" (Zhai et al., 2022).

  Without a released checkpoint: a model for sharded training
  (docs/scaling.md).
  """
  config = models.get_b16_config()
  config.model_name = 'ViT-g_14'
  config.patches.size = (14, 14)
  config.hidden_size = 1408
  config.transformer.mlp_dim = 6144
  config.transformer.num_heads = 16
  config.transformer.num_layers = 40
  return config


def _gap_norep(name, base):
  config = base()
  config.model_name = name
  config.classifier = 'gap'
  config.representation_size = None
  return config


@_register
def get_ti16_gap_norep_config():
  return _gap_norep('ViT-Ti_16-gap-norep', models.get_ti16_config)


@_register
def get_l16_gap_norep_config():
  return _gap_norep('ViT-L_16-gap-norep', models.get_l16_config)


# BiT ResNets (Kolesnikov et al., https://arxiv.org/abs/1912.11370): blocks
# per stage of ResNet-50/101/152, and the width factor.

BIT_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def _bit(name, *, num_layers, width_factor):
  config = ml_collections.ConfigDict()
  config.model_name = name
  config.resnet = ml_collections.ConfigDict()
  config.resnet.num_layers = tuple(num_layers)
  config.resnet.width_factor = width_factor
  return config


@_register
def get_bit_testing_config():
  """A tiny BiT for unit tests: two units, 32 root channels."""
  return _bit('BiT-testing', num_layers=(1, 1), width_factor=0.5)


@_register
def get_bit_r50x1_config():
  return _bit('BiT-R50x1', num_layers=BIT_DEPTHS[50], width_factor=1)


@_register
def get_bit_r50x3_config():
  return _bit('BiT-R50x3', num_layers=BIT_DEPTHS[50], width_factor=3)


@_register
def get_bit_r101x1_config():
  return _bit('BiT-R101x1', num_layers=BIT_DEPTHS[101], width_factor=1)


@_register
def get_bit_r101x3_config():
  return _bit('BiT-R101x3', num_layers=BIT_DEPTHS[101], width_factor=3)


@_register
def get_bit_r152x2_config():
  return _bit('BiT-R152x2', num_layers=BIT_DEPTHS[152], width_factor=2)


@_register
def get_bit_r152x4_config():
  return _bit('BiT-R152x4', num_layers=BIT_DEPTHS[152], width_factor=4)


ALL_MODEL_CONFIGS = {**models.MODEL_CONFIGS, **PROJECT_MODEL_CONFIGS}

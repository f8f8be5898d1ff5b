"""This project's models, beside the original's registry (`configs/models.py`).

`PROJECT_MODEL_CONFIGS` holds the names the original vit_jax does not
define: ViT-g/14 and two more AugReg-style `-gap-norep` ViTs.
`ALL_MODEL_CONFIGS` is both registries, the
one `models.get_model` reads. Each config is locked and has no
`num_classes`; parameter counts are pinned in tests/zoo_sizes.py.
"""

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


ALL_MODEL_CONFIGS = {**models.MODEL_CONFIGS, **PROJECT_MODEL_CONFIGS}

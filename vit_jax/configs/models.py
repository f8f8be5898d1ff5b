"""The original's model zoo: one locked `ml_collections.ConfigDict` per name.

`MODEL_CONFIGS` holds exactly the original vit_jax's names (`ViT-B_16`,
`R50+ViT-B_16`, `Mixer-B_16`, ...; its LiT models aside), the stems of the
released checkpoint files (`ViT-B_16.npz`); this project's own models are in
`project_models.py` beside it, and `models.get_model` reads both. Each config
holds the fields of its module (`VisionTransformer`, or `MlpMixer` for the
`Mixer-*` entries, which have `num_blocks`) except `num_classes`;
`models.get_model(name, num_classes=...)` builds the module. The getters
`get_<short name>_config` are the original's, so
`vit_jax/configs/vit.py:b16,cifar10` finds `get_b16_config`. Parameter counts
(1000 classes, 224x224) are pinned by tests/test_models.py (exact counts;
the paper's Table 1 rounds them to 86M, 307M, 632M), and by
tests/test_mixer.py against the original's.
"""

import ml_collections

MODEL_CONFIGS = {}

# AugReg checkpoints (gs://vit_models/augreg/index.csv) are named
# `<model>-<upstream run>.npz`, `<model>` being the zoo name without `ViT-`
# and with `+` as `_` (`R_Ti_16`, `R50_B_16`), so that a file name is also a
# URI without escaping. The original leaves out the Mixers and the models
# AugReg did not train; `testing` stays out too.
AUGREG_CONFIGS = {}
_NOT_IN_AUGREG = ('testing', 'ViT-L_32', 'R50+ViT-B_16', 'ViT-H_14')


def _register(get_config):
  """Adds a getter's config to MODEL_CONFIGS (and AUGREG_CONFIGS)."""
  config = get_config().lock()
  name = config.get('model_name')
  if name in MODEL_CONFIGS:
    raise ValueError(f'Model {name!r} registered twice.')
  MODEL_CONFIGS[name] = config
  if not name.startswith('Mixer') and name not in _NOT_IN_AUGREG:
    AUGREG_CONFIGS[name.replace('ViT-', '').replace('+', '_')] = config
  return get_config


def _vit(name,
         *,
         hidden,
         patch,
         layers,
         heads,
         mlp,
         dropout=0.0,
         classifier='token',
         representation_size=None):
  config = ml_collections.ConfigDict()
  config.model_name = name
  config.patches = ml_collections.ConfigDict({'size': (patch, patch)})
  config.hidden_size = hidden
  config.transformer = ml_collections.ConfigDict()
  config.transformer.mlp_dim = mlp
  config.transformer.num_heads = heads
  config.transformer.num_layers = layers
  config.transformer.attention_dropout_rate = 0.0
  config.transformer.dropout_rate = dropout
  config.classifier = classifier
  config.representation_size = representation_size
  return config


def _hybrid(name, base, *, resnet_layers, patch, width_factor=1.):
  config = base()
  config.model_name = name
  config.patches.size = (patch, patch)
  config.resnet = ml_collections.ConfigDict()
  config.resnet.num_layers = resnet_layers
  config.resnet.width_factor = width_factor
  return config


def _gap_norep(name, base):
  """AugReg's variant: global average pooling, no class token, no pre_logits."""
  config = base()
  config.model_name = name
  config.classifier = 'gap'
  config.representation_size = None
  return config


@_register
def get_testing_config():
  """A tiny model for unit tests."""
  config = _vit('testing', hidden=10, patch=16, layers=1, heads=2, mlp=10)
  config.transformer.dropout_rate = 0.1
  return config


@_register
def get_testing_unpooled_config():
  """`testing` with the head applied to every token."""
  config = get_testing_config()
  config.model_name = 'testing-unpooled'
  config.classifier = 'unpooled'
  return config


# Plain ViTs (paper Table 1; Ti and S from Touvron et al. / AugReg).


@_register
def get_ti16_config():
  return _vit('ViT-Ti_16', hidden=192, patch=16, layers=12, heads=3, mlp=768)


@_register
def get_s16_config():
  return _vit('ViT-S_16', hidden=384, patch=16, layers=12, heads=6, mlp=1536)


@_register
def get_s32_config():
  return _vit('ViT-S_32', hidden=384, patch=32, layers=12, heads=6, mlp=1536)


@_register
def get_b8_config():
  return _vit('ViT-B_8', hidden=768, patch=8, layers=12, heads=12, mlp=3072)


@_register
def get_b16_config():
  return _vit('ViT-B_16', hidden=768, patch=16, layers=12, heads=12, mlp=3072)


@_register
def get_b32_config():
  return _vit('ViT-B_32', hidden=768, patch=32, layers=12, heads=12, mlp=3072)


@_register
def get_l16_config():
  return _vit(
      'ViT-L_16',
      hidden=1024,
      patch=16,
      layers=24,
      heads=16,
      mlp=4096,
      dropout=0.1)


@_register
def get_l32_config():
  return _vit('ViT-L_32', hidden=1024, patch=32, layers=24, heads=16, mlp=4096)


@_register
def get_h14_config():
  return _vit(
      'ViT-H_14',
      hidden=1280,
      patch=14,
      layers=32,
      heads=16,
      mlp=5120,
      dropout=0.1)


# AugReg's global-average-pooled models without representation layer.


@_register
def get_s16_gap_norep_config():
  return _gap_norep('ViT-S_16-gap-norep', get_s16_config)


@_register
def get_s32_gap_norep_config():
  return _gap_norep('ViT-S_32-gap-norep', get_s32_config)


@_register
def get_b16_gap_norep_config():
  return _gap_norep('ViT-B_16-gap-norep', get_b16_config)


@_register
def get_b32_gap_norep_config():
  return _gap_norep('ViT-B_32-gap-norep', get_b32_config)


# Hybrids: a ResNet (BiT-style) stem feeding the transformer (paper Sec. 3.1).


@_register
def get_r_ti16_config():
  """ResNet root only (stride 4), then 8x8 patches: 32 pixels per token."""
  return _hybrid('R+ViT-Ti_16', get_ti16_config, resnet_layers=(), patch=8)


@_register
def get_r26_s32_config():
  return _hybrid(
      'R26+ViT-S_32', get_s16_config, resnet_layers=(2, 2, 2, 2), patch=1)


@_register
def get_r26_b32_config():
  return _hybrid(
      'R26+ViT-B_32', get_b16_config, resnet_layers=(2, 2, 2, 2), patch=1)


@_register
def get_r50_b16_config():
  config = _hybrid(
      'R50+ViT-B_16', get_b16_config, resnet_layers=(3, 4, 9), patch=1)
  config.transformer.dropout_rate = 0.1
  return config


@_register
def get_r50_l32_config():
  config = _hybrid(
      'R50+ViT-L_32', get_l16_config, resnet_layers=(3, 4, 6, 3), patch=1)
  config.transformer.dropout_rate = 0.1
  return config


# MLP-Mixer (Tolstikhin et al., 2021, Table 1).


def _mixer(name, *, hidden, patch, blocks, tokens_mlp, channels_mlp):
  config = ml_collections.ConfigDict()
  config.model_name = name
  config.patches = ml_collections.ConfigDict({'size': (patch, patch)})
  config.hidden_dim = hidden
  config.num_blocks = blocks
  config.tokens_mlp_dim = tokens_mlp
  config.channels_mlp_dim = channels_mlp
  return config


@_register
def get_mixer_b16_config():
  return _mixer(
      'Mixer-B_16',
      hidden=768,
      patch=16,
      blocks=12,
      tokens_mlp=384,
      channels_mlp=3072)


@_register
def get_mixer_b32_config():
  return _mixer(
      'Mixer-B_32',
      hidden=768,
      patch=32,
      blocks=12,
      tokens_mlp=384,
      channels_mlp=3072)


@_register
def get_mixer_l16_config():
  return _mixer(
      'Mixer-L_16',
      hidden=1024,
      patch=16,
      blocks=24,
      tokens_mlp=512,
      channels_mlp=4096)

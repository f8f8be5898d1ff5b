"""MLP-Mixer: zoo parameter counts, released-name `.npz` files, adaptation.

Fine-tuning through the training pipeline: tests/test_original_commands.py
(the original's Mixer command).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import models
from vit_jax.interop import checkpoint_cli
import zoo_sizes

MIXERS = sorted(n for n in models.MODEL_CONFIGS if n.startswith('Mixer'))


def tiny_mixer_config():
  """Two blocks on 28x28 images with 7x7 patches (16 tokens)."""
  return ml_collections.ConfigDict({
      'model_name': 'Mixer-tiny_7',
      'patches': {
          'size': (7, 7)
      },
      'hidden_dim': 8,
      'num_blocks': 2,
      'tokens_mlp_dim': 6,
      'channels_mlp_dim': 12
  })


def init(model, size=28):
  """The model's parameter shapes (traced, not computed: `randomized` and
  `load_pretrained` need no more)."""
  return jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros(
          (1, size, size, 3)), train=False))['params']


def apply(model, params, x):
  return jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(
      params, x)


def images(n=4, size=28):
  return np.random.default_rng(1).uniform(-1., 1.,
                                          (n, size, size, 3)).astype(np.float32)


def randomized(params, seed=2):
  """Every leaf random, so that no zero head hides a wrong load."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                      params)


def test_the_zoo_has_the_three_mixers():
  assert MIXERS == ['Mixer-B_16', 'Mixer-B_32', 'Mixer-L_16']


@pytest.mark.parametrize('name', MIXERS)
def test_zoo_parameter_count(name):
  """Counts at 1000 classes, 224x224, pinned in tests/zoo_sizes.py."""
  assert isinstance(models.get_model(name), models.MlpMixer)
  assert name in zoo_sizes.PARAM_COUNTS, name
  shapes = zoo_sizes.param_shapes(name)
  assert zoo_sizes.count(shapes) == zoo_sizes.PARAM_COUNTS[name]
  config = models.MODEL_CONFIGS[name]
  blocks = [k for k in shapes if k.startswith('MixerBlock_')]
  assert len(blocks) == config.num_blocks
  assert shapes['stem']['kernel'].shape == (*config.patches.size, 3,
                                            config.hidden_dim)
  assert shapes['head']['kernel'].shape == (config.hidden_dim, 1000)


def test_released_names_round_trip(tmp_path):
  model = models.from_config(tiny_mixer_config(), num_classes=5)
  params = randomized(init(model))
  path = str(tmp_path / 'Mixer-tiny_7.npz')
  checkpoint.save(params, path)
  with np.load(path) as data:
    keys = set(data.files)
  # The original's names (its models_mixer.py): one `.npz` key per leaf.
  assert {
      'stem/kernel', 'stem/bias', 'pre_head_layer_norm/scale', 'head/kernel',
      'MixerBlock_1/LayerNorm_0/scale',
      'MixerBlock_1/token_mixing/Dense_0/kernel',
      'MixerBlock_1/channel_mixing/Dense_1/bias',
      'MixerBlock_0/LayerNorm_1/bias'
  } <= keys
  assert len(keys) == len(jax.tree.leaves(params))
  loaded = checkpoint.load(path)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  x = images()
  np.testing.assert_array_equal(
      apply(model, loaded, x), apply(model, params, x))


def test_inspect_names_the_mixer(tmp_path, capsys):
  model = models.get_model('Mixer-B_32', num_classes=10)
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init(model, 64))
  path = str(tmp_path / 'mixer.npz')
  checkpoint.save(params, path)
  assert checkpoint_cli.main(['inspect', path]) == 0
  out = capsys.readouterr().out
  assert 'model: MLP-Mixer' in out
  assert 'zoo_name: Mixer-B_32' in out
  assert 'num_blocks: 12' in out


def test_load_pretrained_gives_a_fresh_zero_head(tmp_path):
  path = str(tmp_path / 'pretrained.npz')
  pretrained_params = randomized(
      init(models.from_config(tiny_mixer_config(), num_classes=5)))
  checkpoint.save(pretrained_params, path)
  model = models.from_config(tiny_mixer_config(), num_classes=3)
  params = checkpoint.load_pretrained(
      pretrained_path=path,
      init_params=init(model),
      model_config=tiny_mixer_config())
  assert params['head']['kernel'].shape == (8, 3)
  assert not np.any(params['head']['kernel'])
  for name in ('stem', 'MixerBlock_0', 'MixerBlock_1', 'pre_head_layer_norm'):
    jax.tree.map(np.testing.assert_array_equal, params[name],
                 pretrained_params[name])
  np.testing.assert_array_equal(apply(model, params, images()), 0.)

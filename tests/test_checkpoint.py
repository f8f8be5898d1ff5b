"""Checkpoints: .npz round trips, layouts, fine-tuning adaptation, the CLI.

Ground truth: the official fixtures (tests/data/official, written by the
original implementation and in the names of Google's released files),
scipy.ndimage.zoom (what the original resamples with), jax.image.resize and
PIL (bicubic), and parameter counts that follow from a model's shapes
(ViT-Ti/16 with a 1000-class head: 5,717,416).
"""

import io
import os
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest
import scipy.ndimage

import official
import preloaded
from vit_jax import checkpoint
from vit_jax import models
from vit_jax.checkpoints import layouts
from vit_jax.checkpoints import npz
from vit_jax.checkpoints import trees
from vit_jax.data import filesystem
from vit_jax.data import tf_import
from vit_jax.interop import checkpoint_cli

tf = tf_import.import_tensorflow()  # TensorFlow without Keras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------
# Helpers.


def tiny_config(classifier='token',
                representation_size=None,
                resnet=None,
                patch=8,
                num_classes=3,
                **kw):
  """A 2-layer, hidden-16 model config (zoo fields plus num_classes)."""
  config = ml_collections.ConfigDict(
      dict(
          model_name='tiny',
          patches=ml_collections.ConfigDict({'size': (patch, patch)}),
          hidden_size=16,
          transformer=ml_collections.ConfigDict(
              dict(
                  num_layers=2,
                  num_heads=2,
                  mlp_dim=32,
                  dropout_rate=0.,
                  attention_dropout_rate=0.)),
          classifier=classifier,
          representation_size=representation_size,
          num_classes=num_classes,
      ))
  if resnet is not None:
    config.resnet = ml_collections.ConfigDict(
        dict(num_layers=resnet, width_factor=0.5))
  for key, value in kw.items():
    config[key] = value
  return config


def param_shapes(model, image_hw):
  return jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros(
          (1, *image_hw, 3)), train=False))['params']


def random_params(config, image_hw, seed=0):
  """Numpy params of the model's shapes, every leaf random (none all-zero)."""
  rng = np.random.default_rng(seed)
  shapes = param_shapes(models.from_config(config), image_hw)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                      shapes)


def flat(tree):
  return {k: np.asarray(v) for k, v in trees.flatten_tree(tree).items()}


def assert_trees_equal(actual, expected):
  actual, expected = flat(actual), flat(expected)
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    assert actual[key].dtype == value.dtype, key
    np.testing.assert_array_equal(actual[key], value, err_msg=key)


def nest(flat_dict):
  """'/'-keys to a nested dict, written here independently of the module."""
  tree = {}
  for key, value in flat_dict.items():
    *parents, leaf = key.split('/')
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def zoom_posemb(posemb, new_hw, has_class_token):
  """The original's resampling, with scipy, for square and non-square grids."""
  n = int(has_class_token)
  tok, grid = posemb[:, :n], posemb[0, n:]
  old_hw = (round(np.sqrt(grid.shape[0])),) * 2
  return zoom_grid(tok, grid, old_hw, new_hw)


def zoom_grid(tok, grid, old_hw, new_hw):
  grid = grid.reshape(*old_hw, -1)
  zoomed = scipy.ndimage.zoom(
      grid, (new_hw[0] / old_hw[0], new_hw[1] / old_hw[1], 1), order=1)
  assert zoomed.shape[:2] == tuple(new_hw)
  return np.concatenate([tok, zoomed.reshape(1, -1, grid.shape[-1])], axis=1)


def run_cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run(
      preloaded.command(env, '-m', 'vit_jax.interop.checkpoint_cli', *args),
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
      env=env)


def write_bytes(path, data):
  with open(path, 'wb') as f:
    f.write(data)
  return str(path)


def savez(path, flat_dict):
  np.savez(path, **flat_dict)
  return str(path)


# ----------------------------------------------------------------------------
# Round trips and the two name schemes.

# (classifier, representation_size, resnet stages, patch, image size):
# every classifier with and without representation layer; a hybrid with two
# stages (stride 8) and one with the root only (stride 4).
LAYOUTS = [(c, r, None, 8, 16)
           for c in ('token', 'gap', 'unpooled', 'token_unpooled')
           for r in (None, 16)]
LAYOUTS += [('token', None, (1, 1), 1, 16), ('gap', 16, (), 2, 16)]


@pytest.mark.parametrize('names', npz.NAME_SCHEMES)
@pytest.mark.parametrize('classifier,rep,resnet,patch,size', LAYOUTS)
def test_save_load_round_trip(tmp_path, names, classifier, rep, resnet, patch,
                              size):
  config = tiny_config(classifier, rep, resnet, patch)
  params = random_params(config, (size, size))
  path = str(tmp_path / 'ckpt.npz')
  checkpoint.save(params, path, names=names)
  assert_trees_equal(checkpoint.load(path), params)

  stored = np.load(path)
  if names == 'linen':
    assert sorted(stored.files) == sorted(flat(params))
  else:
    block = 'Transformer/encoderblock_1/'
    assert block + 'MultiHeadDotProductAttention_1/query/kernel' in stored
    assert block + 'LayerNorm_2/scale' in stored
    assert block + 'MlpBlock_3/Dense_1/bias' in stored
    assert not any('MultiHeadDotProductAttention_0' in k or
                   'LayerNorm_1' in k or 'MlpBlock_0' in k
                   for k in stored.files)
    if resnet is not None:
      assert stored['gn_root/scale'].shape == (1, 1, 1, 32)


def test_save_accepts_jax_arrays_frozendicts_and_bfloat16(tmp_path):
  import flax  # pylint: disable=g-import-not-at-top
  params = random_params(tiny_config(), (16, 16))
  on_device = jax.tree.map(jnp.asarray, params)
  on_device['embedding']['bias'] = on_device['embedding']['bias'].astype(
      jnp.bfloat16)
  path = str(tmp_path / 'x.npz')
  checkpoint.save(flax.core.freeze(on_device), path)
  loaded = checkpoint.load(path)
  expected = dict(
      params,
      embedding=dict(
          params['embedding'],
          bias=np.asarray(on_device['embedding']['bias'], np.float32)))
  assert_trees_equal(loaded, expected)


def test_save_writes_scanned_blocks_per_layer(tmp_path):
  params = random_params(tiny_config(), (16, 16))
  scanned = layouts.layers_to_scan(params, 2)
  path = str(tmp_path / 'x.npz')
  checkpoint.save(scanned, path)
  assert 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel' in np.load(path)
  assert_trees_equal(checkpoint.load(path), params)


@pytest.mark.parametrize('name', ['tiny_vit_token', 'tiny_hybrid_r2x2'])
def test_released_and_linen_fixtures_load_identically(name):
  assert_trees_equal(
      checkpoint.load(official.params_path(name, True)),
      checkpoint.load(official.params_path(name, False)))


@pytest.mark.parametrize('name', ['tiny_vit_token', 'tiny_hybrid_r2x2'])
def test_released_names_file_is_the_official_prelinen_layout(tmp_path, name):
  path = str(tmp_path / 'x.npz')
  checkpoint.save(checkpoint.load(official.params_path(name)), path)
  ours = np.load(path)
  official_file = np.load(official.params_path(name, released_names=True))
  assert set(ours.files) == set(official_file.files)
  for key in official_file.files:  # Same shapes ((1,1,1,C) GroupNorm) too.
    assert ours[key].shape == official_file[key].shape, key
    np.testing.assert_array_equal(ours[key], official_file[key])


def test_save_is_atomic(tmp_path, monkeypatch):
  params = random_params(tiny_config(), (16, 16))
  path = tmp_path / 'x.npz'
  write_bytes(path, b'previous contents')

  written = []

  def crashing_write(file, array, **kwargs):
    del kwargs
    file.write(array.tobytes()[:8])
    written.append(array)
    if len(written) % 3 == 0:  # Killed in the third array of each file.
      raise KeyboardInterrupt('killed mid-write')

  monkeypatch.setattr(np.lib.format, 'write_array', crashing_write)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save(params, str(path))
  assert path.read_bytes() == b'previous contents'
  assert os.listdir(tmp_path) == ['x.npz']  # No temporary file left behind.
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save(params, str(tmp_path / 'new.npz'))
  assert os.listdir(tmp_path) == ['x.npz']


def test_remote_npz_is_streamed_one_array_at_a_time():
  """A scheme:// destination (ram://, TensorFlow's in-memory file system,
  standing in for gs://; its files cannot tell or seek): each array is in
  the file before the next is produced, and np.load reads the result."""
  path = 'ram://streamed/model.npz'
  arrays = {
      f'layer_{i}/kernel': np.full((256, 256), i, np.float32) for i in range(4)
  }
  sizes = []

  def produce():
    for name, array in arrays.items():
      tmp = f'{path}.tmp'  # created at the first write
      sizes.append(
          tf.io.gfile.stat(tmp).length if filesystem.exists(tmp) else 0)
      yield name, array

  npz.write_npz_atomically(path, produce())
  assert not filesystem.exists(f'{path}.tmp')
  # Before array i, the first i arrays (256 KiB each) have been written.
  assert [size // (256 * 1024) for size in sizes] == [0, 1, 2, 3]
  with filesystem.open_file(path, 'rb') as f:
    loaded = np.load(io.BytesIO(f.read()))
    assert {
        k: loaded[k].tolist() for k in loaded.files
    } == {
        k: v.tolist() for k, v in arrays.items()
    }


# ----------------------------------------------------------------------------
# Neighbouring layouts.


@pytest.mark.parametrize('prefix', ['opt/target/', 'params/'])
def test_load_strips_optimizer_and_train_state_prefixes(tmp_path, prefix):
  raw = np.load(official.params_path('tiny_vit_token', released_names=True))
  stored = {f'{prefix}{k}': raw[k] for k in raw.files}
  if prefix.startswith('opt'):  # An old flax Optimizer's state beside it.
    stored['opt/state/step'] = np.array(7)
    stored['opt/state/param_states/cls/momentum'] = np.zeros((1, 1, 32))
  path = savez(tmp_path / 'old.npz', stored)
  assert_trees_equal(
      checkpoint.load(path),
      checkpoint.load(official.params_path('tiny_vit_token')))


def big_vision_layout(params, with_cls):
  """Our tree in big_vision's: top-level table without class row, scanned."""
  params = flat(params)
  posemb = params.pop('Transformer/posembed_input/pos_embedding')
  out = {'pos_embedding': posemb[:, 1:] if with_cls else posemb}
  blocks = {}
  for key, value in params.items():
    if key.startswith('Transformer/encoderblock_'):
      layer, rest = key[len('Transformer/encoderblock_'):].split('/', 1)
      blocks.setdefault(rest, {})[int(layer)] = value
    else:
      out[key] = value
  for rest, per_layer in blocks.items():
    out[f'Transformer/encoderblock/{rest}'] = np.stack(
        [per_layer[i] for i in sorted(per_layer)])
  return out


def test_load_big_vision_layout_with_class_token(tmp_path):
  params = checkpoint.load(official.params_path('tiny_vit_token'))
  path = savez(tmp_path / 'bv.npz', big_vision_layout(params, with_cls=True))
  loaded = checkpoint.load(path)
  # big_vision adds the table before prepending cls: a zero row in our order.
  posemb = params['Transformer']['posembed_input']['pos_embedding'].copy()
  posemb[:, 0] = 0.
  params['Transformer']['posembed_input']['pos_embedding'] = posemb
  assert_trees_equal(loaded, params)


def test_load_big_vision_layout_without_class_token(tmp_path):
  params = random_params(tiny_config('gap'), (16, 16))
  path = savez(tmp_path / 'bv.npz', big_vision_layout(params, with_cls=False))
  assert_trees_equal(checkpoint.load(path), params)


# ----------------------------------------------------------------------------
# Resampling position embeddings.


@pytest.mark.parametrize('has_class_token', [True, False])
@pytest.mark.parametrize('old,new', [(2, 5), (4, 3), (4, 7), (14, 24)])
def test_bilinear_resampling_is_the_originals_scipy_zoom(
    old, new, has_class_token):
  n = int(has_class_token)
  posemb = np.random.default_rng(old).normal(size=(1, n + old * old,
                                                   8)).astype(np.float32)
  out = checkpoint.interpolate_posembed(posemb, n + new * new, has_class_token)
  assert out.shape == (1, n + new * new, 8) and out.dtype == np.float32
  np.testing.assert_allclose(
      out, zoom_posemb(posemb, (new, new), has_class_token), rtol=0, atol=1e-6)
  np.testing.assert_array_equal(out[:, :n], posemb[:, :n])


@pytest.mark.parametrize('old,new', [((4, 4), (3, 6)), ((2, 3), (5, 4)),
                                     ((3, 5), (6, 2)), ((4, 6), (4, 4))])
def test_bilinear_non_square_is_scipy_zoom_per_axis(old, new):
  grid = np.random.default_rng(0).normal(size=(1, 1 + old[0] * old[1], 4))
  grid = grid.astype(np.float32)
  out = checkpoint.interpolate_posembed(
      grid, 1 + new[0] * new[1], True, grid=new, old_grid=old)
  np.testing.assert_allclose(
      out, zoom_grid(grid[:, :1], grid[0, 1:], old, new), rtol=0, atol=1e-6)


@pytest.mark.parametrize('old,new', [((4, 4), (7, 7)), ((7, 7), (4, 4)),
                                     ((3, 5), (8, 4)), ((14, 14), (24, 24))])
def test_bicubic_is_jax_image_resize_cubic_and_pil_bicubic(old, new):
  grid_HxWxD = np.random.default_rng(1).normal(size=(*old, 3))
  grid_HxWxD = grid_HxWxD.astype(np.float32)
  posemb = np.concatenate(
      [np.ones((1, 1, 3), np.float32),
       grid_HxWxD.reshape(1, -1, 3)], axis=1)
  out = checkpoint.interpolate_posembed(
      posemb,
      1 + new[0] * new[1],
      True,
      grid=new,
      old_grid=old,
      method='bicubic')
  np.testing.assert_array_equal(out[:, 0], posemb[:, 0])
  out_HxWxD = out[0, 1:].reshape(*new, 3)
  by_jax = jax.image.resize(grid_HxWxD, (*new, 3), method='cubic')
  # jax computes its weights in float32 (ours and PIL's are float64).
  np.testing.assert_allclose(out_HxWxD, by_jax, rtol=0, atol=1e-5)
  for d in range(3):
    by_pil = Image.fromarray(
        grid_HxWxD[..., d], mode='F').resize((new[1], new[0]), Image.BICUBIC)
    np.testing.assert_allclose(
        out_HxWxD[..., d], np.asarray(by_pil), rtol=0, atol=1e-6)


def test_interpolate_posembed_rejects_grids_that_do_not_fit():
  posemb = np.zeros((1, 1 + 15, 4), np.float32)  # 15 is no square.
  with pytest.raises(
      checkpoint.CheckpointError, match='15 grid tokens.*square'):
    checkpoint.interpolate_posembed(posemb, 1 + 16, True)
  posemb = np.zeros((1, 1 + 16, 4), np.float32)
  with pytest.raises(
      checkpoint.CheckpointError, match='24 grid tokens.*not a square'):
    checkpoint.interpolate_posembed(posemb, 1 + 24, True)
  with pytest.raises(checkpoint.CheckpointError, match='3x7 has 21 tokens'):
    checkpoint.interpolate_posembed(posemb, 1 + 24, True, grid=(3, 7))
  with pytest.raises(checkpoint.CheckpointError, match='expected \\(1, tokens'):
    checkpoint.interpolate_posembed(posemb[0], 1 + 16, True)
  with pytest.raises(ValueError, match='Unknown resampling method'):
    checkpoint.interpolate_posembed(posemb, 1 + 25, True, method='nearest')


# ----------------------------------------------------------------------------
# Fine-tuning adaptation.


def test_load_pretrained_tiny_vit_token_to_96px_and_5_classes():
  config = official.model_config('tiny_vit_token')
  config.num_classes = 5
  model = models.from_config(config)
  images = np.random.default_rng(0).uniform(-1, 1,
                                            (2, 96, 96, 3)).astype(np.float32)
  # Shapes are all load_pretrained needs (model.init would cost 10 s here).
  init_params = param_shapes(model, (96, 96))
  params = checkpoint.load_pretrained(
      pretrained_path=official.params_path('tiny_vit_token', True),
      init_params=init_params,
      model_config=config)

  # By hand, as the original does it: numpy, scipy and a zero head.
  raw = np.load(official.params_path('tiny_vit_token'))
  manual = {k: raw[k] for k in raw.files}
  posemb = manual['Transformer/posembed_input/pos_embedding']
  manual['Transformer/posembed_input/pos_embedding'] = np.concatenate([
      posemb[:, :1],
      scipy.ndimage.zoom(
          posemb[0, 1:].reshape(4, 4, 32),
          (6 / 4, 6 / 4, 1), order=1).reshape(1, 36, 32)
  ],
                                                                      axis=1)
  manual['head/kernel'] = np.zeros((16, 5), np.float32)
  manual['head/bias'] = np.zeros((5,), np.float32)
  manual = nest(manual)

  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1,
                                                                            37,
                                                                            32)
  assert not np.any(params['head']['kernel']) and not np.any(
      params['head']['bias'])
  assert params['head']['kernel'].shape == (16, 5)
  apply = jax.jit(lambda p: official.apply_with_pre_logits(model, p, images))
  logits, pre_logits = apply(params)
  manual_logits, manual_pre_logits = apply(manual)
  np.testing.assert_array_equal(logits, np.zeros((2, 5)))
  np.testing.assert_array_equal(manual_logits, np.zeros((2, 5)))
  np.testing.assert_allclose(pre_logits, manual_pre_logits, rtol=0, atol=1e-6)
  assert np.abs(manual_pre_logits).max() > 0.1  # The check is not vacuous.


@pytest.mark.parametrize('classifier',
                         ['token', 'gap', 'unpooled', 'token_unpooled'])
def test_load_pretrained_every_classifier(tmp_path, classifier):
  has_cls = classifier in ('token', 'token_unpooled')
  pretrained = random_params(tiny_config(classifier, 16), (16, 16))  # 2x2.
  path = str(tmp_path / 'pre.npz')
  checkpoint.save(pretrained, path)
  config = tiny_config(classifier, None, num_classes=4)
  model = models.from_config(config)
  shapes = param_shapes(model, (40, 40))  # 5x5 grid.
  init_params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  init_params['head']['bias'] = np.array([1., 2., 3., 4.], np.float32)

  params = checkpoint.load_pretrained(
      pretrained_path=path, init_params=init_params, model_config=config)
  assert 'pre_logits' not in params  # representation_size=None drops it.
  np.testing.assert_array_equal(params['head']['bias'], [1., 2., 3., 4.])
  np.testing.assert_array_equal(params['head']['kernel'], np.zeros((16, 4)))
  posemb = pretrained['Transformer']['posembed_input']['pos_embedding']
  np.testing.assert_allclose(
      params['Transformer']['posembed_input']['pos_embedding'],
      zoom_posemb(posemb, (5, 5), has_cls),
      rtol=0,
      atol=1e-6)

  def rest(tree):
    return {
        k: v
        for k, v in flat(tree).items()
        if not k.startswith(('head', 'pre_logits', 'Transformer/pos'))
    }

  assert_trees_equal(rest(params), rest(pretrained))

  logits = jax.jit(lambda p: model.apply(
      {'params': p}, jnp.ones((1, 40, 40, 3)), train=False))(
          params)
  tokens = {
      'token': (),
      'gap': (),
      'unpooled': (25,),
      'token_unpooled': (26,)
  }[classifier]
  np.testing.assert_array_equal(
      logits, np.broadcast_to([1., 2., 3., 4.], (1, *tokens, 4)))


def test_load_pretrained_non_square_grid_and_bicubic(tmp_path):
  pretrained = random_params(tiny_config(), (32, 32))  # 4x4 grid.
  path = str(tmp_path / 'pre.npz')
  checkpoint.save(pretrained, path)
  posemb = pretrained['Transformer']['posembed_input']['pos_embedding']
  config = tiny_config()
  init_params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                             param_shapes(models.from_config(config),
                                          (32, 48)))  # 4x6 grid.

  # 24 tokens is no square: the grid must be given.
  with pytest.raises(
      checkpoint.CheckpointError, match='pre.npz.*not a square.*image_size'):
    checkpoint.load_pretrained(
        pretrained_path=path, init_params=init_params, model_config=config)
  params = checkpoint.load_pretrained(
      pretrained_path=path,
      init_params=init_params,
      model_config=config,
      image_size=(32, 48))
  expected = zoom_grid(posemb[:, :1], posemb[0, 1:], (4, 4), (4, 6))
  np.testing.assert_allclose(
      params['Transformer']['posembed_input']['pos_embedding'],
      expected,
      rtol=0,
      atol=1e-6)
  # The grid may also come from the model config.
  config_with_size = tiny_config(image_size=(32, 48))
  same = checkpoint.load_pretrained(
      pretrained_path=path,
      init_params=init_params,
      model_config=config_with_size)
  assert_trees_equal(same, params)

  bicubic = checkpoint.load_pretrained(
      pretrained_path=path,
      init_params=init_params,
      model_config=config,
      image_size=(32, 48),
      method='bicubic')
  by_jax = jax.image.resize(
      posemb[0, 1:].reshape(4, 4, 16), (4, 6, 16), method='cubic')
  np.testing.assert_allclose(
      bicubic['Transformer']['posembed_input']['pos_embedding'][0, 1:],
      np.asarray(by_jax).reshape(24, 16),
      rtol=0,
      atol=1e-5)

  # And back from the non-square checkpoint, which needs its own size.
  init_square = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                             param_shapes(models.from_config(config), (40, 40)))
  back = checkpoint.load_pretrained(
      pretrained_path=params,
      init_params=init_square,
      model_config=config,
      pretrained_image_size=(32, 48))
  np.testing.assert_allclose(
      back['Transformer']['posembed_input']['pos_embedding'],
      zoom_grid(expected[:, :1], expected[0, 1:], (4, 6), (5, 5)),
      rtol=0,
      atol=1e-6)


def test_load_pretrained_hybrid_derives_stride_from_resnet():
  config = official.model_config('tiny_hybrid_r2x2')  # 8 pixels per token.
  config.head_bias_init = -10.
  model = models.from_config(config)
  init_params = param_shapes(model, (96, 128))  # Shapes only are enough.
  params = checkpoint.load_pretrained(
      pretrained_path=official.params_path('tiny_hybrid_r2x2', True),
      init_params=init_params,
      model_config=config,
      image_size=(96, 128))
  raw = np.load(official.params_path('tiny_hybrid_r2x2'))
  posemb = raw['Transformer/posembed_input/pos_embedding']
  np.testing.assert_allclose(
      params['Transformer']['posembed_input']['pos_embedding'],
      zoom_grid(posemb[:, :1], posemb[0, 1:], (8, 8), (12, 16)),
      rtol=0,
      atol=1e-6)
  np.testing.assert_array_equal(params['block2']['unit1']['gn1']['scale'],
                                raw['block2/unit1/gn1/scale'])
  # The fresh head, as the model would initialise it.
  np.testing.assert_array_equal(params['head']['kernel'], np.zeros((32, 10)))
  np.testing.assert_array_equal(params['head']['bias'], np.full(10, -10.))


def test_load_pretrained_accepts_loaded_params_and_scanned_models():
  config = official.model_config('tiny_vit_token')
  init_params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                             param_shapes(models.from_config(config), (64, 64)))
  from_file = checkpoint.load_pretrained(
      pretrained_path=official.params_path('tiny_vit_token'),
      init_params=init_params,
      model_config=config)
  from_dict = checkpoint.load_pretrained(
      pretrained_path=checkpoint.load(official.params_path('tiny_vit_token')),
      init_params=init_params,
      model_config=config)
  assert_trees_equal(from_dict, from_file)
  scanned = checkpoint.load_pretrained(
      pretrained_path=official.params_path('tiny_vit_token'),
      init_params=layouts.layers_to_scan(init_params, 2),
      model_config=config)
  assert_trees_equal(scanned, layouts.layers_to_scan(from_file, 2))


# ----------------------------------------------------------------------------
# inspect_params.


def test_inspect_params_original_behaviour_and_listing():
  expected = {'a': {'kernel': np.zeros((2, 3))}, 'b': np.zeros(4), 'empty': {}}
  params = {'a': {'kernel': np.ones((2, 3))}, 'b': np.ones(4)}
  assert checkpoint.inspect_params(params=params, expected=expected) is params
  assert params['empty'] == {}  # Layers without weights are added back.

  params = {'a': {'kernel': np.ones((2, 5))}, 'c': np.ones((7, 1))}
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.inspect_params(params=params, expected=expected)
  message = str(error.value)
  assert 'In the model but not in the checkpoint (1):\n    b (4,)' in message
  assert 'In the checkpoint but not in the model (1):\n    c (7, 1)' in message
  assert 'a/kernel: checkpoint (2, 5), model (2, 3)' in message
  assert checkpoint.inspect_params(
      params=params,
      expected=expected,
      fail_if_extra=False,
      fail_if_missing=False) is params
  with pytest.raises(checkpoint.CheckpointError, match='Shapes differ'):
    checkpoint.inspect_params(
        params=params,
        expected=expected,
        fail_if_extra=False,
        fail_if_missing=False,
        fail_if_shape_mismatch=True)


# ----------------------------------------------------------------------------
# Bad input.


def bad_files(tmp_path):
  good = open(official.params_path('tiny_vit_token'), 'rb').read()
  npy = io.BytesIO()
  np.save(npy, np.zeros(3))
  os.mkdir(tmp_path / 'a_directory')
  return {
      'missing': (str(tmp_path / 'missing.npz'), 'does not exist'),
      'not_a_zip': (write_bytes(tmp_path / 'text.npz',
                                b'hello\n' * 100), 'not an .npz'),
      'truncated': (write_bytes(tmp_path / 'cut.npz',
                                good[:len(good) // 2]), 'truncated'),
      'npy': (write_bytes(tmp_path / 'single.npz',
                          npy.getvalue()), 'not an .npz'),
      'directory': (str(tmp_path / 'a_directory'), 'directory'),
      'empty': (savez(tmp_path / 'empty.npz', {}), 'no arrays'),
  }


@pytest.mark.parametrize(
    'kind', ['missing', 'not_a_zip', 'truncated', 'npy', 'directory', 'empty'])
def test_load_bad_files(tmp_path, kind):
  path, problem = bad_files(tmp_path)[kind]
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.load(path)
  assert path in str(error.value) and problem in str(error.value)


def test_load_pretrained_checkpoint_of_another_model():
  config = models.MODEL_CONFIGS['testing'].copy_and_resolve_references()
  with config.unlocked():
    config.num_classes = 10
  init_params = param_shapes(models.from_config(config), (64, 64))
  path = official.params_path('tiny_vit_token', True)
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.load_pretrained(
        pretrained_path=path, init_params=init_params, model_config=config)
  message = str(error.value)
  assert path in message
  assert 'embedding/kernel: checkpoint (16, 16, 3, 32), model (16, 16, 3, 10)' \
      in message
  assert ('Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel (32, 64)'
          in message)  # testing has 1 layer: block 1 is extra.


def test_load_pretrained_drops_pretraining_heads_but_not_layers(tmp_path):
  stored = dict(np.load(official.params_path('tiny_vit_token')))
  stored['mpp_head/kernel'] = np.ones((32, 512), np.float32)
  stored['mask_token'] = np.ones((32,), np.float32)
  path = savez(tmp_path / 'mpp.npz', stored)
  config = official.model_config('tiny_vit_token')
  init_params = param_shapes(models.from_config(config), (64, 64))
  params = checkpoint.load_pretrained(
      pretrained_path=path, init_params=init_params, model_config=config)
  assert sorted(params) == sorted(init_params)

  config.transformer.num_layers = 1  # The checkpoint has one block more.
  init_params = param_shapes(models.from_config(config), (64, 64))
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.load_pretrained(
        pretrained_path=path, init_params=init_params, model_config=config)
  message = str(error.value)
  assert 'In the checkpoint but not in the model (18):' in message
  assert 'Transformer/encoderblock_1/LayerNorm_0/bias (32,)' in message
  assert 'mpp_head/kernel (32, 512)' in message


def test_load_pretrained_hybrid_checkpoint_into_a_vit():
  config = official.model_config('tiny_vit_token')
  config.representation_size = None
  init_params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                             param_shapes(models.from_config(config), (64, 64)))
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.load_pretrained(
        pretrained_path=official.params_path('tiny_hybrid_r2x2'),
        init_params=init_params,
        model_config=config)
  message = str(error.value)
  assert 'tiny_hybrid_r2x2_params.npz' in message
  assert 'In the checkpoint but not in the model' in message
  assert 'conv_root/kernel (7, 7, 3, 32)' in message
  assert 'block1/... (21 parameters, e.g. block1/unit1/conv1/kernel' in message
  assert 'embedding/kernel: checkpoint (1, 1, 256, 32), model (16, 16, 3, 32)' \
      in message


def test_load_pretrained_class_token_mismatch():
  config = official.model_config('tiny_vit_token')
  config.classifier = 'gap'
  init_params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                             param_shapes(models.from_config(config), (64, 64)))
  with pytest.raises(
      checkpoint.CheckpointError,
      match='tiny_vit_token_params.npz.*no class token.*cls'):
    checkpoint.load_pretrained(
        pretrained_path=official.params_path('tiny_vit_token'),
        init_params=init_params,
        model_config=config)


def test_load_pretrained_posemb_grid_that_cannot_match(tmp_path):
  stored = dict(np.load(official.params_path('tiny_vit_token')))
  key = 'Transformer/posembed_input/pos_embedding'
  stored[key] = stored[key][:, :16]  # cls + 15 grid tokens.
  path = savez(tmp_path / 'odd.npz', stored)
  config = official.model_config('tiny_vit_token')
  init_params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                             param_shapes(models.from_config(config), (96, 96)))
  with pytest.raises(
      checkpoint.CheckpointError,
      match='odd.npz.*15 grid tokens.*not a square'):
    checkpoint.load_pretrained(
        pretrained_path=path, init_params=init_params, model_config=config)


@pytest.mark.parametrize('kind', ['not_a_zip', 'truncated', 'missing'])
@pytest.mark.parametrize('command', ['convert', 'resize'])
def test_cli_bad_input_writes_nothing(tmp_path, capsys, command, kind):
  path, _ = bad_files(tmp_path)[kind]
  out = tmp_path / 'out' / 'x.npz'
  os.mkdir(tmp_path / 'out')
  args = [command, path, str(out)]
  if command == 'resize':
    args += ['--image-size', '96', '96']
  assert checkpoint_cli.main(args) == 1
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1 and path in err
  assert os.listdir(tmp_path / 'out') == []


@pytest.mark.parametrize('args,problem', [
    (['--image-size', '100', '96'], '100x96 is not a positive multiple of the '
     '16x16'),
    (['--image-size', '96', '96', '--source-image-size', '48', '96'
     ], 'grid 3x6 has 18 tokens'),
])
def test_cli_resize_sizes_that_do_not_fit_write_nothing(tmp_path, capsys, args,
                                                        problem):
  out = tmp_path / 'x.npz'
  code = checkpoint_cli.main(
      ['resize',
       official.params_path('tiny_vit_token'),
       str(out), *args])
  assert code == 1
  err = capsys.readouterr().err
  assert problem in err and err.count('\n') == 1
  assert not out.exists()


def test_cli_subprocess_exit_status_and_one_line_error(tmp_path, capsys):
  """`python -m` once (the exit status of the module run as a program);
  the unknown command in-process, through what `python -m` runs."""
  path = write_bytes(tmp_path / 'text.npz', b'not a zip')
  out = tmp_path / 'out.npz'
  result = run_cli('convert', path, str(out))
  assert result.returncode == 1
  assert result.stderr.startswith('error: ') and result.stderr.count('\n') == 1
  assert path in result.stderr and not out.exists()
  with pytest.raises(SystemExit) as exit_:
    checkpoint_cli.main(['frobnicate'])
  assert exit_.value.code == 2 and capsys.readouterr().err.count('\n') == 1


# ----------------------------------------------------------------------------
# The command line.


def test_cli_inspect_fixture(capsys):
  path = official.params_path('tiny_vit_token', released_names=True)
  assert checkpoint_cli.main(['inspect', path]) == 0
  raw = np.load(path)
  count = sum(raw[k].size for k in raw.files)
  lines = capsys.readouterr().out.splitlines()
  assert f'parameters: {count:,}' in lines
  for line in ('hidden_size: 32', 'num_layers: 2', 'num_heads: 2',
               'mlp_dim: 64', 'patch_size: 16x16', 'resnet: none',
               'grid: 4x4 (64x64 images)', 'representation_size: 16',
               'num_classes: 10', 'zoo_name: none',
               'layout: released (pre-linen) names'):
    assert line in lines, line
  assert any(line.startswith('classifier: token') for line in lines)
  for key in raw.files:  # Every key, with shape and dtype.
    assert any(line.split() == [key, *str(raw[key].shape).split(), 'float32']
               for line in lines), key


def test_cli_inspect_hybrid(capsys):
  assert checkpoint_cli.main(
      ['inspect', official.params_path('tiny_hybrid_r2x2', True)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert ('resnet: stages (2, 2) (units per stage), root width 32 '
          '(width_factor 0.5)') in lines
  assert 'pixels_per_token: 8x8' in lines
  assert 'grid: 8x8 (64x64 images)' in lines
  assert 'representation_size: None' in lines


def test_cli_inspect_names_the_zoo_model(tmp_path, capsys):
  model = models.get_model('ViT-Ti_16', num_classes=1000)
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                       param_shapes(model, (224, 224)))
  path = str(tmp_path / 'ViT-Ti_16.npz')
  checkpoint.save(zeros, path)
  assert checkpoint_cli.main(['inspect', path]) == 0
  lines = capsys.readouterr().out.splitlines()
  # Width 192, MLP 768, 12 blocks, 197 tokens of 16x16x3 patches (the
  # original's vit_jax/configs/models.py): 147,648 patch embedding + 192
  # class token + 37,824 position embedding + 12 x 444,864 blocks + 384
  # final LayerNorm + 193,000 head.
  assert 'parameters: 5,717,416' in lines
  assert 'zoo_name: ViT-Ti_16' in lines
  assert 'grid: 14x14 (224x224 images)' in lines
  assert 'num_heads: 3' in lines and 'num_classes: 1000' in lines


def test_cli_convert_between_name_schemes(tmp_path):
  released = str(tmp_path / 'released.npz')
  linen = str(tmp_path / 'linen.npz')
  assert checkpoint_cli.main(
      ['convert', official.params_path('tiny_hybrid_r2x2'), released]) == 0
  official_file = np.load(official.params_path('tiny_hybrid_r2x2', True))
  assert set(np.load(released).files) == set(official_file.files)
  assert checkpoint_cli.main(['convert', released, linen, '--names',
                              'linen']) == 0
  ours, original = np.load(linen), np.load(
      official.params_path('tiny_hybrid_r2x2'))
  assert set(ours.files) == set(original.files)
  for key in original.files:
    np.testing.assert_array_equal(ours[key], original[key])
    assert ours[key].shape == original[key].shape


@pytest.mark.parametrize('method', ['bilinear', 'bicubic'])
def test_cli_resize(tmp_path, method):
  out = str(tmp_path / 'x.npz')
  assert checkpoint_cli.main([
      'resize',
      official.params_path('tiny_vit_token'), out, '--image-size', '96', '64',
      '--method', method
  ]) == 0
  resized = checkpoint.load(out)
  original = checkpoint.load(official.params_path('tiny_vit_token'))
  posemb = original['Transformer']['posembed_input']['pos_embedding']
  if method == 'bilinear':
    expected = zoom_grid(posemb[:, :1], posemb[0, 1:], (4, 4), (6, 4))
  else:
    expected = np.concatenate([
        posemb[:, :1],
        np.asarray(
            jax.image.resize(
                posemb[0, 1:].reshape(4, 4, 32),
                (6, 4, 32), method='cubic')).reshape(1, 24, 32)
    ],
                              axis=1)
  np.testing.assert_allclose(
      resized['Transformer']['posembed_input'].pop('pos_embedding'),
      expected,
      rtol=0,
      atol=1e-5)
  original['Transformer']['posembed_input'].pop('pos_embedding')
  assert_trees_equal(resized, original)
  # The input had linen names, so the output keeps them.
  assert ('Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'
          in np.load(out).files)


def test_original_api_names_are_defined_in_checkpoint():
  # Code written for the original calls these on `vit_jax.checkpoint`
  # (https://github.com/google-research/vision_transformer, its
  # vit_jax/checkpoint.py), where they are defined.
  for name in ('load', 'load_pretrained', 'inspect_params', 'recover_tree',
               'interpolate_posembed', 'get_augreg_df', 'copy'):
    assert getattr(checkpoint, name).__module__ == 'vit_jax.checkpoint', name

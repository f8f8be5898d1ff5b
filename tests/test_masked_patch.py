"""Masked patch prediction: corruption proportions, targets, tree, one step."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import models
from vit_jax import models_mpp
from vit_jax.checkpoints import trees

IMAGE = 32


def _model():
  return models_mpp.get_model('testing')


@pytest.fixture(scope='module')
def initial_params():
  return models_mpp.init(_model(), jax.random.key(0), IMAGE)


def _copy(params):
  return jax.tree_util.tree_map(lambda x: x, params)


def _solid(rgb, size=IMAGE, batch=1):
  """A constant-colour image in the model's [-1, 1] scale."""
  pixels = np.broadcast_to(np.array(rgb, np.float32), (batch, size, size, 3))
  return pixels / 127.5 - 1


def test_corruption_proportions():
  b, n, d = 64, 196, 8
  tokens = jax.random.normal(jax.random.key(0), (b, n, d))
  mask_token = jnp.full((d,), 100.0)
  out, chosen = jax.jit(models_mpp.corrupt)(jax.random.key(1), tokens,
                                            mask_token)
  out, chosen, tokens = map(np.asarray, (out, chosen, tokens))

  # Exactly half of the patches of every image are chosen.
  np.testing.assert_array_equal(chosen.sum(axis=1), np.full(b, n // 2))
  # Patches not chosen are untouched.
  np.testing.assert_array_equal(out[~chosen], tokens[~chosen])

  is_mask = np.all(out == 100.0, axis=-1)
  is_kept = np.all(out == tokens, axis=-1)
  is_random = ~is_mask & ~is_kept
  assert not np.any(is_mask & ~chosen)
  num = chosen.sum()
  assert abs(is_mask[chosen].sum() / num - 0.8) < 0.025
  assert abs(is_random[chosen].sum() / num - 0.1) < 0.02
  assert abs(is_kept[chosen].sum() / num - 0.1) < 0.02

  # A random replacement is another patch embedding of the batch, never itself.
  flat = tokens.reshape(b * n, d)
  for i, j in zip(*np.nonzero(is_random)):
    matches = np.flatnonzero(np.all(flat == out[i, j], axis=-1))
    assert len(matches) == 1 and matches[0] != i * n + j


def test_corruption_rejects_bad_probabilities():
  with pytest.raises(ValueError, match='mask_prob'):
    models_mpp.corrupt(
        jax.random.key(0),
        jnp.zeros((1, 4, 2)),
        jnp.zeros(2),
        mask_prob=0.95,
        random_prob=0.1)


@pytest.mark.parametrize(
    'rgb,expected',
    [
        ((255, 0, 0), 7 * 64),  # red: r bin 7
        ((0, 255, 0), 7 * 8),  # green
        ((0, 0, 255), 7),  # blue
        ((255, 255, 255), 511),
        ((0, 0, 0), 0),
        ((100, 50, 200), 3 * 64 + 1 * 8 + 6),  # 100//32=3, 50//32=1, 200//32=6
        ((31, 32, 63), 0 * 64 + 1 * 8 + 1),  # bin edges
    ])
def test_mean_color_targets_constant_images(rgb, expected):
  targets = models_mpp.mean_color_targets(_solid(rgb), 16)
  np.testing.assert_array_equal(targets, np.full((1, 4), expected))
  as_uint8 = np.full((1, IMAGE, IMAGE, 3), rgb, np.uint8)
  np.testing.assert_array_equal(
      models_mpp.mean_color_targets(as_uint8, (16, 16)), targets)


def test_mean_color_targets_per_patch():
  image = np.zeros((1, 32, 32, 3), np.uint8)
  image[:, :, :16] = (255, 0, 0)  # left column of patches red
  image[:, :, 16:] = (0, 0, 255)  # right column blue
  image[:, 16:, 16:24] = 0  # bottom-right patch: half blue, half black
  # Row-major grid: (0,0) red, (0,1) blue, (1,0) red, (1,1) mean blue 127.5.
  np.testing.assert_array_equal(
      models_mpp.mean_color_targets(image, 16), [[448, 7, 448, 3]])
  with pytest.raises(ValueError, match='multiple of the patch size'):
    models_mpp.mean_color_targets(image[:, :30], 16)


def test_parameter_tree_is_the_vit_tree_plus_mpp_params(initial_params):
  params = initial_params
  vit = models.get_model('testing', num_classes=None)
  vit_params = jax.eval_shape(lambda: vit.init(
      jax.random.key(0), jnp.zeros(
          (1, IMAGE, IMAGE, 3)), train=False))['params']
  mpp_flat = trees.flatten_tree(params)
  vit_flat = trees.flatten_tree(vit_params)
  for key, value in vit_flat.items():
    assert key in mpp_flat, key
    assert mpp_flat[key].shape == value.shape, key
  extra = {k.split('/')[0] for k in set(mpp_flat) - set(vit_flat)}
  assert extra == set(models_mpp.MPP_PARAMS)
  assert params['mpp_head']['kernel'].shape == (10, 512)
  assert set(models_mpp.to_vit_params(params)) == set(vit_params)
  # Fine-tuning: load_pretrained takes the MPP tree as is, at a new
  # resolution (64: a 4x4 grid instead of 2x2) with a fresh 7-way head.
  finetune = models.get_model('testing', num_classes=7)
  init = jax.eval_shape(lambda: finetune.init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))['params']
  model_config = models.MODEL_CONFIGS['testing'].to_dict()
  model_config['num_classes'] = 7
  adapted = checkpoint.load_pretrained(
      pretrained_path=jax.tree_util.tree_map(np.asarray, params),
      init_params=init,
      model_config=ml_collections.ConfigDict(model_config))
  assert adapted['Transformer']['posembed_input']['pos_embedding'].shape == (1,
                                                                             17,
                                                                             10)
  np.testing.assert_array_equal(adapted['embedding']['kernel'],
                                params['embedding']['kernel'])
  assert 'mpp_head' not in adapted and 'mask_token' not in adapted


@pytest.mark.parametrize(
    'name,kw,size',
    [
        ('testing', {
            'scan': True
        }, IMAGE),
        ('R+ViT-Ti_16', {}, 64),  # hybrid: ResNet root, 32 pixels per token
    ])
def test_parameter_tree_matches_other_vits(name, kw, size):
  mpp = models_mpp.get_model(name, **kw)
  vit = models.get_model(name, num_classes=None, **kw)
  images = jnp.zeros((1, size, size, 3))
  shapes = lambda m: trees.flatten_tree(
      jax.eval_shape(lambda: m.init(
          {
              'params': jax.random.key(0),
              'mpp': jax.random.key(1)
          },
          images,
          train=False))['params'])
  mpp_shapes, vit_shapes = shapes(mpp), shapes(vit)
  assert {
      k: v.shape for k, v in vit_shapes.items()
  } == {
      k: v.shape
      for k, v in mpp_shapes.items()
      if k.split('/')[0] not in models_mpp.MPP_PARAMS
  }
  assert mpp.stride == vit.stride


def test_uncorrupted_forward_is_the_vit_on_patch_tokens(initial_params):
  # Also shows that `to_vit_params` gives a tree a VisionTransformer runs.
  model = _model()
  params = _copy(initial_params)
  params['mpp_head']['kernel'] = jax.random.normal(jax.random.key(3), (10, 512))
  images = jax.random.uniform(
      jax.random.key(4), (2, IMAGE, IMAGE, 3), minval=-1, maxval=1)
  logits, chosen = jax.jit(lambda p, x: model.apply(
      {'params': p}, x, train=False, corrupt_patches=False))(params, images)
  vit = models.get_model(
      'testing', num_classes=512, classifier='token_unpooled')
  vit_params = {**models_mpp.to_vit_params(params), 'head': params['mpp_head']}
  expected = jax.jit(lambda p, x: vit.apply({'params': p}, x, train=False))(
      vit_params, images)[:, 1:]
  np.testing.assert_allclose(logits, expected, atol=1e-5)
  assert chosen.all()


def test_fully_masked_input_ignores_the_image(initial_params):
  # Corruption replaces patch embeddings, before the position embedding: with
  # every patch masked the output cannot depend on the pixels, but still
  # differs between positions.
  model = models_mpp.get_model(
      'testing', mask_ratio=1.0, mask_prob=1.0, random_prob=0.0)
  params = _copy(initial_params)
  params['mpp_head']['kernel'] = jax.random.normal(jax.random.key(3), (10, 512))
  apply = jax.jit(lambda p, x: model.apply(
      {'params': p}, x, train=False, rngs={'mpp': jax.random.key(5)}))
  a, chosen = apply(params, _solid((255, 0, 0)))
  b, _ = apply(params, _solid((0, 90, 20)))
  np.testing.assert_allclose(a, b, atol=1e-6)
  assert chosen.all()
  assert np.abs(a[0, 0] - a[0, 1]).max() > 1e-4


def test_one_gradient_step_reduces_the_loss(initial_params):
  model = _model()
  params = initial_params
  images = np.concatenate([
      _solid((255, 0, 0), batch=2),
      _solid((0, 0, 255), batch=2),
      np.random.default_rng(6).uniform(-1, 1, (4, IMAGE, IMAGE, 3))
  ]).astype(np.float32)
  loss_fn = functools.partial(
      models_mpp.loss_fn, model=model, train=False, with_accuracy=True)
  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  rng = jax.random.key(7)
  (loss, _), grads = step(params, images, rng)
  # A zero-initialised head predicts uniformly: the loss starts at log(512).
  np.testing.assert_allclose(loss, np.log(512), rtol=1e-5)
  # In numpy: op by op, jax would compile one update per parameter shape.
  new_params = jax.tree_util.tree_map(
      lambda p, g: np.asarray(p) - 0.5 * np.asarray(g), params, grads)
  (new_loss, accuracy), _ = step(new_params, images, rng)
  assert new_loss < loss - 0.1
  assert 0.0 <= accuracy <= 1.0


def test_loss_counts_only_chosen_patches(initial_params):
  # With mask_ratio 0 nothing is chosen: the loss is 0 whatever the head says.
  model = models_mpp.get_model('testing', mask_ratio=0.0)
  params = _copy(initial_params)
  params['mpp_head']['bias'] = jnp.arange(512.0)
  loss = jax.jit(models_mpp.make_loss_fn(model))(params,
                                                 _solid((10, 20, 30), batch=2),
                                                 jax.random.key(0))
  assert float(loss) == 0.0


def test_token_only_last_block_does_not_prune_patch_prediction():
  """The predictor needs every patch's output: the switch must not apply."""
  images = jnp.asarray(
      np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  kw = dict(
      num_classes=None,
      patches=ml_collections.ConfigDict({'size': (4, 4)}),
      hidden_size=16,
      classifier='token',
      transformer=ml_collections.ConfigDict(
          dict(
              num_layers=2,
              num_heads=2,
              mlp_dim=32,
              dropout_rate=0.,
              attention_dropout_rate=0.)))
  plain = models_mpp.MaskedPatchPredictor(**kw)
  switched = models_mpp.MaskedPatchPredictor(token_only_last_block=True, **kw)
  shapes = jax.eval_shape(lambda: plain.init(
      jax.random.key(0), images, train=False, corrupt_patches=False))['params']
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map(  # Every leaf random: no zero head.
      lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  predict = lambda m: jax.jit(lambda p, x: m.apply(
      {'params': p}, x, train=False, corrupt_patches=False)[0])(params, images)
  logits = predict(plain)
  assert logits.shape[:2] == (2, 16)  # Every patch of the 4x4 grid.
  np.testing.assert_array_equal(predict(switched), logits)

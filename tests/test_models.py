"""The models: zoo parameter counts, parity with the original, options, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import official
from vit_jax import checkpoint
from vit_jax import models
from vit_jax import models_vit
from vit_jax.checkpoints import trees
from vit_jax.configs import models as models_config
from vit_jax.configs import project_models
import zoo_sizes

count = zoo_sizes.count
# Mixers: tests/test_mixer.py; BiT ResNets: tests/test_bit.py.
VITS = sorted(n for n, c in models.MODEL_CONFIGS.items() if 'transformer' in c)

# The original's registry (https://github.com/google-research/vision_transformer,
# vit_jax/configs/models.py), its LiT models aside.
ORIGINAL_NAMES = {
    'testing', 'testing-unpooled', 'ViT-Ti_16', 'ViT-S_16', 'ViT-S_32',
    'ViT-B_8', 'ViT-B_16', 'ViT-B_32', 'ViT-L_16', 'ViT-L_32', 'ViT-H_14',
    'ViT-S_16-gap-norep', 'ViT-S_32-gap-norep', 'ViT-B_16-gap-norep',
    'ViT-B_32-gap-norep', 'R+ViT-Ti_16', 'R26+ViT-S_32', 'R26+ViT-B_32',
    'R50+ViT-B_16', 'R50+ViT-L_32', 'Mixer-B_16', 'Mixer-B_32', 'Mixer-L_16'
}


def random_params(model, image_shape, seed=0):
  """Numpy params of the model's shapes (jax.eval_shape), every leaf random.

  Flax's initializers run op by op cost a compilation per shape; where the
  values do not matter, these stand in for `model.init`.
  """
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros(image_shape), train=False))['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype), shapes)


def jit_apply(model, **kw):
  """model.apply(params, x), jitted: one compilation, where op by op each
  new image size costs one per operation."""
  return jax.jit(lambda p, x: model.apply({'params': p}, x, train=False, **kw))


def uniform_images(shape, seed=1):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


@functools.lru_cache(maxsize=None)
def scanned_shapes(name):
  """zoo_sizes.param_shapes with the blocks as one nn.scan: the same leaves,
  stacked, for a fifth of the tracing (one block traced, not up to 40)."""
  model = models.get_model(name, num_classes=1000, scan=True)
  images = jnp.zeros((1, 224, 224, 3))
  return jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), images, train=False))['params']


@pytest.mark.parametrize('name', VITS)
def test_zoo_parameter_count_and_head(name):
  assert name in zoo_sizes.PARAM_COUNTS, (
      f'{name} is registered without a pinned parameter count: add it to '
      'PARAM_COUNTS in tests/zoo_sizes.py.')
  params = scanned_shapes(name)
  assert count(params) == zoo_sizes.PARAM_COUNTS[name]
  config = models.MODEL_CONFIGS[name]
  blocks = params['Transformer']['encoderblock']
  assert jax.tree.leaves(blocks)[0].shape[0] == config.transformer.num_layers
  has_cls = config.classifier in ('token', 'token_unpooled')
  assert ('cls' in params) == has_cls, name
  assert has_cls == (not name.endswith(('gap-norep', 'unpooled'))), name
  assert 'pre_logits' not in params, name  # Zoo configs are for fine-tuning.
  assert params['head']['kernel'].shape == (config.hidden_size, 1000)


def test_zoo_count_of_the_block_loop_equals_the_scan():
  """The counts above are of scanned models; unscanned, as the zoo's models
  run by default, the same leaves are one tree per block (a hybrid: its
  ResNet is outside the scan)."""
  name = 'R+ViT-Ti_16'
  params = zoo_sizes.param_shapes(name)
  assert count(params) == zoo_sizes.PARAM_COUNTS[name]
  layers = models.MODEL_CONFIGS[name].transformer.num_layers
  blocks = {k for k in params['Transformer'] if k.startswith('encoderblock_')}
  assert blocks == {f'encoderblock_{i}' for i in range(layers)}
  scanned = scanned_shapes(name)
  assert set(scanned) == set(params)
  assert count(scanned['Transformer']['encoderblock']) == layers * count(
      params['Transformer']['encoderblock_0'])


def test_the_registries():
  """The original's names in its registry, this project's in its own."""
  assert set(models_config.MODEL_CONFIGS) == ORIGINAL_NAMES
  project = set(project_models.PROJECT_MODEL_CONFIGS)
  assert not project & ORIGINAL_NAMES
  assert set(models.MODEL_CONFIGS) == ORIGINAL_NAMES | project
  for name in ('ViT-g_14', 'ViT-L_16-gap-norep', 'BiT-R50x1'):
    assert models.get_model(name).model_name == name


@pytest.mark.parametrize(
    'registry',
    [models_config.MODEL_CONFIGS, project_models.PROJECT_MODEL_CONFIGS],
    ids=['original', 'project'])
def test_every_registered_model_has_a_pinned_count(registry):
  unpinned = set(registry) - set(zoo_sizes.PARAM_COUNTS)
  assert not unpinned, f'registered without a pinned count: {unpinned}'


def test_every_pinned_model_is_registered():
  registered = set(models_config.MODEL_CONFIGS) | set(
      project_models.PROJECT_MODEL_CONFIGS)
  unknown = set(zoo_sizes.PARAM_COUNTS) - registered
  assert not unknown, f'pinned but not registered: {unknown}'


def test_augreg_names_are_registered_models():
  """configs/augreg.py's names are zoo configs, so their sizes are pinned."""
  registered = [id(c) for c in models.MODEL_CONFIGS.values()]
  for name, config in models_config.AUGREG_CONFIGS.items():
    assert id(config) in registered, name


def test_zoo_dropout_rates_follow_the_original():
  vits = {n: c for n, c in models.MODEL_CONFIGS.items() if 'transformer' in c}
  dropout = {n: c.transformer.dropout_rate for n, c in vits.items()}
  for name in ('ViT-L_16', 'ViT-H_14', 'R50+ViT-B_16', 'R50+ViT-L_32'):
    assert dropout[name] == 0.1
  for name in ('ViT-Ti_16', 'ViT-S_16', 'ViT-B_16', 'ViT-B_32', 'ViT-L_32'):
    assert dropout[name] == 0.0
  assert all(c.transformer.attention_dropout_rate == 0.0 for c in vits.values())


def test_zoo_configs_are_locked():
  config = models.MODEL_CONFIGS['ViT-B_16']
  with pytest.raises(AttributeError):
    config.hiden_size = 3  # A typo must not silently add a field.


@functools.lru_cache(maxsize=None)
def jitted_fixture_model(name, dtype=None):
  """(logits, pre_logits) of fixture `name`, jitted once per model.

  Jitted: op by op, the hybrid's ResNet costs four times its compilation.
  The unjitted path is checked against the original module by module in
  test_intermediates_match_the_original.
  """
  kw = {} if dtype is None else dict(dtype=dtype)
  model = official.model(name, **kw)
  return jax.jit(lambda p, x: official.apply_with_pre_logits(model, p, x))


@pytest.mark.parametrize('name,released_names', official.PARAM_FILES)
def test_parity_with_the_original(name, released_names):
  params = checkpoint.load(official.params_path(name, released_names))
  logits, pre_logits = jitted_fixture_model(name)(params, official.inputs())
  np.testing.assert_allclose(
      logits, official.logits(name), rtol=0, atol=official.ATOL)
  np.testing.assert_allclose(
      pre_logits, official.pre_logits(name), rtol=0, atol=official.ATOL)


def test_intermediates_match_the_original():
  """Every module output of tiny_vit_token matches, so a drift shows where."""
  name = 'tiny_vit_token'
  expected = np.load(official.path('tiny_vit_token_intermediates.npz'))
  params = checkpoint.load(official.params_path(name))
  _, state = official.model(name).apply({'params': params},
                                        official.inputs(),
                                        train=False,
                                        capture_intermediates=True,
                                        mutable=['intermediates'])
  flat = trees.flatten_tree(state['intermediates'])
  checked = 0
  for key in expected.files:
    ours = flat.get(f'{key}/__call__' if key != 'OUTPUT' else '__call__')
    if ours is None:
      continue
    ours = ours[0]
    np.testing.assert_allclose(
        ours, expected[key], rtol=0, atol=official.ATOL, err_msg=key)
    checked += 1
  assert checked >= 20


def test_fresh_model_outputs_head_bias():
  model = models.get_model('testing', num_classes=7, head_bias_init=-10.)
  x = jnp.ones((2, 32, 32, 3))
  # Jitted: Flax's initializers op by op compile once per parameter shape.
  variables = jax.jit(
      lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(
          x)
  logits = jit_apply(model)(variables['params'], x)
  np.testing.assert_array_equal(logits, np.full((2, 7), -10., np.float32))
  assert not np.any(variables['params']['head']['kernel'])


@pytest.mark.parametrize('classifier,shape,has_cls', [
    ('token', (2, 5), True),
    ('gap', (2, 5), False),
    ('unpooled', (2, 4, 5), False),
    ('token_unpooled', (2, 5, 5), True),
])
def test_classifiers(classifier, shape, has_cls):
  model = models.get_model('testing', num_classes=5, classifier=classifier)
  x = uniform_images((2, 32, 32, 3))
  params = random_params(model, x.shape)
  out = jit_apply(model)(params, x)
  assert out.shape == shape
  assert ('cls' in params) == has_cls
  n_tokens = 4 + int(has_cls)
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (
      1, n_tokens, 10)


def test_gap_is_the_mean_of_the_unpooled_features():
  kw = dict(num_classes=0)
  x = uniform_images((2, 32, 32, 3))
  gap = models.get_model('testing', classifier='gap', **kw)
  unpooled = models.get_model('testing', classifier='unpooled', **kw)
  params = random_params(gap, x.shape)
  np.testing.assert_allclose(
      jit_apply(gap)(params, x),
      jit_apply(unpooled)(params, x).mean(axis=1),
      rtol=0,
      atol=1e-6)


def test_representation_layer_is_dense_tanh():
  model = models.get_model('testing', num_classes=3, representation_size=6)
  x = uniform_images((2, 32, 32, 3))
  params = random_params(model, x.shape)
  assert params['pre_logits']['kernel'].shape == (10, 6)
  features = models.get_model('testing', num_classes=0, representation_size=6)
  rep = jit_apply(features)(params, x)
  assert rep.shape == (2, 6)
  assert np.all(np.abs(rep) < 1)  # tanh
  no_rep = models.get_model('testing', num_classes=3)
  assert 'pre_logits' not in random_params(no_rep, x.shape)


def test_dropout_only_in_training():
  model = models.get_model('testing', num_classes=0)  # dropout_rate 0.1
  x = uniform_images((2, 32, 32, 3))
  params = random_params(model, x.shape)
  jitted = {
      train:
          jax.jit(lambda p, x, key, train=train: model.apply(
              {'params': p}, x, train=train, rngs={'dropout': key}))
      for train in (False, True)
  }
  apply = lambda train, seed: jitted[train](params, x, jax.random.PRNGKey(seed))
  np.testing.assert_array_equal(apply(False, 0), apply(False, 1))
  np.testing.assert_array_equal(apply(True, 0), apply(True, 0))
  assert not np.allclose(apply(True, 0), apply(True, 1))
  assert not np.allclose(apply(True, 0), apply(False, 0))


# Position embeddings (paper Appendix D.4).


def _posembed_output(model, params, x):
  _, state = jit_apply(
      model, capture_intermediates=True, mutable=['intermediates'])(params, x)
  inter = state['intermediates']
  return (inter['Transformer']['posembed_input']['__call__'][0],
          inter['embedding']['__call__'][0])


def test_posemb_learn_2d_concatenates_row_and_column_tables():
  model = models.get_model('testing', num_classes=3, posemb='learn_2d')
  x = uniform_images((2, 48, 32, 3))  # 3x2 grid
  params = random_params(model, x.shape)
  pe = params['Transformer']['posembed_input']
  assert pe['pos_embedding_row'].shape == (3, 5)
  assert pe['pos_embedding_col'].shape == (2, 5)
  assert pe['pos_embedding_cls'].shape == (1, 10)
  out, patches = _posembed_output(model, params, x)
  added = np.asarray(out[0, 1:] - patches[0].reshape(6, 10))
  for i in range(3):
    for j in range(2):
      np.testing.assert_allclose(
          added[i * 2 + j],
          np.concatenate(
              [pe['pos_embedding_row'][i], pe['pos_embedding_col'][j]]),
          atol=1e-6)
  cls = params['cls'][0, 0]
  np.testing.assert_allclose(
      out[0, 0] - cls, pe['pos_embedding_cls'][0], atol=1e-6)


def test_posemb_sincos2d_is_fixed_and_matches_the_formula():
  model = models.get_model(
      'testing', num_classes=3, hidden_size=8, posemb='sincos2d')
  x = uniform_images((1, 32, 48, 3))  # 2x3 grid
  params = random_params(model, x.shape)
  assert 'posembed_input' not in params['Transformer']
  out, patches = _posembed_output(model, params, x)
  added = np.asarray(out[0, 1:] - patches[0].reshape(6, 8))
  omega = 1 / 10000**(np.arange(2) / 2)
  for row in range(2):
    for col in range(3):
      expected = np.concatenate([
          np.sin(col * omega),
          np.cos(col * omega),
          np.sin(row * omega),
          np.cos(row * omega)
      ])
      np.testing.assert_allclose(added[row * 3 + col], expected, atol=1e-6)
  np.testing.assert_allclose(out[0, 0], params['cls'][0, 0], atol=1e-7)


def test_posemb_none_has_no_parameters_and_adds_nothing():
  model = models.get_model('testing', num_classes=3, posemb='none')
  x = jnp.asarray(uniform_images((1, 32, 32, 3)))
  params = random_params(model, x.shape)
  assert 'posembed_input' not in params['Transformer']
  assert count(params) == count(
      random_params(models.get_model('testing', num_classes=3),
                    x.shape)) - 5 * 10
  # Without position information the model is permutation-invariant over
  # patches: swapping two patches leaves the class-token output unchanged.
  swapped = x.at[:, :16, :16].set(x[:, 16:, 16:]).at[:, 16:,
                                                     16:].set(x[:, :16, :16])
  params = jax.tree.map(lambda p: p + 0.05, params)
  apply = jit_apply(model)
  np.testing.assert_allclose(
      apply(params, x), apply(params, swapped), atol=1e-5)


def test_posemb_learn_default_is_the_original():
  model = models.get_model('testing', num_classes=3)
  assert model.posemb == 'learn'
  assert models.get_model('testing', num_classes=3, posemb='learn') == model


# Compute dtype.


def test_bfloat16_compute_keeps_float32_params_and_is_close():
  name = 'tiny_vit_token'
  params = checkpoint.load(official.params_path(name))
  x = official.inputs()
  f32 = jitted_fixture_model(name)(params, x)[0]
  bf16 = jitted_fixture_model(name, jnp.bfloat16)(params, x)[0]
  assert bf16.dtype == jnp.float32
  # Close to float32, but really computed in bfloat16 (~3 significant digits).
  assert 1e-4 < np.abs(bf16 - f32).max() < 5e-2 * np.abs(f32).max()
  model_bf16 = official.model(name, dtype=jnp.bfloat16)
  init = jax.eval_shape(
      lambda: model_bf16.init(jax.random.PRNGKey(0), x, train=False))['params']
  assert {p.dtype for p in jax.tree.leaves(init)} == {jnp.dtype('float32')}


def test_explicit_float32_dtype_is_the_default():
  name = 'tiny_hybrid_r2x2'
  params = checkpoint.load(official.params_path(name))
  x = official.inputs()
  np.testing.assert_array_equal(
      jitted_fixture_model(name)(params, x)[0],
      jitted_fixture_model(name, jnp.float32)(params, x)[0])


# Attention weights on request.


def test_attention_weights_match_the_originals_queries_and_keys():
  name = 'tiny_vit_token'
  model = official.model(name)
  params = checkpoint.load(official.params_path(name))
  weights = models.attention_weights(model, params, official.inputs())
  inter = np.load(official.path('tiny_vit_token_intermediates.npz'))
  assert len(weights) == 2
  for i, w in enumerate(weights):
    prefix = f'Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/'
    q, k = inter[prefix + 'query'], inter[prefix + 'key']  # [B, L, H, d]
    logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    assert w.shape == (2, 2, 17, 17)
    np.testing.assert_allclose(w, expected, atol=1e-5)


def test_attention_weights_leave_outputs_and_params_unchanged():
  model = models.get_model('testing', num_classes=3)
  x = uniform_images((1, 32, 32, 3))
  assert set(
      jax.eval_shape(
          lambda: model.init(jax.random.PRNGKey(0), x, train=False))) == {
              'params'
          }
  params = random_params(model, x.shape)
  plain = jit_apply(model)(params, x)
  with_state, state = jit_apply(model, mutable=['intermediates'])(params, x)
  np.testing.assert_array_equal(plain, with_state)
  assert 'intermediates' in state


# Bad input: errors that name the sizes and the fix.


@pytest.fixture(scope='module')
def testing_model_and_params():
  model = models.get_model('testing', num_classes=3)
  return model, random_params(model, (1, 32, 32, 3))


def test_error_image_not_a_multiple_of_the_patch(testing_model_and_params):
  model, params = testing_model_and_params
  with pytest.raises(
      ValueError,
      match=r'40x32 is not a multiple of the patch '
      r'size 16x16.*32x32 or 48x32'):
    model.apply({'params': params}, jnp.zeros((1, 40, 32, 3)), train=False)


def test_error_hybrid_image_not_a_multiple_of_the_stride():
  model = models.get_model('R+ViT-Ti_16', num_classes=3)
  with pytest.raises(
      ValueError,
      match=r'100x96 is not a multiple of 32x32 '
      r'\(ResNet stem stride'):
    jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, 100, 96, 3)), train=False))


def test_error_wrong_rank(testing_model_and_params):
  model, params = testing_model_and_params
  with pytest.raises(
      ValueError,
      match=r'\[batch, height, width, channels\].*'
      r'\(32, 32, 3\).*x\[None\]'):
    model.apply({'params': params}, jnp.zeros((32, 32, 3)), train=False)


def test_error_wrong_channels(testing_model_and_params):
  model, params = testing_model_and_params
  with pytest.raises(
      ValueError,
      match=r'1 channels but the model expects 3.*'
      r'grayscale to RGB'):
    model.apply({'params': params}, jnp.zeros((1, 32, 32, 1)), train=False)


def test_error_token_count_does_not_match_posemb(testing_model_and_params):
  model, params = testing_model_and_params
  with pytest.raises(
      ValueError,
      match=r'48x48 give a 3x3 grid of tokens = 10 '
      r'tokens.*has 5 rows \(a 2x2 grid, i.e. 32x32 images\).*'
      r'load_pretrained'):
    model.apply({'params': params}, jnp.zeros((1, 48, 48, 3)), train=False)


def test_error_unknown_classifier():
  with pytest.raises(
      ValueError,
      match=r"Unknown classifier 'cls'.*'token', "
      r"'gap', 'unpooled', 'token_unpooled'"):
    models.get_model('testing', num_classes=3, classifier='cls')


def test_error_unknown_posemb():
  with pytest.raises(ValueError, match=r"Unknown posemb 'learned'"):
    models.get_model('testing', num_classes=3, posemb='learned')


def test_error_unknown_model_name():
  with pytest.raises(
      ValueError,
      match=r"Unknown model name 'ViT-B_61'.*"
      r"Did you mean ViT-B_16"):
    models.get_model('ViT-B_61')


def test_model_name_spellings():
  assert models.canonical_name('ViT-B/16') == 'ViT-B_16'
  assert models.canonical_name('vit-b_16') == 'ViT-B_16'
  assert models.canonical_name('R50+ViT-B/16') == 'R50+ViT-B_16'


def test_original_module_names_are_exported():
  for name in ('AddPositionEmbs', 'MlpBlock', 'Encoder1DBlock', 'Encoder',
               'VisionTransformer', 'StdConv', 'ResidualUnit', 'ResNetStage'):
    assert hasattr(models, name), name
  assert models.VisionTransformer is models_vit.VisionTransformer

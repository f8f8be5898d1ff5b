"""The position-embedding ablation of the paper (Appendix D.4, Table 8).

1-D relative attention (`posemb='relative'`) and the learned tables added at
the input, at every layer, or at every layer from one shared table
(`posemb_where`): their numbers against direct computations, names,
checkpoints, fine-tuning resize and config errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import embedded
from vit_jax import checkpoint
from vit_jax import models
from vit_jax.checkpoints import layouts
from vit_jax.checkpoints import posembed
from vit_jax.checkpoints import trees
from vit_jax.layers import relative_attention
from vit_jax.run_config import validation
from vit_jax.run_config.errors import ConfigError

# The 'testing' model (hidden 10, patch 16), 2 heads of 5, 2 blocks; 32x48
# images are a 2x3 grid: 6 patches (+ class token).
IMAGE_HW = (32, 48)
GRID = (2, 3)


def make_model(posemb='learn', where='input', classifier='token', **kw):
  return models.get_model(
      'testing',
      posemb=posemb,
      posemb_where=where,
      classifier=classifier,
      transformer=dict(
          num_layers=2,
          mlp_dim=8,
          num_heads=2,
          dropout_rate=0.,
          attention_dropout_rate=0.),
      **kw)


def shapes(model, image_hw=IMAGE_HW):
  images = jax.ShapeDtypeStruct((1, *image_hw, 3), jnp.float32)
  return jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
      images)['params']


def init(model, image_hw=IMAGE_HW, seed=0):
  """Numpy params of the model's shapes, every leaf random (none zero)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32),
      shapes(model, image_hw))


def apply(model, params, x):
  """The model's output (jitted: faster than op by op here)."""
  return jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(
      params, x)


def images(seed=0, image_hw=IMAGE_HW, batch=2):
  return jax.random.uniform(
      jax.random.PRNGKey(seed), (batch, *image_hw, 3), minval=-1., maxval=1.)


def flat(tree):
  return {k: np.asarray(v) for k, v in trees.flatten_tree(tree).items()}


def nest(flat_dict):
  return trees.recover_tree(list(flat_dict), list(flat_dict.values()))


def posemb_leaves(params):
  return {k: v.shape for k, v in flat(params).items() if 'posembed' in k}


@pytest.fixture(scope='module')
def relative_reference():
  """(params, images, output) of the plain relative model, computed once for
  the tests that compare a variant with it."""
  params, x = init(make_model('relative')), images()
  return params, x, apply(make_model('relative'), params, x)


def test_relative_bias_equals_explicit_loops():
  n, prefix, heads, dh = 6, 1, 2, 5

  @jax.jit  # One compilation, not one per operation.
  def table_query_bias():
    table = relative_attention.RelativePositionEmbedding(
        num_heads=heads, num_prefix_tokens=prefix).init_with_output(
            jax.random.PRNGKey(1), n + prefix, heads * dh)[0]
    query = jax.random.normal(jax.random.PRNGKey(2), (2, n + prefix, heads, dh))
    return table, query, relative_attention.relative_logits(
        query, table, relative_attention.offset_index(n, prefix, n + prefix))

  table, query, bias = table_query_bias()
  q_np, t_np = np.asarray(query, np.float64), np.asarray(table, np.float64)
  assert t_np.shape == (2 * n, heads, dh)  # 2N-1 offsets + the class row.
  expected = np.zeros(bias.shape)
  for b in range(2):
    for h in range(heads):
      for q in range(n + prefix):
        for k in range(n + prefix):
          if q < prefix or k < prefix:
            row = t_np[-1, h]  # The class token's own row.
          else:
            row = t_np[(q - prefix) - (k - prefix) + n - 1, h]
          expected[b, h, q, k] = q_np[b, q, h] @ row / np.sqrt(dh)
  np.testing.assert_allclose(bias, expected, atol=1e-6, rtol=0)


def test_relative_with_zero_tables_is_posemb_none(relative_reference):
  params, x, expected = relative_reference
  params = flat(params)
  zeroed = {
      k: np.zeros_like(v) if 'posembed_relative' in k else v
      for k, v in params.items()
  }
  without = {k: v for k, v in params.items() if 'posembed_relative' not in k}
  out = apply(make_model('relative'), nest(zeroed), x)
  np.testing.assert_allclose(
      out, apply(make_model('none'), nest(without), x), atol=1e-6)
  assert not np.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize('impl', ['heads_major', 'xla'])
def test_relative_under_every_attention_impl(impl, relative_reference):
  params, x, expected = relative_reference
  model = make_model('relative', attention_impl=impl)
  np.testing.assert_allclose(apply(model, params, x), expected, atol=1e-5)
  # Collecting the attention weights runs the reference path, bias included.
  out, inter = jax.jit(lambda p, x: model.apply(
      {'params': p}, x, train=False, mutable=['intermediates']))(params, x)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  assert 'encoderblock_1' in inter['intermediates']['Transformer']


def test_relative_cudnn_is_the_gpu_kernel_with_the_bias():
  if jax.default_backend() == 'gpu':
    pytest.skip('checked on CPU: cuDNN needs a GPU')
  with pytest.raises(ValueError, match="attention_impl='cudnn'"):
    apply(
        make_model('relative', attention_impl='cudnn'),
        init(make_model('relative')), images())


def permute_patches(x, perm, patch=16):
  b, h, w, c = x.shape
  gh, gw = h // patch, w // patch
  p = x.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
  p = p.reshape(b, gh * gw, patch, patch, c)[:, perm]
  p = p.reshape(b, gh, gw, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return p.reshape(b, h, w, c)


def test_relative_sees_the_order_none_does_not():
  x = images()
  perm = np.array([4, 0, 5, 2, 1, 3])
  x_perm = permute_patches(x, perm)
  assert not np.allclose(x, x_perm)
  for posemb, invariant in (('none', True), ('relative', False)):
    model = make_model(posemb, classifier='gap')
    params = init(model)
    out = apply(model, params, x)
    out_perm = apply(model, params, x_perm)
    assert np.allclose(out, out_perm, atol=1e-5) == invariant, posemb


# Parameters besides the position embeddings: 'none' adds nothing.
BASE_COUNT = 9_036
POSEMB_PARAMS = {
    ('learn', 'input'): {
        'Transformer/posembed_input/pos_embedding': (1, 7, 10)
    },
    ('learn', 'every_layer'): {
        'Transformer/encoderblock_0/posembed/pos_embedding': (1, 7, 10),
        'Transformer/encoderblock_1/posembed/pos_embedding': (1, 7, 10),
    },
    ('learn', 'every_layer_shared'): {
        'Transformer/posembed_shared/pos_embedding': (1, 7, 10)
    },
    ('learn_2d', 'input'): {
        'Transformer/posembed_input/pos_embedding_cls': (1, 10),
        'Transformer/posembed_input/pos_embedding_row': (2, 5),
        'Transformer/posembed_input/pos_embedding_col': (3, 5),
    },
    ('learn_2d', 'every_layer'): {
        f'Transformer/encoderblock_{i}/posembed/{name}': shape for i in range(2)
        for name, shape in (('pos_embedding_cls', (1, 10)),
                            ('pos_embedding_row', (2, 5)), ('pos_embedding_col',
                                                            (3, 5)))
    },
    ('learn_2d', 'every_layer_shared'): {
        'Transformer/posembed_shared/pos_embedding_cls': (1, 10),
        'Transformer/posembed_shared/pos_embedding_row': (2, 5),
        'Transformer/posembed_shared/pos_embedding_col': (3, 5),
    },
    ('relative', 'input'): {
        f'Transformer/encoderblock_{i}/posembed_relative/{name}': shape
        for i in range(2) for name, shape in (('rel_embedding', (11, 2, 5)),
                                              ('rel_embedding_cls', (2, 5)))
    },
    ('none', 'input'): {},
}


@pytest.mark.parametrize('posemb,where', sorted(POSEMB_PARAMS))
def test_parameter_names_and_counts(posemb, where):
  shapes = jax.eval_shape(lambda: init(make_model(posemb, where)))
  leaves = {k: v.shape for k, v in trees.flatten_tree(shapes).items()}
  expected = POSEMB_PARAMS[(posemb, where)]
  assert {k: v for k, v in leaves.items() if 'posembed' in k} == expected
  count = sum(int(np.prod(s)) for s in leaves.values())
  assert count == BASE_COUNT + sum(int(np.prod(s)) for s in expected.values())


@pytest.mark.parametrize('posemb,where', sorted(POSEMB_PARAMS))
def test_checkpoint_round_trip(posemb, where, tmp_path):
  model = make_model(posemb, where)
  params = flat(init(model))
  path = str(tmp_path / 'params.npz')
  checkpoint.save(nest(params), path)
  loaded = flat(checkpoint.load(path))
  assert sorted(loaded) == sorted(params)
  for key, value in params.items():
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)


@pytest.mark.parametrize('posemb', ['learn_2d'])
def test_every_layer_shared_is_every_layer_with_one_table(posemb):
  """The shared table is the per-block tables tied: same outputs, and its
  gradient is the sum of theirs."""
  shared_model = make_model(posemb, 'every_layer_shared')
  layer_model = make_model(posemb, 'every_layer')
  shared = flat(init(shared_model))
  tables = {
      k[len('Transformer/posembed_shared/'):]: v
      for k, v in shared.items()
      if 'posembed_shared' in k
  }
  layered = {k: v for k, v in shared.items() if 'posembed_shared' not in k}
  for i in range(2):
    for name, table in tables.items():
      layered[f'Transformer/encoderblock_{i}/posembed/{name}'] = table
  x = images()

  def loss_and_grad(model, params):  # One compilation per model.
    return jax.jit(
        jax.value_and_grad(
            lambda p: jnp.sum(model.apply({'params': p}, x, train=False)**2)))(
                params)

  loss_shared, g_shared = loss_and_grad(shared_model, nest(shared))
  loss_layered, g_layered = loss_and_grad(layer_model, nest(layered))
  np.testing.assert_allclose(loss_shared, loss_layered, rtol=1e-6)
  g_shared, g_layered = flat(g_shared), flat(g_layered)
  for name in tables:
    per_block = [
        g_layered[f'Transformer/encoderblock_{i}/posembed/{name}']
        for i in range(2)
    ]
    assert all(np.abs(g).max() > 0 for g in per_block)
    np.testing.assert_allclose(
        g_shared[f'Transformer/posembed_shared/{name}'],
        per_block[0] + per_block[1],
        atol=1e-5)


def test_every_layer_first_table_alone_is_the_input_table():
  x = images()
  layered = flat(init(make_model('learn', 'every_layer')))
  table = layered['Transformer/encoderblock_0/posembed/pos_embedding']
  layered['Transformer/encoderblock_1/posembed/pos_embedding'] = (
      np.zeros_like(table))
  at_input = {k: v for k, v in layered.items() if '/posembed/' not in k}
  at_input['Transformer/posembed_input/pos_embedding'] = table
  np.testing.assert_allclose(
      apply(make_model('learn', 'every_layer'), nest(layered), x),
      apply(make_model('learn'), nest(at_input), x),
      atol=1e-6)


# Relative attention without remat: its forward pass is checked under 'full'.
@pytest.mark.parametrize('posemb,where,remat',
                         [('relative', 'input', 'full'),
                          ('learn', 'every_layer', 'none'),
                          ('learn_2d', 'every_layer_shared', 'full')])
def test_scan_equals_the_loop(posemb, where, remat):
  x = images()
  params = init(make_model(posemb, where))
  expected = apply(make_model(posemb, where), params, x)
  scanned = make_model(posemb, where, scan=True, remat_policy=remat)
  stacked = layouts.layers_to_scan(jax.tree.map(np.asarray, params), 2)
  assert (jax.tree.map(np.shape,
                       stacked) == jax.tree.map(lambda s: s.shape,
                                                shapes(scanned)))
  np.testing.assert_allclose(apply(scanned, stacked, x), expected, atol=1e-5)
  if remat != 'none':  # Recomputed in the backward pass: the same gradients.
    grad = lambda model, p: jax.jit(  # pylint: disable=g-long-lambda
        jax.grad(lambda p: jnp.sum(
            model.apply({'params': p}, x, train=False)**2)))(
                p)
    expected_grads = layouts.layers_to_scan(
        jax.tree.map(np.asarray, grad(make_model(posemb, where), params)), 2)
    for key, value in flat(grad(scanned, stacked)).items():
      np.testing.assert_allclose(
          value, flat(expected_grads)[key], atol=1e-4, err_msg=key)


def test_relative_in_bfloat16_is_close(relative_reference):
  params, x, expected = relative_reference
  out = apply(make_model('relative', dtype=jnp.bfloat16), params, x)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, atol=0.05)
  assert not np.allclose(out, expected, atol=1e-7)  # bfloat16 did run.


def test_relative_weights_keep_a_grid_and_resample_one_row_linearly():
  np.testing.assert_array_equal(
      posembed.relative_weights((2, 3), (2, 3)), np.eye(11))
  # A single row: the offsets are column displacements, resampled as
  # 'bilinear_aligned' resamples a 1-D table (2w-1 -> 2w'-1 points).
  np.testing.assert_allclose(
      posembed.relative_weights((1, 3), (1, 5)),
      posembed._bilinear_aligned_weights(5, 9),
      atol=1e-12)


def test_relative_weights_2x2_to_3x3_by_hand():
  weights = posembed.relative_weights((2, 2), (3, 3))
  assert weights.shape == (17, 7)
  row = lambda o: weights[o + 8]  # New offset o; old rows are o + 3.
  # Offset 3 on 3x3 is one row down (dr 1, dc 0): half a row on 2x2.
  np.testing.assert_allclose(row(3), np.eye(7)[[3, 5]].mean(0))
  # Offset 1 is one column right: half a column, between offsets 0 and 1.
  np.testing.assert_allclose(row(1), np.eye(7)[[3, 4]].mean(0))
  # Offset 2 is (1, -1): (0.5, -0.5), between offsets -1, 0, 1 and 2.
  np.testing.assert_allclose(row(2), np.eye(7)[[2, 3, 4, 5]].mean(0))
  np.testing.assert_allclose(row(0), np.eye(7)[3])
  np.testing.assert_allclose(row(8), np.eye(7)[6])  # Corner to corner.


@pytest.mark.parametrize('scan', [False, True])
def test_load_pretrained_resizes_every_table(scan, tmp_path):
  new_hw = (48, 48)  # Grid 2x3 -> 3x3.
  config = {
      'patches': {
          'size': (16, 16)
      },
      'classifier': 'token',
      'representation_size': None
  }
  for posemb, where in (('relative', 'input'), ('learn', 'every_layer'),
                        ('learn_2d', 'every_layer_shared')):
    old = flat(init(make_model(posemb, where)))
    path = str(tmp_path / f'{posemb}_{where}.npz')
    checkpoint.save(nest(old), path)
    new_init = init(make_model(posemb, where, scan=scan), new_hw)
    restored = checkpoint.load_pretrained(
        pretrained_path=path,
        init_params=new_init,
        model_config=config,
        image_size=new_hw,
        pretrained_image_size=IMAGE_HW)
    loaded = flat(layouts.scan_to_layers(restored) if scan else restored)
    assert sorted(loaded) == sorted(old)
    for key, value in old.items():
      expected = value  # Class rows, and the 3 columns of 3x3.
      if key.endswith('rel_embedding'):
        expected = posembed.resample_relative(value, GRID, (3, 3))
        assert expected.shape == (17, 2, 5)
      elif key.endswith('/pos_embedding'):
        expected = checkpoint.interpolate_posembed(
            value, 10, True, grid=(3, 3), old_grid=GRID)
      elif key.endswith('pos_embedding_row'):
        expected = posembed.resample_grid(value[:, None], (3, 1))[:, 0]
      np.testing.assert_allclose(loaded[key], expected, atol=1e-6, err_msg=key)


def test_unknown_or_unfit_choices_fail_clearly():
  with pytest.raises(ValueError, match=r"Unknown posemb_where 'every-layer'"):
    make_model('learn', 'every-layer')
  with pytest.raises(ValueError, match=r"needs posemb 'learn' or 'learn_2d'"):
    make_model('relative', 'every_layer')
  with pytest.raises(ValueError, match=r"posemb='sincos2d' takes"):
    make_model('sincos2d', 'every_layer_shared')
  config = embedded.get_config()
  config.model.posemb_where = 'everywhere'
  with pytest.raises(ConfigError, match=r'config.model.posemb_where'):
    validation.check_config(config, device_count=1)
  config.model.posemb_where = 'every_layer'
  config.model.posemb = 'none'
  with pytest.raises(ConfigError, match=r"needs posemb 'learn' or 'learn_2d'"):
    validation.check_config(config, device_count=1)
  config.model.posemb = 'learn_2d'
  validation.check_config(config, device_count=1)


def test_relative_with_token_only_last_block(relative_reference):
  """The last block's class-token row takes its row of the offset index."""
  params, x, expected = relative_reference
  np.testing.assert_allclose(
      apply(make_model('relative', token_only_last_block=True), params, x),
      expected,
      atol=1e-5)

"""The speed switches compute the same model: scan, remat, fused attention, bf16.

Each switch (`VisionTransformer.scan`, `.remat_policy`, `.attention_impl`,
`.dtype`) is compared against the default graph, which tests/test_models.py
pins to the original implementation's outputs.
"""

import functools
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import official
from vit_jax import checkpoint
from vit_jax import models
from vit_jax import models_vit
from vit_jax.checkpoints import layouts
from vit_jax.checkpoints import trees
from vit_jax.layers import attention

ATOL = 1e-5
NUM_LAYERS = 2


def tiny(**kw) -> models.VisionTransformer:
  """2 blocks, hidden 32, 8x8 patches: 5 tokens on 16x16 images."""
  config = dict(
      num_classes=10,
      patches=ml_collections.ConfigDict({'size': (8, 8)}),
      hidden_size=32,
      transformer=ml_collections.ConfigDict(
          dict(
              num_layers=NUM_LAYERS,
              num_heads=2,
              mlp_dim=64,
              dropout_rate=0.,
              attention_dropout_rate=0.)),
      representation_size=16)
  config.update(kw)
  return models.VisionTransformer(**config)


def with_dropout(rate=0.1, attention_rate=0.1):
  return ml_collections.ConfigDict(
      dict(
          num_layers=NUM_LAYERS,
          num_heads=2,
          mlp_dim=64,
          dropout_rate=rate,
          attention_dropout_rate=attention_rate))


@pytest.fixture(scope='module')
def images():
  return jnp.asarray(
      np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)


@pytest.fixture(scope='module')
def params(images):
  """Per-layer parameters with a random head (the fresh one is all zeros)."""
  rng = np.random.default_rng(1)
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(x + 0.05 * rng.standard_normal(x.shape), jnp.float32
                           ), init(tiny(), images))


@pytest.fixture(scope='module')
def stepped(images, params):
  """`params` after one training step of the default model (no dropout)."""
  return train_step(tiny(), params, images)


@pytest.fixture(scope='module')
def logits(images, params):
  """Logits of the default model."""
  return apply(tiny(), params, images)


def init(model, images):
  return jax.jit(functools.partial(model.init, train=False))(jax.random.key(0),
                                                             images)['params']


def labels(n=4, classes=10):
  return jax.nn.one_hot(np.arange(n) % classes, classes)


def train_step(model, params, images, rng=None):
  """Params after one clipped SGD-momentum step, as the fine-tuning recipe."""
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))

  def loss_fn(p):
    logits = model.apply(
        {'params': p},
        images,
        train=True,
        rngs={'dropout': rng if rng is not None else jax.random.key(2)})
    return optax.softmax_cross_entropy(logits, labels()).mean()

  @jax.jit
  def step(p):
    grads = jax.grad(loss_fn)(p)
    updates, _ = tx.update(grads, tx.init(p), p)
    return optax.apply_updates(p, updates)

  return step(params)


def assert_trees_close(a, b, atol=ATOL):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for (path, x), y in zip(
      jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(
        np.asarray(x),
        np.asarray(y),
        atol=atol,
        rtol=0,
        err_msg=jax.tree_util.keystr(path))


def apply(model, params, images):
  return jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(
      params, images)


# ---- Layout conversion.


def test_scanned_init_has_the_stacked_layout(images, params):
  scanned = init(tiny(scan=True), images)
  expected = jax.tree_util.tree_map(np.shape,
                                    layouts.layers_to_scan(params, NUM_LAYERS))
  assert jax.tree_util.tree_map(np.shape, scanned) == expected
  assert 'encoderblock' in scanned['Transformer']
  assert scanned['Transformer']['encoderblock']['MlpBlock_0']['Dense_0'][
      'kernel'].shape == (NUM_LAYERS, 32, 64)


def test_layouts_round_trip_nested_and_flat(params):
  scanned = layouts.layers_to_scan(params, NUM_LAYERS)
  assert layouts.is_scanned(scanned) and not layouts.is_scanned(params)
  for i in range(NUM_LAYERS):
    np.testing.assert_array_equal(
        scanned['Transformer']['encoderblock']['LayerNorm_0']['scale'][i],
        params['Transformer'][f'encoderblock_{i}']['LayerNorm_0']['scale'])
  back = layouts.scan_to_layers(scanned)
  assert_trees_close(back, params, atol=0)

  flat = {k: np.asarray(v) for k, v in trees.flatten_tree(params).items()}
  flat_scanned = layouts.layers_to_scan(flat, NUM_LAYERS)
  assert ('Transformer/encoderblock/MultiHeadDotProductAttention_0/query/'
          'kernel') in flat_scanned
  assert not any('encoderblock_' in k for k in flat_scanned)
  assert flat_scanned['Transformer/encoderblock/MlpBlock_0/Dense_1/bias'].shape \
      == (NUM_LAYERS, 32)
  assert layouts.scan_to_layers(flat_scanned).keys() == flat.keys()
  for k, v in layouts.scan_to_layers(flat_scanned).items():
    np.testing.assert_array_equal(v, flat[k])


def test_layouts_convert_an_optimizer_state(params):
  tx = optax.chain(optax.clip_by_global_norm(1.), optax.sgd(0.1, momentum=0.9))
  state = tx.init(params)
  state = jax.tree_util.tree_map(lambda x: x + 1, state)  # Not all zeros.
  scanned = layouts.layers_to_scan(state, NUM_LAYERS)
  expected = tx.init(layouts.layers_to_scan(params, NUM_LAYERS))
  assert (jax.tree_util.tree_structure(scanned) == jax.tree_util.tree_structure(
      expected))
  assert_trees_close(layouts.scan_to_layers(scanned), state, atol=0)


def test_layouts_errors_name_the_problem(params):
  with pytest.raises(ValueError, match=r'num_layers=4'):
    layouts.layers_to_scan(params, 4)
  broken = jax.tree_util.tree_map(lambda x: x, params)
  del broken['Transformer']['encoderblock_1']['LayerNorm_0']
  with pytest.raises(ValueError, match='encoderblock_1 has parameters'):
    layouts.layers_to_scan(broken, NUM_LAYERS)
  ragged = {'encoderblock': {'a': np.zeros((3, 2)), 'b': np.zeros((2, 2))}}
  with pytest.raises(ValueError, match='leading layer axis'):
    layouts.scan_to_layers(ragged)


# ---- scan.


@pytest.mark.parametrize('name', ['testing', 'tiny_vit_token'])
def test_official_fixture_in_a_scanned_model(name):
  model = official.model(name, scan=True)
  params = layouts.layers_to_scan(
      checkpoint.load(official.params_path(name)), model.transformer.num_layers)
  np.testing.assert_allclose(
      apply(model, params, official.inputs()),
      official.logits(name),
      atol=official.ATOL,
      rtol=0)


def test_scan_matches_loop_outputs_and_training_step(images, params, logits,
                                                     stepped):
  scan = tiny(scan=True)
  scanned = layouts.layers_to_scan(params, NUM_LAYERS)
  np.testing.assert_allclose(
      apply(scan, scanned, images), logits, atol=ATOL, rtol=0)
  after_loop = stepped
  after_scan = train_step(scan, scanned, images)
  assert_trees_close(layouts.scan_to_layers(after_scan), after_loop)
  # The step moved the parameters, so the comparison above is not vacuous.
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()),
                                 after_loop, params)
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-3


def test_scan_draws_different_dropout_masks_per_layer(images, params):
  model = tiny(scan=True, transformer=with_dropout(0.5, 0.))
  scanned = layouts.layers_to_scan(params, NUM_LAYERS)
  _, state = model.apply(
      {'params': scanned},
      images,
      train=True,
      rngs={'dropout': jax.random.key(3)},
      capture_intermediates=lambda m, _: isinstance(m, models_vit.MlpBlock),
      mutable=['intermediates'])
  # The MLP output of every layer, [layers, batch, tokens, hidden]; its zeros
  # are the second dropout's mask.
  out = state['intermediates']['Transformer']['encoderblock']['MlpBlock_0'][
      '__call__'][0]
  assert out.shape[0] == NUM_LAYERS
  masks = np.asarray(out) == 0
  assert 0.3 < masks.mean() < 0.7
  for i in range(1, NUM_LAYERS):
    assert (masks[i] != masks[0]).mean() > 0.2


def test_scan_attention_weights_have_a_layer_axis(images, params):
  model = tiny(scan=True)
  _, state = model.apply({'params': layouts.layers_to_scan(params, NUM_LAYERS)},
                         images,
                         train=False,
                         mutable=['intermediates'])
  scanned = state['intermediates']['Transformer']['encoderblock'][
      'MultiHeadDotProductAttention_0']['attention_weights'][0]
  expected = models.attention_weights(tiny(), params, images)
  assert scanned.shape == (NUM_LAYERS, 4, 2, 5, 5)
  assert len(expected) == NUM_LAYERS
  for i in range(NUM_LAYERS):
    np.testing.assert_allclose(scanned[i], expected[i], atol=ATOL, rtol=0)


# ---- remat.


@pytest.mark.parametrize('scan,policy', [(False, 'full'), (True, 'save_dots')])
def test_remat_matches_no_remat(images, params, scan, policy):
  # Dropout on: remat must recompute the very same masks.
  dropout = with_dropout(0.1, 0.1)
  p = layouts.layers_to_scan(params, NUM_LAYERS) if scan else params
  rng = jax.random.key(5)
  base_model = tiny(scan=scan, transformer=dropout)
  base = train_step(base_model, p, images, rng)
  model = tiny(scan=scan, transformer=dropout, remat_policy=policy)
  if not scan:  # Remat changes only the backward pass; one check suffices.
    np.testing.assert_array_equal(
        apply(model, p, images), apply(base_model, p, images))
  assert_trees_close(train_step(model, p, images, rng), base)


def _count_dots_in_gradient(model, params, images):
  loss = lambda p: model.apply({'params': p}, images, train=False).sum()
  return str(jax.make_jaxpr(jax.grad(loss))(params)).count('dot_general')


def test_remat_recomputes_in_the_backward_pass(images, params):
  """The rematerialised gradient really recomputes the blocks' matmuls."""
  none = _count_dots_in_gradient(tiny(), params, images)
  full = _count_dots_in_gradient(tiny(remat_policy='full'), params, images)
  # Of the 8 matmuls per block (q, k, v, out, 2 attention, 2 MLP) all whose
  # outputs the backward pass needs run again.
  assert full >= none + 6 * NUM_LAYERS


# ---- Fused attention.


@pytest.mark.parametrize('impl', ['xla', 'heads_major'])
def test_attention_impl_matches_reference(images, params, logits, stepped,
                                          impl):
  """dot_product_attention ('xla') and heads-major attention: same numbers."""
  model = tiny(attention_impl=impl)
  np.testing.assert_allclose(
      apply(model, params, images), logits, atol=ATOL, rtol=0)
  assert_trees_close(train_step(model, params, images), stepped)
  scanned = layouts.layers_to_scan(params, NUM_LAYERS)
  np.testing.assert_allclose(
      apply(tiny(scan=True, attention_impl=impl), scanned, images),
      logits,
      atol=ATOL,
      rtol=0)


def test_fused_attention_calls_jax_dot_product_attention(images, params):
  calls = []

  def spy(*args, **kw):
    calls.append(kw.get('implementation'))
    return real(*args, **kw)

  real = jax.nn.dot_product_attention
  with mock.patch.object(jax.nn, 'dot_product_attention', spy):
    jax.eval_shape(
        lambda p: tiny(attention_impl='xla').apply(
            {'params': p}, images, train=False), params)
    assert calls == ['xla'] * NUM_LAYERS
    jax.eval_shape(lambda p: tiny().apply({'params': p}, images, train=False),
                   params)
    assert calls == ['xla'] * NUM_LAYERS  # The reference path does not.


@pytest.mark.parametrize('impl', ['xla', 'heads_major'])
def test_attention_impl_falls_back_for_attention_weights(images, params, impl):
  """Weights are collected the reference way, [B, N, T, T] per block."""
  ours = models.attention_weights(tiny(attention_impl=impl), params, images)
  reference = models.attention_weights(tiny(), params, images)
  assert len(ours) == NUM_LAYERS
  for f, r in zip(ours, reference):
    assert f.shape == (4, 2, 5, 5)
    np.testing.assert_allclose(f, r, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.sum(f, axis=-1), 1., atol=1e-5)


def test_fused_attention_refuses_attention_dropout(images, params):
  model = tiny(attention_impl='xla', transformer=with_dropout(0., 0.1))
  with pytest.raises(ValueError, match='attention_dropout_rate=0'):
    jax.eval_shape(
        lambda p: model.apply({'params': p},
                              images,
                              train=True,
                              rngs={'dropout': jax.random.key(0)}), params)
  # Without training there is no dropout, so it runs.
  jax.eval_shape(lambda p: model.apply({'params': p}, images, train=False),
                 params)


# ---- Heads-major attention.


def test_heads_major_attention_draws_the_reference_dropout_mask(images, params):

  def train_logits(model):
    return model.apply({'params': params},
                       images,
                       train=True,
                       rngs={'dropout': jax.random.key(5)})

  dropout = with_dropout(0., 0.3)
  reference = train_logits(tiny(transformer=dropout))
  np.testing.assert_allclose(
      train_logits(tiny(transformer=dropout, attention_impl='heads_major')),
      reference,
      atol=ATOL,
      rtol=0)
  # Dropout did change the logits, so the equality is about the mask.
  assert float(jnp.abs(reference - apply(tiny(), params, images)).max()) > 1e-3


def test_heads_major_attention_with_a_mask_equals_flax():
  rng = np.random.default_rng(3)
  q, k, v = (
      jnp.asarray(rng.standard_normal((2, 5, 3, 4)), jnp.float32)
      for _ in range(3))
  mask = rng.uniform(size=(2, 3, 5, 5)) < 0.6
  mask[..., np.arange(5), np.arange(5)] = True  # No fully masked row.
  np.testing.assert_allclose(
      attention.heads_major_attention(
          q, k, v, mask=jnp.asarray(mask), deterministic=True),
      nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask)),
      atol=1e-6,
      rtol=0)


# ---- Class token only in the last block.


def compiled_flops(model, params, images):
  compiled = jax.jit(lambda p: model.apply({'params': p}, images, train=False)
                    ).lower(params).compile()
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_token_only_last_block_matches_the_full_model(images, params, logits,
                                                      stepped, dtype):
  if dtype == 'float32':
    full, expected_logits, expected_step, atol = tiny(), logits, stepped, ATOL
  else:  # Against the full bfloat16 model: only the pruning differs.
    full = tiny(dtype=jnp.bfloat16)
    expected_logits = apply(full, params, images)
    expected_step = train_step(full, params, images)
    atol = 1e-3
  pruned = tiny(token_only_last_block=True, dtype=full.dtype)
  np.testing.assert_allclose(
      apply(pruned, params, images), expected_logits, atol=atol, rtol=0)
  assert_trees_close(
      train_step(pruned, params, images), expected_step, atol=atol)
  # It does compute less: the last block's queries, attention output and MLP
  # run for 1 of the 5 tokens.
  assert (compiled_flops(pruned, params, images)
          < 0.9 * compiled_flops(full, params, images))


def test_token_only_last_block_keeps_all_attention_weights(images, params):
  ours = models.attention_weights(
      tiny(token_only_last_block=True), params, images)
  reference = models.attention_weights(tiny(), params, images)
  assert [w.shape for w in ours] == [(4, 2, 5, 5)] * NUM_LAYERS
  for a, b in zip(ours, reference):
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_token_only_last_block_leaves_other_classifiers_alone(images):
  gap = tiny(classifier='gap')
  gap_params = init(gap, images)
  np.testing.assert_array_equal(
      apply(
          tiny(classifier='gap', token_only_last_block=True), gap_params,
          images), apply(gap, gap_params, images))


def test_token_only_last_block_needs_the_unscanned_encoder():
  with pytest.raises(ValueError, match='scan=False'):
    tiny(token_only_last_block=True, scan=True)


@pytest.mark.skipif(jax.default_backend() == 'gpu', reason='CPU-only error')
def test_cudnn_attention_off_gpu_says_so(images, params):
  with pytest.raises(ValueError, match="attention_impl='xla'"):
    jax.eval_shape(
        lambda p: tiny(attention_impl='cudnn').apply(
            {'params': p}, images, train=False), params)


def test_unknown_switches_are_rejected():
  with pytest.raises(ValueError, match='attention_impl'):
    tiny(attention_impl='flash')
  with pytest.raises(ValueError, match='heads_major'):  # Named in the error.
    tiny(attention_impl='flash')
  with pytest.raises(ValueError, match='remat_policy'):
    tiny(remat_policy='dots')


# ---- bfloat16 compute.


def test_bfloat16_is_close_with_float32_params_and_logits(
    images, params, logits, stepped):
  model = tiny(dtype=jnp.bfloat16)
  reference = logits
  logits = apply(model, params, images)
  assert logits.dtype == jnp.float32
  assert np.abs(reference).max() > 0.1  # Not a comparison of zeros.
  np.testing.assert_allclose(
      logits, reference, atol=0.03 * np.abs(reference).max(), rtol=0)
  assert not np.array_equal(logits, reference)  # bf16 really was used.
  fresh = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), images)['params']
  assert {x.dtype for x in jax.tree_util.tree_leaves(fresh)
         } == {np.dtype(np.float32)}
  after = train_step(model, params, images)
  assert {x.dtype for x in jax.tree_util.tree_leaves(after)
         } == {np.dtype(np.float32)}
  assert_trees_close(after, stepped, atol=5e-3)


def _dots(hlo_text):
  """(operand types, result type) of every dot_general in StableHLO text."""
  out = []
  for line in hlo_text.splitlines():
    if 'stablehlo.dot_general' in line:
      sig = line.rsplit(':', 1)[1]
      operands, result = sig.split('->')
      out.append((tuple(
          t.strip() for t in operands.strip(' ()').split(',') if 'tensor' in t),
                  result.strip()))
  return out


@pytest.mark.parametrize('attention_impl', ['reference', 'xla'])
def test_bfloat16_matmuls_take_bf16_and_accumulate_in_float32(
    images, params, attention_impl):
  model = tiny(dtype=jnp.bfloat16, attention_impl=attention_impl)
  hlo = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False)).lower(
      params, images).as_text()
  dots = _dots(hlo)
  block_dots = [d for d in dots if all('bf16' in t for t in d[0])]
  edge_dots = [d for d in dots if d not in block_dots]
  # q, k, v, out, 2 attention einsums, 2 MLP per block.
  assert len(block_dots) == NUM_LAYERS * 8
  if attention_impl == 'reference':
    for operands, result in block_dots:
      assert 'f32' in result, (operands, result)
  # The first and last layers stay float32 (models_vit.EDGE_DTYPE):
  # pre_logits, head and the patch embedding, operands and result.
  assert len(edge_dots) == 2, edge_dots
  for operands, result in edge_dots:
    assert all('f32' in t for t in operands + (result,)), (operands, result)
  conv = [l for l in hlo.splitlines() if 'stablehlo.convolution' in l]
  assert len(conv) == 1 and 'bf16' not in conv[0], conv
  # The final LayerNorm hands float32 to the head, the blocks' bfloat16.
  _, state = model.apply(
      {'params': params},
      images,
      train=False,
      capture_intermediates=lambda m, _: isinstance(m, nn.LayerNorm))
  norms = state['intermediates']['Transformer']
  assert norms['encoder_norm']['__call__'][0].dtype == jnp.float32
  assert norms['encoderblock_0']['LayerNorm_0']['__call__'][0].dtype == (
      jnp.bfloat16)


@pytest.mark.parametrize(
    'lhs_shape,rhs_shape,dimension_numbers',
    [
        ((4, 5, 6), (6, 9), (((2,), (0,)), ((), ()))),  # Dense.
        ((4, 5, 3, 2), (3, 2, 7), (((2, 3), (0, 1)), ((), ()))),  # Out proj.
        # Attention q.k^T and p.v, batch axes not leading: their gradients
        # contract non-minor axes, which XLA:CPU's Eigen fallback cannot run in
        # bf16 -> f32 ("Unsupported element type for DotThunk").
        ((2, 7, 3, 8), (2, 5, 3, 8), (((3,), (3,)), ((0, 2), (0, 2)))),
        ((2, 3, 7, 5), (2, 5, 3, 8), (((3,), (1,)), ((0, 1), (0, 2)))),
    ])
def test_mixed_precision_gradients_run_in_bf16_and_are_right(
    lhs_shape, rhs_shape, dimension_numbers):
  from vit_jax.layers import mixed_precision  # pylint: disable=g-import-not-at-top
  k1, k2 = jax.random.split(jax.random.key(0))
  lhs = jax.random.normal(k1, lhs_shape)
  rhs = jax.random.normal(k2, rhs_shape)

  def loss(dot, a, b):
    return jnp.sum(jnp.sin(dot(a, b, dimension_numbers)))

  mixed = lambda a, b, dn: mixed_precision.f32_accumulating_dot_general(
      a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), dn)
  grads = jax.jit(jax.grad(functools.partial(loss, mixed), (0, 1)))(lhs, rhs)
  exact = jax.grad(functools.partial(loss, jax.lax.dot_general), (0, 1))(lhs,
                                                                         rhs)
  for g, e in zip(grads, exact):
    assert g.dtype == jnp.float32 and g.shape == e.shape
    # bf16 operands: ~3 significant digits.
    np.testing.assert_allclose(g, e, atol=0.05 * np.abs(e).max(), rtol=0)
  hlo = jax.jit(jax.grad(functools.partial(loss, mixed),
                         (0, 1))).lower(lhs, rhs).as_text()
  dots = _dots(hlo)
  assert len(dots) == 3  # Forward, and one per operand's gradient.
  for operands, result in dots:
    assert all('bf16' in t for t in operands) and 'f32' in result

"""The paper's inspection figures: shapes, known values, PNG files."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import models
from vit_jax.paper import figures

IMAGE = 32


@pytest.fixture(scope='module')
def tiny():
  # 2 layers, 2 heads, 8x8 patches: a 4x4 grid with a class token.
  model = models.get_model(
      'testing',
      hidden_size=16,
      patches=ml_collections.ConfigDict({'size': (8, 8)}),
      transformer=ml_collections.ConfigDict(
          dict(
              num_layers=2,
              mlp_dim=16,
              num_heads=2,
              dropout_rate=0.0,
              attention_dropout_rate=0.0)))
  params = jax.jit(lambda: model.init(
      jax.random.key(0), jnp.zeros(
          (1, IMAGE, IMAGE, 3)), train=False)['params'])()
  images = np.asarray(
      jax.random.uniform(
          jax.random.key(1), (3, IMAGE, IMAGE, 3), minval=-1, maxval=1))
  weights = jax.jit(lambda p, x: models.attention_weights(model, p, x))(params,
                                                                        images)
  return model, params, images, weights


def _is_png(path):
  return path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_embedding_filters_pca(tmp_path):
  kernel = np.random.default_rng(0).normal(size=(4, 4, 3, 64))
  path = tmp_path / 'filters.png'
  comps = figures.embedding_filters_pca({'embedding': {
      'kernel': kernel
  }},
                                        n=28,
                                        path=path)
  assert comps.shape == (28, 4, 4, 3)
  # Independently: eigenvectors of the covariance of the 64 filters.
  filters = kernel.reshape(48, 64).T
  cov = np.cov(filters, rowvar=False)
  eigvals, eigvecs = np.linalg.eigh(cov)
  top = eigvecs[:, np.argsort(-eigvals)[:28]].T
  flat = comps.reshape(28, 48).astype(np.float64)
  np.testing.assert_allclose(np.abs(np.sum(flat * top, axis=1)), 1.0, atol=1e-4)
  np.testing.assert_allclose(flat @ flat.T, np.eye(28), atol=1e-5)
  assert _is_png(path)
  with pytest.raises(ValueError, match='not RGB'):
    figures.embedding_filters_pca(
        {'embedding': {
            'kernel': np.zeros((1, 1, 64, 8))
        }})


def test_position_embedding_similarity(tmp_path):
  rng = np.random.default_rng(0)
  table = rng.normal(size=(1, 1 + 6, 5))  # class token + a 2x3 grid
  params = {
      'cls': np.zeros((1, 1, 5)),
      'Transformer': {
          'posembed_input': {
              'pos_embedding': table
          }
      }
  }
  path = tmp_path / 'posemb.png'
  sim = figures.position_embedding_similarity(params, grid=(2, 3), path=path)
  assert sim.shape == (2, 3, 2, 3)
  patches = table[0, 1:]
  for (i, j), (k, l) in itertools.product(
      itertools.product(range(2), range(3)), repeat=2):
    a, b = patches[i * 3 + j], patches[k * 3 + l]
    cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    np.testing.assert_allclose(sim[i, j, k, l], cos, atol=1e-6)
  assert _is_png(path)
  with pytest.raises(ValueError, match='not a square grid'):
    figures.position_embedding_similarity(params)
  # Without a class token the table is all patches; a square grid is found.
  square = figures.position_embedding_similarity(
      {'Transformer': {
          'posembed_input': {
              'pos_embedding': table[:, :4]
          }
      }})
  assert square.shape == (2, 2, 2, 2)


def _mean_pairwise_distance(g, patch):
  """Mean over queries of the mean distance to all patches, by loops."""
  total = 0.0
  cells = list(itertools.product(range(g), range(g)))
  for (r1, c1) in cells:
    total += np.mean([np.hypot(r1 - r2, c1 - c2) * patch for (r2, c2) in cells])
  return total / len(cells)


def test_attention_distance_of_constructed_patterns():
  g, patch, heads = 3, 16, 2
  n = g * g + 1  # with the class token
  uniform = np.full((2, heads, n, n), 1.0 / n)
  got = figures.attention_distance(uniform, (g, g), (patch, patch), 1)
  np.testing.assert_allclose(
      got, [_mean_pairwise_distance(g, patch)] * heads, rtol=1e-12)
  self_only = np.broadcast_to(np.eye(n), (2, heads, n, n))
  np.testing.assert_allclose(
      figures.attention_distance(self_only, (g, g), (patch, patch), 1), 0.0)
  # Head 0 attends to itself, head 1 to the patch on the right (wrapping to
  # the row start): distances 0 and (2 * 16 + 1 * 32) / 3 per row.
  attn = np.zeros((1, 2, g * g, g * g))
  for q in range(g * g):
    r, c = divmod(q, g)
    attn[0, 0, q, q] = 1.0
    attn[0, 1, q, r * g + (c + 1) % g] = 1.0
  np.testing.assert_allclose(
      figures.attention_distance(attn, (g, g), (patch, patch), 0),
      [0.0, (2 * 16 + 32) / 3])


def test_mean_attention_distance_of_a_model(tiny, tmp_path):
  model, params, images, weights = tiny
  path = tmp_path / 'distance.png'
  dist = figures.mean_attention_distance(
      model, params, images, path=path, batch_size=2)
  assert dist.shape == (2, 2)
  # Per layer and head, the mean distance under the model's own attention.
  expected = np.stack(
      [figures.attention_distance(w, (4, 4), (8, 8), 1) for w in weights])
  np.testing.assert_allclose(dist, expected, rtol=1e-5)
  assert np.all((dist > 0) & (dist < np.hypot(3, 3) * 8))
  assert _is_png(path)


def test_rollout_rows_sum_to_one_and_match_the_recursion():
  rng = np.random.default_rng(0)
  attn = [rng.dirichlet(np.ones(5), size=(2, 3, 5)) for _ in range(3)]
  joint = figures.rollout(attn)
  np.testing.assert_allclose(joint.sum(axis=-1), 1.0, atol=1e-12)
  # Rows of A sum to one, so (A + I) renormalised is (A + I) / 2.
  expected = np.broadcast_to(np.eye(5), (2, 5, 5))
  for a in attn:
    expected = ((a.mean(axis=1) + np.eye(5)) / 2) @ expected
  np.testing.assert_allclose(joint, expected, atol=1e-12)
  grid = figures.rollout_to_grid(joint[:, :, :], (2, 2), 1)
  np.testing.assert_allclose(grid, joint[:, 0, 1:].reshape(2, 2, 2))


def test_attention_rollout_of_a_model(tiny, tmp_path):
  model, params, images, weights = tiny
  path = tmp_path / 'rollout.png'
  maps = figures.attention_rollout(model, params, images, path=path)
  assert maps.shape == (3, IMAGE, IMAGE)
  assert maps.min() >= 0.0 and maps.max() <= 1.0
  np.testing.assert_allclose(maps.max(axis=(1, 2)), 1.0, atol=1e-6)
  # The map is the class token's rollout over the 4x4 grid, upsampled.
  joint = figures.rollout(weights)
  grid = joint[:, 0, 1:].reshape(3, 4, 4)
  upsampled = np.asarray(jax.image.resize(grid, (3, IMAGE, IMAGE), 'bilinear'))
  np.testing.assert_allclose(
      maps, upsampled / upsampled.max(axis=(1, 2), keepdims=True), atol=1e-5)
  assert _is_png(path)

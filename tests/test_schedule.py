"""The learning-rate schedule equals the original's formula, step by step.

The original (https://github.com/google-research/vision_transformer,
`vit_jax/utils.py`, `create_learning_rate_schedule`): linear warmup, then
cosine decay to 0 or linear decay to 1e-5 (the paper, Appendix B.1).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import train
from vit_jax import utils
from vit_jax.training import optim


def original_lr(step, *, total, base, decay_type, warmup, end=1e-5):
  """The original's schedule, written out in plain Python."""
  progress = min(max((step - warmup) / (total - warmup), 0.), 1.)
  if decay_type == 'cosine':
    lr = base * 0.5 * (1 + math.cos(math.pi * progress))
  else:
    lr = end + (base - end) * (1 - progress)
  if warmup:
    lr *= min(1., step / warmup)
  return lr


@pytest.mark.parametrize('decay_type', ['cosine', 'linear'])
@pytest.mark.parametrize('warmup', [0, 7, 50])
def test_schedule_equals_original_formula(decay_type, warmup):
  total, base = 100, 0.03
  lr_fn = utils.create_learning_rate_schedule(total, base, decay_type, warmup)
  steps = np.arange(0, total + 1)
  got = np.asarray(jax.vmap(lr_fn)(steps))
  want = np.array([
      original_lr(
          s, total=total, base=base, decay_type=decay_type, warmup=warmup)
      for s in steps
  ], np.float32)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)  # float32
  assert got.dtype == np.float32


def test_schedule_landmarks():
  lr_fn = utils.create_learning_rate_schedule(1000, 0.1, 'cosine', 100)
  assert float(lr_fn(0)) == 0.
  assert float(lr_fn(50)) == pytest.approx(0.05)
  assert float(lr_fn(100)) == pytest.approx(0.1)
  assert float(lr_fn(550)) == pytest.approx(0.05)
  assert float(lr_fn(1000)) == pytest.approx(0., abs=1e-9)
  lin = utils.create_learning_rate_schedule(1000, 0.1, 'linear', 0, 1e-5)
  assert float(lin(1000)) == pytest.approx(1e-5)
  assert float(lin(0)) == pytest.approx(0.1)


def test_total_equal_to_warmup_is_pure_warmup():
  # The original's Pets/Flowers presets: 500 steps, 500 warmup steps.
  lr_fn = utils.create_learning_rate_schedule(500, 0.03, 'cosine', 500)
  for s in (0, 1, 250, 499):
    assert float(lr_fn(s)) == pytest.approx(0.03 * s / 500)
    assert np.isfinite(float(lr_fn(s)))


def test_schedule_bad_arguments():
  with pytest.raises(ValueError, match='decay_type'):
    utils.create_learning_rate_schedule(10, 0.1, 'exp', 0)
  with pytest.raises(ValueError, match='warmup_steps'):
    utils.create_learning_rate_schedule(10, 0.1, 'cosine', 20)


def _tiny_setup(optimizer, warmup):
  """A two-layer linear classifier (a non-zero body, a zero head, as a ViT
  starts): the schedule and the optimizer do not depend on the model, and
  its update compiles in a fraction of a ViT's."""

  def apply_fn(variables, images, train, rngs):
    del train, rngs
    p = variables['params']
    hidden = images.reshape(images.shape[0], -1) @ p['body']['kernel']
    return hidden @ p['head']['kernel'] + p['head']['bias']

  images = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 8, 8, 3))
  labels = jax.nn.one_hot(jnp.array([[0, 1, 2, 1]]), 3)
  params = {
      'body': {
          'kernel': 0.1 * jax.random.normal(jax.random.PRNGKey(0), (192, 8))
      },
      'head': {
          'kernel': jnp.zeros((8, 3)),
          'bias': jnp.zeros(3)
      }
  }
  config = ml_collections.ConfigDict(
      dict(
          optimizer=optimizer,
          total_steps=10,
          base_lr=0.1,
          decay_type='cosine',
          warmup_steps=warmup,
          grad_norm_clip=1.0,
          optim_dtype=None,
          weight_decay=0.1 if optimizer == 'adamw' else 0.))
  tx, lr_fn = optim.make_optimizer(config)
  update_fn = train.make_update_fn(apply_fn=apply_fn, accum_steps=1, tx=tx)
  return params, tx, lr_fn, update_fn, {'image': images, 'label': labels}


@pytest.mark.parametrize('optimizer', ['sgd_momentum', 'adamw'])
def test_first_update_uses_learning_rate_zero(optimizer):
  params, tx, _, update_fn, batch = _tiny_setup(optimizer, warmup=3)
  repl = lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], t)
  p0 = jax.device_get(params)
  new, opt_state, _, _ = update_fn(
      repl(params), repl(tx.init(params)), batch,
      jax.random.PRNGKey(0)[None])
  # Step 1: lr_fn(0) = 0, so nothing moves, not even by weight decay.
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a[0], b),
                         jax.device_get(new), p0)
  # Step 2 uses lr_fn(1) = 0.1 / 3 > 0: the head (zero-initialised) moves.
  new2, _, _, _ = update_fn(new, opt_state, batch, jax.random.PRNGKey(1)[None])
  assert np.abs(np.asarray(new2['head']['kernel'])).max() > 0


def test_without_warmup_first_update_moves():
  params, tx, _, update_fn, batch = _tiny_setup('sgd_momentum', warmup=0)
  repl = lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], t)
  new, _, _, _ = update_fn(
      repl(params), repl(tx.init(params)), batch,
      jax.random.PRNGKey(0)[None])
  assert np.abs(np.asarray(new['head']['kernel'])).max() > 0

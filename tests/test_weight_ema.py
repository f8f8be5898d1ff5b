"""The exponential moving average of the weights (config.ema_decay)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from test_train import tiny_config
from vit_jax import input_pipeline
from vit_jax import train
from vit_jax.checkpoints import train_checkpoint
from vit_jax.checkpoints import trees
from vit_jax.reporting import run_plots
from vit_jax.training import objectives
from vit_jax.training import weight_ema


def test_average_is_the_bias_corrected_weighted_mean():
  decay = 0.8
  tx = weight_ema.with_weight_ema(optax.sgd(0.1, momentum=0.9), decay)
  plain = optax.sgd(0.1, momentum=0.9)
  params = {'w': jnp.arange(6.0).reshape(2, 3), 'b': jnp.ones(3)}
  state, plain_state = tx.init(params), plain.init(params)
  rng = np.random.RandomState(0)
  history = []
  for _ in range(5):
    grads = jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, state = tx.update(grads, state, params)
    want_updates, plain_state = plain.update(grads, plain_state, params)
    # The wrapped optimizer's updates are passed on unchanged.
    for key in params:
      np.testing.assert_array_equal(updates[key], want_updates[key])
    params = optax.apply_updates(params, updates)
    history.append(params)
  weights = decay**np.arange(len(history))[::-1]
  for key in params:
    want = sum(w * np.asarray(p[key]) for w, p in zip(weights, history))
    np.testing.assert_allclose(
        state.ema_params[key], want / weights.sum(), rtol=1e-6, atol=1e-6)
  assert int(state.count) == 5
  # One update: the average is that update's parameters, not the start.
  one = tx.update(grads, tx.init(history[0]), history[0])[1].ema_params
  np.testing.assert_allclose(
      one['w'], history[0]['w'] - 0.1 * np.asarray(grads['w']), rtol=1e-6)


@pytest.mark.parametrize('decay', [0.0, 1.0, 1.5])
def test_decay_outside_0_1_is_refused(decay):
  with pytest.raises(ValueError, match='ema_decay must be in'):
    weight_ema.with_weight_ema(optax.sgd(0.1), decay)


def test_negative_decay_is_a_config_error():
  with pytest.raises(ValueError, match='ema_decay=-0.5 must not be negative'):
    train.train_and_evaluate(tiny_config(ema_decay=-0.5), '/nonexistent')


def _test_accuracy(config, params):
  """Top-1 accuracy of `params` on the test split, computed here."""
  model = train.create_model(config, num_classes=10)
  counts = jax.jit(objectives.top1_counts(model.apply))
  correct = total = 0.
  for batch in input_pipeline.get_datasets(config)[1].as_numpy_iterator():
    batch = jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), batch)
    c, n = counts(params, batch)
    correct, total = correct + float(c), total + float(n)
  return correct / total


def test_run_evaluates_and_leaves_the_average(tmp_path, monkeypatch):
  """A run with ema_decay reports the accuracy of the average, and the
  checkpoint's parameters for predict/export are the average (trained
  leaves) and the untouched frozen leaves."""
  # Its curves.png and confusion.png are not drawn (~2 CPU s): nothing here
  # looks at them (test_run_plots.py does).
  monkeypatch.setattr(run_plots, 'write_run_plots', lambda *args, **kw: [])
  config = tiny_config(
      total_steps=6,
      ema_decay=0.7,
      base_lr=0.05,
      trainable='Transformer/.*|head/.*')
  workdir = str(tmp_path / 'work')
  summary = train.train_and_evaluate(config, workdir)
  ckpts = train_checkpoint.TrainCheckpoints(workdir)
  averaged = trees.flatten_tree(ckpts.restore_params())
  raw = ckpts._manager.restore(  # pylint: disable=protected-access
      6, args=ocp.args.StandardRestore())
  last = trees.flatten_tree(raw['params'])
  ema = trees.flatten_tree(raw['opt_state']['ema_params'])
  ckpts.close()
  assert set(averaged) == set(last)
  for key, value in last.items():
    want = ema.get(key, value)  # frozen leaves (the embedding) stay
    np.testing.assert_array_equal(averaged[key], want, err_msg=key)
  assert 'embedding/kernel' not in ema
  assert not np.array_equal(averaged['head/kernel'], last['head/kernel'])
  assert summary['accuracy'] == pytest.approx(
      _test_accuracy(
          config, trees.recover_tree(list(averaged), list(averaged.values()))),
      abs=1e-9)

"""Gradient accumulation one dispatch per micro-batch equals the in-program
loop (`utils.accumulate_gradient` inside one pmapped step) it replaced."""

import os
import shutil

import flax.jax_utils
import jax
import ml_collections
import numpy as np
import optax
import pytest

from configs import embedded
from test_train import tiny_model_config
from vit_jax import train
from vit_jax import utils
from vit_jax.checkpoints import train_checkpoint
from vit_jax.checkpoints import trees
from vit_jax.parallel import runners
from vit_jax.reporting import run_report
from vit_jax.training import objectives
from vit_jax.training import optim
from vit_jax.training import pmap_step
from vit_jax.training import trainable


def loop_update_fn(loss_fn, accum_steps, tx, mask):
  """The in-program accumulation: one pmapped step, a fori_loop inside."""

  def update_fn(params, opt_state, batch, rng):
    device_rng = jax.random.fold_in(rng, jax.lax.axis_index(runners.AXIS))
    train_part, _, merge = trainable.partition(params, mask)
    loss, grads = utils.accumulate_gradient(
        jax.value_and_grad(lambda t, x, y: loss_fn(merge(t), x, y, device_rng)),
        train_part, batch['image'], batch['label'], accum_steps)
    grads = jax.lax.pmean(grads, axis_name=runners.AXIS)
    updates, opt_state = tx.update(grads, opt_state, train_part)
    params = merge(optax.apply_updates(train_part, updates))
    return (params, opt_state, jax.lax.pmean(loss, runners.AXIS),
            jax.random.split(rng)[1])

  return jax.pmap(update_fn, axis_name=runners.AXIS)


def three_updates(update_fn, params, opt_state):
  rng = np.random.RandomState(0)
  losses = []
  key = flax.jax_utils.replicate(jax.random.PRNGKey(3))
  params, opt_state = flax.jax_utils.replicate((params, opt_state))
  for _ in range(3):
    batch = {
        'image': rng.uniform(-1, 1, (1, 16, 28, 28, 3)).astype('f4'),
        'label': np.eye(10, dtype='f4')[rng.randint(0, 10, (1, 16))]
    }
    params, opt_state, loss, key = update_fn(params, opt_state, batch, key)
    losses.append(float(loss[0]))
  return losses, trees.flatten_tree(
      jax.device_get(flax.jax_utils.unreplicate(params)))


def test_dispatched_accumulation_equals_the_in_program_loop():
  # Only the head and the last block train: the partition's both sides.
  trainable_spec = r'^(head|Transformer/encoderblock_0)/'
  # Dropout on: every micro-batch must see the loop's dropout key.
  config = ml_collections.ConfigDict(
      dict(
          model=tiny_model_config(dropout=0.1),
          optimizer='adamw',
          base_lr=1e-2,
          weight_decay=0.1,
          total_steps=3,
          warmup_steps=1,
          decay_type='cosine',
          grad_norm_clip=1.0,
          optim_dtype=None,
          loss='softmax_xent',
          objective='classification'))
  model = train.create_model(config, num_classes=10)
  params = model.init(
      jax.random.PRNGKey(0), np.zeros((1, 28, 28, 3)), train=False)['params']
  params['head']['kernel'] += 0.05  # every parameter gets a gradient
  mask = trainable.trainable_mask(params, trainable_spec)
  tx, _ = optim.make_optimizer(config)
  loss_fn = objectives.make_loss_fn(model, config)
  opt_state = tx.init(trainable.partition(params, mask)[0])

  dispatched = pmap_step.make_update_fn(
      loss_fn=loss_fn,
      accum_steps=4,
      tx=tx,
      trainable_mask=mask,
      axis_name=runners.AXIS)
  got_losses, got = three_updates(dispatched, params, opt_state)
  want_losses, want = three_updates(
      loop_update_fn(loss_fn, 4, tx, mask), params, opt_state)

  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-6)
  assert set(got) == set(want)
  # Adam divides by the gradients' scale: float rounding of a near-zero
  # gradient moves its parameter by ~1e-6; a wrong sum moves it by ~lr.
  for name, value in want.items():
    np.testing.assert_allclose(
        got[name], value, rtol=0, atol=1e-5, err_msg=name)
  changed = [
      n for n in want if np.any(want[n] != np.asarray(params_flat(params)[n]))
  ]
  assert changed and all(
      n.startswith(('head/', 'Transformer/encoderblock_0')) for n in changed)
  assert any(n.startswith('head/') for n in changed)


def params_flat(params):
  return trees.flatten_tree(jax.device_get(params))


def test_micro_batches_must_divide_the_per_device_batch():
  tx = optax.sgd(0.1)
  update_fn = pmap_step.make_update_fn(
      accum_steps=3,
      tx=tx,
      trainable_mask=None,
      axis_name=runners.AXIS,
      loss_fn=lambda p, x, y, r: (p['w'] * x).sum())
  params, opt_state = flax.jax_utils.replicate(({
      'w': np.ones(())
  }, tx.init({'w': np.ones(())})))
  batch = {'image': np.ones((1, 8, 2), 'f4'), 'label': np.ones((1, 8), 'f4')}
  with pytest.raises(ValueError, match='per-device batch 8 .*accum_steps 3'):
    update_fn(params, opt_state, batch,
              flax.jax_utils.replicate(jax.random.PRNGKey(0)))


def test_main_job_resumed_equals_uninterrupted_bit_for_bit(tmp_path):
  """The main job's recipe (batched affine augmentation, 4 micro-batches a
  step, dropout on) resumed from its step-2 checkpoint ends where the
  uninterrupted run ends."""
  config = embedded.get_config()
  config.model = tiny_model_config(dropout=0.1)
  config.model.classifier = 'gap'
  config.update(
      dict(
          model_name='tiny',
          batch=32,
          batch_eval=500,
          total_steps=4,
          warmup_steps=1,
          log_every=2,
          eval_every=100,
          checkpoint_every=2,
          prefetch=1))
  assert config.accum_steps == 4 and config.pp.augment == 'affine'
  reference = str(tmp_path / 'reference')
  train.train_and_evaluate(config, reference)
  workdir = str(tmp_path / 'resumed')
  shutil.copytree(reference, workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  os.remove(os.path.join(workdir, run_report.SUMMARY_FILE))
  summary = train.train_and_evaluate(config, workdir)
  assert summary['start_step'] == 2 and summary['step'] == 4
  want, got = (
      trees.flatten_tree(train_checkpoint.TrainCheckpoints(w).restore_params())
      for w in (reference, workdir))
  assert got.keys() == want.keys()
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)

"""Training end to end: real steps, data parallelism, accumulation, faults.

Multi-device cases run in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import flax.jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import compile_settings
from configs import embedded
import preloaded
from vit_jax import checkpoint  # pylint: disable=wrong-import-position
from vit_jax import train  # pylint: disable=wrong-import-position
from vit_jax import utils  # pylint: disable=wrong-import-position
from vit_jax.checkpoints import train_checkpoint  # pylint: disable=wrong-import-position
from vit_jax.checkpoints import trees  # pylint: disable=wrong-import-position
from vit_jax.data import tf_import  # pylint: disable=wrong-import-position
from vit_jax.parallel import runners  # pylint: disable=wrong-import-position
from vit_jax.reporting import run_plots  # pylint: disable=wrong-import-position
from vit_jax.reporting import run_report  # pylint: disable=wrong-import-position
from vit_jax.run_config import errors  # pylint: disable=wrong-import-position
from vit_jax.training import objectives  # pylint: disable=wrong-import-position
from vit_jax.training import optim  # pylint: disable=wrong-import-position
from vit_jax.training import step_guards  # pylint: disable=wrong-import-position

tf = tf_import.import_tensorflow()  # TensorFlow without Keras

# ------------------------------------------------------------------ helpers


def tiny_model_config(*, dropout=0.0, representation_size=None):
  """A 1-layer ViT with 7x7 patches on 28x28 images (16 tokens + class)."""
  model = embedded.get_model_config()
  model.model_name = 'tiny'
  model.hidden_size = 16
  model.transformer.mlp_dim = 32
  model.transformer.num_heads = 2
  model.transformer.num_layers = 1
  model.transformer.dropout_rate = dropout
  model.representation_size = representation_size
  return model


def tiny_config(**overrides):
  """The digits config (28x28, 7x7 patches) with a tiny model, few steps."""
  config = embedded.get_digits_config()
  config.model = tiny_model_config()
  config.model_name = 'tiny'
  config.batch = 32
  config.batch_eval = 500
  config.total_steps = 2
  config.warmup_steps = 1
  config.log_every = 1
  config.eval_every = 100
  config.checkpoint_every = 100
  config.prefetch = 0
  return set_fields(config, overrides)


def set_fields(config, fields):
  """Sets dotted `fields` ({'pp.crop': 32, ...}) of `config`; returns it."""
  for key, value in fields.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def run_python(code, *, devices=1, timeout=300, args=()):
  """Runs `code` in a fresh interpreter with `devices` CPU devices."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = compile_settings.xla_flags(devices)
  env['PYTHONPATH'] = os.pathsep.join(
      [REPO, os.path.join(REPO, 'tests'),
       env.get('PYTHONPATH', '')])
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  result = subprocess.run(
      preloaded.command(env, '-c', textwrap.dedent(code), *args),
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=timeout)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def read_summary(workdir):
  with open(os.path.join(workdir, run_report.SUMMARY_FILE)) as f:
    return json.load(f)


# ------------------------------------------------- one real training step


@pytest.fixture
def no_plots(monkeypatch):
  """curves.png and confusion.png not drawn (~2 CPU s a run), for runs whose
  pictures no test looks at (the folder run draws them; test_run_plots.py
  checks them)."""
  monkeypatch.setattr(run_plots, 'write_run_plots', lambda *args, **kw: [])


def _write_image_folder(root, *, per_class=6, size=20):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  for split in ('train', 'test'):
    for c, name in enumerate(['circle', 'square', 'zigzag']):
      os.makedirs(os.path.join(root, split, name))
      for i in range(per_class):
        pixels = rng.randint(0, 255, (size, size, 3)).astype(np.uint8)
        pixels[..., c] = 255  # a class-dependent colour
        Image.fromarray(pixels).save(
            os.path.join(root, split, name, f'{i}.png'))
  # An unreadable file: skipped by the input pipeline with a warning.
  with open(os.path.join(root, 'train', 'circle', 'broken.jpg'), 'wb') as f:
    f.write(b'not a jpeg')


def _folder_config(data, **overrides):
  fields = {
      'dataset': data,
      'batch': 6,
      'batch_eval': 4,
      'total_steps': 2,
      'pp.augment': 'inception_crop'
  }
  return tiny_config(**(fields | overrides))


@pytest.fixture(scope='module')
def folder_run(tmp_path_factory):
  """(image folder, workdir, summary) of one 2-step run on an image folder,
  examined by several tests."""
  root = tmp_path_factory.mktemp('folder_run')
  data = str(root / 'images')
  _write_image_folder(data)
  workdir = str(root / 'work')
  return data, workdir, train.train_and_evaluate(_folder_config(data), workdir)


def test_train_steps_on_image_folder(folder_run):
  data, workdir, summary = folder_run
  assert summary == read_summary(workdir) | {}  # written to disk as returned
  assert summary['step'] == 2 and summary['start_step'] == 0
  assert 0.0 <= summary['accuracy'] <= 1.0
  # 18 test images in batches of 4: 2 padding examples are masked out, so
  # the accuracy is a multiple of 1/18.
  assert round(summary['accuracy'] * 18, 6) == round(summary['accuracy'] * 18)
  assert np.isfinite(summary['final_train_loss'])
  assert summary['train_step_compilations'] == 1
  assert summary['config']['dataset'] == data
  assert train_checkpoint.TrainCheckpoints(workdir).latest_step() == 2
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))


def _write_cifar10_metadata(data_dir, train_examples, test_examples):
  """dataset_info.json so tfds.testing.mock_data knows the split sizes."""
  builder = tfds.builder('cifar10', data_dir=data_dir)
  builder.info.set_splits(
      tfds.core.SplitDict([
          tfds.core.SplitInfo(
              name='train', shard_lengths=[train_examples], num_bytes=0),
          tfds.core.SplitInfo(
              name='test', shard_lengths=[test_examples], num_bytes=0)
      ]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)


def test_train_steps_on_tfds_mock_data(tmp_path, no_plots):
  data_dir = str(tmp_path / 'tfds')
  _write_cifar10_metadata(data_dir, 32, 16)
  config = tiny_config(
      dataset='cifar10',
      tfds_data_dir=data_dir,
      batch=8,
      batch_eval=8,
      total_steps=2,
      **{
          'pp.crop': 28,
          'pp.augment': 'inception_crop'
      })
  with tfds.testing.mock_data(
      num_examples=32,
      data_dir=data_dir,
      policy=tfds.testing.MockPolicy.USE_FILES):
    summary = train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert summary['step'] == 2
  assert summary['eval_history'][-1][0] == 2
  assert np.isfinite(summary['final_train_loss'])
  assert summary['train_step_compilations'] == 1


def test_resume_after_finish_only_evaluates(folder_run, tmp_path, no_plots):
  data, finished, first = folder_run
  workdir = str(tmp_path / 'work')
  shutil.copytree(finished, workdir)  # the fixture's run stays as it was
  again = train.train_and_evaluate(_folder_config(data), workdir)
  assert again['start_step'] == 2 and again['step'] == 2
  assert again['train_step_compilations'] == 0
  assert again['accuracy'] == first['accuracy']
  # A different model cannot resume from these checkpoints.
  other = _folder_config(data, total_steps=4, **{'model.hidden_size': 24})
  with pytest.raises(
      ValueError, match='Cannot resume from step 2.*new --workdir'):
    train.train_and_evaluate(other, workdir)


# --------------------------------------- data parallelism and accumulation

# One 8-device interpreter for the two 8-device checks: three data-parallel
# steps (saved to argv[1]), then a run whose batch does not split.
_EIGHT_DEVICES_SCRIPT = """
import sys
import flax.jax_utils, jax, numpy as np
from test_train import three_steps, tiny_config
from vit_jax import train
n = jax.local_device_count()
losses, params = three_steps(devices=n, accum_steps=1)
np.savez(sys.argv[1], losses=np.array(losses),
         **{'/'.join(str(k.key) for k in path): v for path, v in
            jax.tree_util.tree_leaves_with_path(params)})
try:
  train.train_and_evaluate(tiny_config(batch=12), '/tmp/unused')
except ValueError as e:
  print('ERROR:', e)
"""


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory):
  """(arrays of three_steps on 8 devices, stdout) of one 8-device start."""
  out = str(tmp_path_factory.mktemp('eight') / 'eight.npz')
  result = run_python(_EIGHT_DEVICES_SCRIPT, devices=8, args=(out,))
  return dict(np.load(out)), result.stdout


def three_steps(*, devices, accum_steps):
  """Three pmapped SGD-momentum updates of 16-example global batches."""
  model = train.create_model(
      ml_collections.ConfigDict({
          'model': tiny_model_config(),
          'objective': 'classification'
      }),
      num_classes=10)
  rng = np.random.RandomState(0)
  images = rng.uniform(-1, 1, (3, 16, 28, 28, 3)).astype(np.float32)
  labels = np.eye(10, dtype=np.float32)[rng.randint(0, 10, (3, 16))]
  params = model.init(
      jax.random.PRNGKey(0), images[0, :1], train=False)['params']
  config = ml_collections.ConfigDict(
      dict(
          optimizer='sgd_momentum',
          total_steps=4,
          base_lr=0.1,
          decay_type='cosine',
          warmup_steps=0,
          grad_norm_clip=1.0,
          optim_dtype=None))
  tx, _ = optim.make_optimizer(config)
  update_fn = train.make_update_fn(
      apply_fn=model.apply, accum_steps=accum_steps, tx=tx)
  params_repl, opt_repl = flax.jax_utils.replicate((params, tx.init(params)),
                                                   axis_name=runners.AXIS)
  losses = []
  for step in range(3):
    batch = {
        'image': images[step].reshape(devices, -1, 28, 28, 3),
        'label': labels[step].reshape(devices, -1, 10)
    }
    rng_repl = flax.jax_utils.replicate(
        jax.random.PRNGKey(step), axis_name=runners.AXIS)
    params_repl, opt_repl, loss, _ = update_fn(params_repl, opt_repl, batch,
                                               rng_repl)
    assert np.all(np.asarray(loss) == np.asarray(loss)[0])  # pmean'd
    losses.append(float(loss[0]))
  return losses, jax.device_get(flax.jax_utils.unreplicate(params_repl))


def test_8_devices_equal_1_device(eight_devices):
  eight = dict(eight_devices[0])
  losses, params = three_steps(devices=1, accum_steps=1)
  flat = trees.flatten_tree(params)
  # It trains: step 1 sees the zero head (log 10), later steps do not.
  assert abs(losses[0] - np.log(10)) < 1e-5
  assert losses[2] != losses[1] != losses[0]
  assert np.abs(flat['head/kernel']).max() > 1e-3

  # 8 devices x 2 examples, gradients pmean'd == 1 device x 16 examples.
  np.testing.assert_allclose(eight.pop('losses'), losses, rtol=1e-5)
  assert set(flat) == set(eight)
  for key, value in flat.items():
    np.testing.assert_allclose(
        eight[key], value, rtol=1e-5, atol=1e-5, err_msg=key)
  # Accumulated micro-batches == the whole batch at once: the in-program
  # loop (utils.accumulate_gradient) in the next test, the loop == the
  # update_fn's one call per micro-batch in test_accumulation.py.


def test_accumulating_4_micro_batches_equals_full_batch():
  model = train.create_model(
      ml_collections.ConfigDict({
          'model': tiny_model_config(),
          'objective': 'classification'
      }),
      num_classes=10)
  rng = np.random.RandomState(1)
  images = jnp.asarray(rng.uniform(-1, 1, (16, 28, 28, 3)), jnp.float32)
  labels = jnp.asarray(np.eye(10)[rng.randint(0, 10, 16)], jnp.float32)
  params = model.init(jax.random.PRNGKey(0), images[:1], train=False)['params']
  # A non-zero head, so that every parameter gets a gradient.
  params = jax.tree_util.tree_map(lambda x: x, params)
  params['head']['kernel'] = jnp.asarray(
      rng.normal(0, 0.1, params['head']['kernel'].shape), jnp.float32)

  def loss_fn(p, x, y):
    return objectives.softmax_xent(
        logits=model.apply({'params': p}, x, train=False), labels=y)

  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  full_loss, full_grads = grad_fn(params, images, labels)
  acc_loss, acc_grads = jax.jit(lambda p, x, y: utils.accumulate_gradient(
      jax.value_and_grad(loss_fn), p, x, y, 4))(params, images, labels)
  np.testing.assert_allclose(acc_loss, full_loss, rtol=0, atol=1e-5)
  # float32 sums in another order: ~1e-5 relative; a wrong scaling is 4x.
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
      acc_grads, full_grads)
  # The mean of the 4 slices' losses, computed by hand.
  slice_loss = jax.jit(loss_fn)
  by_hand = np.mean([
      slice_loss(params, images[i:i + 4], labels[i:i + 4])
      for i in range(0, 16, 4)
  ])
  np.testing.assert_allclose(acc_loss, by_hand, rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match='accum_steps'):
    utils.accumulate_gradient(
        jax.value_and_grad(loss_fn), params, images[:10], labels[:10], 4)


def test_sigmoid_xent_matches_formula():
  logits = jnp.array([[2.0, -1.0, 0.5]])
  labels = jnp.array([[1.0, 0.0, 1.0]])
  p = 1 / (1 + np.exp(-np.array([2.0, -1.0, 0.5])))
  want = -(np.log(p[0]) + np.log(1 - p[1]) + np.log(p[2]))
  np.testing.assert_allclose(
      objectives.sigmoid_xent(logits=logits, labels=labels), want, rtol=1e-6)
  np.testing.assert_allclose(
      objectives.softmax_xent(logits=logits, labels=jnp.array([[0., 1., 0.]])),
      -jax.nn.log_softmax(logits)[0, 1],
      rtol=1e-6)


def test_label_smoothing_mixes_uniform_targets():
  """loss_fn(label_smoothing=s) is the cross-entropy against
  (1 - s) * one_hot + s / classes, computed here by hand."""
  logits = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, -0.3]], np.float32)
  labels = np.eye(3, dtype=np.float32)[[0, 2]]
  apply_fn = lambda variables, images, train, rngs: variables['params']
  loss_fn = objectives.classification_loss_fn(apply_fn, 'softmax_xent', 0.1)
  got = loss_fn(jnp.asarray(logits), None, jnp.asarray(labels), None)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  targets = 0.9 * labels + 0.1 / 3
  np.testing.assert_allclose(got, -(targets * logp).sum(-1).mean(), rtol=1e-6)
  plain = objectives.classification_loss_fn(apply_fn)(jnp.asarray(logits), None,
                                                      jnp.asarray(labels), None)
  np.testing.assert_allclose(plain, -(labels * logp).sum(-1).mean(), rtol=1e-6)


def test_confusion_counts_top1_without_padding():
  """Rows true class, columns top-1; padding left out; its trace is
  top1_counts' number correct."""
  rng = np.random.RandomState(3)
  n, k = 40, 4
  logits = rng.normal(size=(n, k)).astype(np.float32)
  labels = np.eye(k, dtype=np.float32)[rng.randint(0, k, n)]
  mask = (np.arange(n) < n - 5).astype(np.float32)
  apply_fn = lambda variables, images, train: images
  batch = {'image': logits, 'label': labels, 'mask': mask}
  got = np.asarray(objectives.top1_confusion(apply_fn, k)(None, batch))
  want = np.zeros((k, k))
  for i in range(n - 5):
    want[labels[i].argmax(), logits[i].argmax()] += 1
  np.testing.assert_array_equal(got, want)
  correct, count = objectives.top1_counts(apply_fn)(None, batch)
  assert np.trace(got) == float(correct) and got.sum() == float(count)


# ------------------------------------------------------------------ faults


def test_nan_loss_stops_naming_the_step_and_keeps_last_checkpoint(
    tmp_path, monkeypatch):
  real_get_datasets = train.input_pipeline.get_datasets

  def poisoned(config, *, start_step=0, **kw):
    ds_train, ds_test = real_get_datasets(config, start_step=start_step, **kw)
    # Batches of step 4 on (index 3, counting from 0) hold NaN pixels.
    ds_train = ds_train.enumerate(start=start_step).map(lambda i, b: {
        **b, 'image': tf.where(i >= 3, np.nan, b['image'])
    })
    return ds_train, ds_test

  monkeypatch.setattr(train.input_pipeline, 'get_datasets', poisoned)
  workdir = str(tmp_path / 'work')
  # NaN is only looked at when logging (every 100) or checkpointing (every 2).
  config = tiny_config(total_steps=8, checkpoint_every=2, log_every=100)
  with pytest.raises(step_guards.NonFiniteLossError, match=r'at step 4\b') as e:
    train.train_and_evaluate(config, workdir)
  assert 'step 2' in str(e.value)  # names the kept checkpoint
  ckpts = train_checkpoint.TrainCheckpoints(workdir)
  assert ckpts.all_steps() == [2]
  assert train_checkpoint.first_non_finite(ckpts.restore_params()) is None
  assert not os.path.exists(os.path.join(workdir, run_report.SUMMARY_FILE))


def test_checkpoint_refuses_nan_state_and_drops_unfinished_saves(tmp_path):
  ckpts = train_checkpoint.TrainCheckpoints(str(tmp_path))
  good = {'params': {'w': np.ones(3, np.float32)}}
  ckpts.save(1, good)
  with pytest.raises(train_checkpoint.NonFiniteStateError, match=r"'w'"):
    ckpts.save(2, {'params': {'w': np.array([1., np.inf, 0.], np.float32)}})
  assert ckpts.all_steps() == [1]
  np.testing.assert_array_equal(ckpts.restore_params()['w'],
                                good['params']['w'])
  ckpts.close()
  # What a kill -9 during a save leaves behind: never a step, removed on start.
  unfinished = tmp_path / 'checkpoints' / '3.orbax-checkpoint-tmp-1234'
  os.makedirs(unfinished / 'default')
  ckpts = train_checkpoint.TrainCheckpoints(str(tmp_path))
  assert ckpts.all_steps() == [1] and not unfinished.exists()


def test_pretrained_checkpoint_that_does_not_fit(tmp_path):
  other = tiny_model_config()
  other.hidden_size = 24  # a different width than the model being trained
  model = train.create_model(
      ml_collections.ConfigDict({
          'model': other,
          'objective': 'classification'
      }), 10)
  params = model.init(
      jax.random.PRNGKey(0), jnp.zeros([1, 28, 28, 3]), train=False)['params']
  path = str(tmp_path / 'other.npz')
  checkpoint.save(params, path)
  config = tiny_config(pretrained_path=path)
  with pytest.raises(checkpoint.CheckpointError, match='other.npz'):
    train.train_and_evaluate(config, str(tmp_path / 'work'))
  config = tiny_config(pretrained_path=str(tmp_path / 'missing.npz'))
  with pytest.raises(errors.ConfigError, match='does not exist'):
    train.train_and_evaluate(config, str(tmp_path / 'work2'))


def test_bad_config_values():
  with pytest.raises(ValueError, match='accum_steps'):
    train.train_and_evaluate(tiny_config(batch=32, accum_steps=3), '/tmp/x')
  with pytest.raises(ValueError, match='optimizer'):
    optim.make_optimizer(tiny_config(optimizer='lamb'))
  with pytest.raises(ValueError, match='weight_decay'):
    optim.make_optimizer(
        tiny_config(optimizer='sgd_momentum', weight_decay=0.1))


def test_batch_not_divisible_by_device_count(eight_devices):
  out = eight_devices[1]
  assert 'ERROR: config.batch=12 is not divisible by the 8 devices' in out
  assert 'multiple of 8' in out


def test_main_reports_missing_dataset_without_traceback(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  missing = str(tmp_path / 'no_such_folder')
  result = subprocess.run(
      preloaded.command(env, '-m', 'vit_jax.main',
                        f'--workdir={tmp_path / "w"}',
                        f'--config.dataset={missing}'),
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300)
  assert result.returncode == 1
  assert 'Error: Image folder' in result.stderr
  assert 'does not exist' in result.stderr
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]

"""Training options: frozen parameters, FSDP in the loop, MPP, few-shot,
and exporting a run's parameters one at a time.

Each run is the real `train.train_and_evaluate` on the embedded digits with
the 1-layer model of test_train.tiny_config (one run, a module fixture, for
the frozen-backbone and the few-shot tests; no run draws its plots); the
export tests also save train states of test_checkpoint's models directly.
"""

import json
import math
import os
import time
import weakref
import zipfile

import jax
import ml_collections
import numpy as np
import optax
import pytest

import test_checkpoint
from test_train import read_summary
from test_train import run_python
from test_train import tiny_config
from test_train import tiny_model_config
from vit_jax import checkpoint
from vit_jax import models_mpp
from vit_jax import train
from vit_jax.checkpoints import export
from vit_jax.checkpoints import layouts
from vit_jax.checkpoints import npz
from vit_jax.checkpoints import train_checkpoint
from vit_jax.checkpoints import trees
from vit_jax.evaluation import fewshot
from vit_jax.reporting import run_plots
from vit_jax.training import objectives
from vit_jax.training import optim
from vit_jax.training import trainable
from vit_jax.training import weight_ema


@pytest.fixture(scope='module', autouse=True)
def _no_run_plots():
  """The runs here do not draw curves.png and confusion.png (~2 CPU s a
  run): no test of this module looks at them; test_run_plots.py does."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(run_plots, 'write_run_plots', lambda *args, **kw: [])
    yield


def _flat(tree):
  name = lambda k: str(
      getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))
  return {
      '/'.join(name(k)
               for k in path): np.asarray(v)
      for path, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def _tiny_params(representation_size=8):
  config = tiny_config()
  config.model = tiny_model_config(representation_size=representation_size)
  model = train.create_model(config, 10)
  return config, model, train.init_params(model, config)


def _npz_entries(path):
  with zipfile.ZipFile(path) as f:
    return {name: f.read(name) for name in f.namelist()}


def export_differences(workdir, directory, names='released'):
  """Exports `workdir`'s newest step (streamed, leaf by leaf) and writes it
  the whole-tree way (`checkpoint.save` of `restore_params`, the whole state
  read); returns the `.npy` entries whose bytes differ, and the count."""
  streamed = os.path.join(directory, f'streamed_{names}.npz')
  whole = os.path.join(directory, f'whole_{names}.npz')
  step = export.export(workdir, streamed, names=names)
  ckpts = train_checkpoint.TrainCheckpoints(workdir)
  checkpoint.save(ckpts.restore_params(step), whole, names=names)
  ckpts.close()
  got, want = _npz_entries(streamed), _npz_entries(whole)
  return sorted(k for k in got.keys() | want.keys()
                if got.get(k) != want.get(k)), len(want)


# ------------------------------------------------------- trainable selection


def test_trainable_presets_and_regex():
  _, _, params = _tiny_params()
  names = lambda spec: sorted(
      k for k, v in _flat(trainable.trainable_mask(params, spec)).items() if v)
  assert names('head') == ['head/bias', 'head/kernel']
  assert names('head+pre_logits') == [
      'head/bias', 'head/kernel', 'pre_logits/bias', 'pre_logits/kernel'
  ]
  assert names('encoder_norm|^head') == [
      'Transformer/encoder_norm/bias', 'Transformer/encoder_norm/scale',
      'head/bias', 'head/kernel'
  ]
  assert names(None) == names('all') == sorted(_flat(params))
  train_part, frozen = trainable.split(params,
                                       trainable.trainable_mask(params, 'head'))
  assert sorted(_flat(train_part)) == ['head/bias', 'head/kernel']
  merged = _flat(trainable.merge(train_part, frozen))
  assert merged.keys() == _flat(params).keys()
  with pytest.raises(ValueError, match="selects no parameter.*'Transformer'"):
    trainable.trainable_mask(params, 'backbone')
  with pytest.raises(ValueError, match='not a valid regular expression'):
    trainable.trainable_mask(params, 'head(')
  with pytest.raises(ValueError, match='not a valid regular expression'):
    train.train_and_evaluate(tiny_config(trainable='['), '/tmp/unused')


def test_head_only_update_equals_the_head_part_of_the_full_update():
  """Without clipping, SGD's head update does not depend on what else trains."""
  _, model, params = _tiny_params()
  rng = np.random.RandomState(0)
  batch = {
      'image': rng.uniform(-1, 1, (1, 8, 28, 28, 3)).astype(np.float32),
      'label': np.eye(10, dtype=np.float32)[rng.randint(0, 10, (1, 8))]
  }
  # A non-zero head so that the backbone gets gradients too.
  params['head']['kernel'] = rng.normal(0, 0.1, (8, 10)).astype(np.float32)
  tx, _ = optim.make_optimizer(
      ml_collections.ConfigDict(
          dict(
              optimizer='sgd_momentum',
              total_steps=2,
              base_lr=0.5,
              decay_type='linear',
              warmup_steps=0,
              grad_norm_clip=0.0,
              optim_dtype=None)))
  results = {}
  for spec in ('all', 'head'):
    mask = trainable.trainable_mask(params, spec)
    train_part = trainable.partition(params, None if spec == 'all' else mask)[0]
    update_fn = train.make_update_fn(
        apply_fn=model.apply,
        accum_steps=1,
        tx=tx,
        trainable_mask=None if spec == 'all' else mask)
    state = jax.tree_util.tree_map(lambda x: np.asarray(x)[None],
                                   (params, tx.init(train_part)))
    new_params, _, _, _ = update_fn(*state, batch,
                                    np.asarray(jax.random.PRNGKey(0))[None])
    results[spec] = _flat(jax.tree_util.tree_map(lambda x: x[0], new_params))
  before = _flat(params)
  for key in before:
    if key.startswith('head/'):
      np.testing.assert_allclose(
          results['head'][key], results['all'][key], rtol=1e-6, atol=1e-7)
      assert np.any(results['head'][key] != before[key]), key
    else:
      np.testing.assert_array_equal(results['head'][key], before[key])
  # The full update moved the backbone, all but three leaves whose gradient
  # is exactly 0 at this initialisation: the class token (zero, with a zero
  # sin-cos position) gives a zero query, so the scores do not depend on the
  # query and key kernels, and softmax ignores the key bias.
  attention = 'Transformer/encoderblock_0/MultiHeadDotProductAttention_0/'
  still = sorted(k for k in before if np.all(results['all'][k] == before[k]))
  assert still == [
      attention + n for n in ('key/bias', 'key/kernel', 'query/kernel')
  ], still


@pytest.fixture(scope='module')
def frozen_run(tmp_path_factory):
  """(config, workdir, summary) of one 4-step AdamW run that trains the head
  and pre_logits only, with few-shot evaluations at steps 2 and 4: the
  frozen-backbone and the few-shot tests examine the same run."""
  config = tiny_config(
      total_steps=4,
      optimizer='adamw',
      weight_decay=0.1,
      base_lr=0.01,
      trainable='head+pre_logits',
      **{
          'fewshot.every_steps': 2,
          'fewshot.shots': (1, 3),
          'fewshot.seeds': (0, 1),
          'fewshot.max_per_class': 5,
          'fewshot.max_test_examples': 100
      })
  config.model = tiny_model_config(representation_size=8)
  workdir = str(tmp_path_factory.mktemp('frozen') / 'frozen')
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_frozen_backbone_run_keeps_frozen_params_bit_for_bit(frozen_run):
  config, workdir, summary = frozen_run
  model = train.create_model(config, 10)
  start = _flat(train.init_params(model, config))
  ckpts = train_checkpoint.TrainCheckpoints(workdir)
  end = _flat(ckpts.restore_params(4))
  assert end.keys() == start.keys()
  trained = [k for k in start if k.startswith(('head/', 'pre_logits/'))]
  assert len(trained) == 4
  for key in start:
    if key in trained:
      assert np.any(end[key] != start[key]), key
    else:
      np.testing.assert_array_equal(end[key], start[key], err_msg=key)
  n_trainable = 8 * 10 + 10 + 16 * 8 + 8
  assert summary['num_trainable_params'] == n_trainable
  assert summary['num_params'] > 10 * n_trainable
  # AdamW's moments exist for the trainable leaves only.
  state, mask, step, _ = train._init_or_restore(  # pylint: disable=protected-access
      config, model,
      optim.make_optimizer(config)[0], ckpts)
  ckpts.close()
  assert step == 4 and mask is not None
  moments = [
      x for x in jax.tree_util.tree_leaves(state['opt_state']) if np.ndim(x)
  ]
  assert sum(np.size(x) for x in moments) == 2 * n_trainable
  for path, value in _flat(state['opt_state']).items():
    assert not np.ndim(value) or '/head/' in path or '/pre_logits/' in path, (
        path)


# ------------------------------------------------------------ FSDP in loop

_FSDP_SCRIPT = """
import json, sys
import numpy as np
from test_train import tiny_config
from test_train_options import export_differences
from vit_jax import train
from vit_jax.checkpoints import train_checkpoint
from vit_jax.reporting import run_plots
# Four runs whose pictures nobody looks at (test_run_plots.py checks them):
# curves.png and confusion.png are not drawn (~2 CPU s a run).
run_plots.write_run_plots = lambda *args, **kw: []
out = {}
# fsdp_min_shard_size: the tiny model's weight matrices are split too.
fsdp = {'parallelism': 'fsdp', 'fsdp_min_shard_size': 256}
for name, kw in [('pmap', {}), ('fsdp', fsdp),
                 ('fsdp_head', dict(fsdp, trainable='head')),
                 ('mesh2x4', dict(fsdp, **{'mesh.data': 2}))]:
  workdir = sys.argv[1] + '/' + name
  config = tiny_config(batch=32, batch_eval=200, total_steps=3,
                       accum_steps=2, eval_every=3, **kw)
  summary = train.train_and_evaluate(config, workdir)
  params = train_checkpoint.TrainCheckpoints(workdir).restore_params()
  flat = {'/'.join(map(str, p)): np.asarray(v).tolist() for p, v in
          __import__('flax').traverse_util.flatten_dict(params).items()}
  out[name] = {'accuracy': summary['accuracy'],
               'loss': summary['final_train_loss'],
               'compilations': summary['train_step_compilations'],
               'params': flat}
  if name.startswith('fsdp'):  # Sharded states, exported leaf by leaf.
    out[name]['export'] = export_differences(workdir, workdir)
json.dump(out, open(sys.argv[1] + '/out.json', 'w'))
"""


def test_fsdp_run_equals_pmap_run_on_8_devices(tmp_path):
  """The default mesh (1 x 8) and --config.mesh.data=2 (2 x 4) train like
  pmap, with gradient accumulation; the sharded states export leaf by leaf."""
  run_python(_FSDP_SCRIPT, devices=8, args=(str(tmp_path),))
  with open(tmp_path / 'out.json') as f:
    out = json.load(f)
  pmap = out['pmap']
  # Exported from FSDP shards: the file of the whole-state path, byte for
  # byte (the frozen run has moments for the head only).
  for name in ('fsdp', 'fsdp_head'):
    assert out[name]['export'] == [[], len(out['pmap']['params'])], (
        out[name]['export'])
  for fsdp in (out['fsdp'], out['mesh2x4']):
    # pmap accumulates one call per micro-batch: the zeros of the sums, a
    # micro-batch and the update compile once each; the FSDP step is one.
    assert (pmap['compilations'], fsdp['compilations']) == (3, 1)
    assert fsdp['accuracy'] == pmap['accuracy']
    np.testing.assert_allclose(fsdp['loss'], pmap['loss'], rtol=1e-5)
    assert fsdp['params'].keys() == pmap['params'].keys()
    for key, value in pmap['params'].items():
      np.testing.assert_allclose(
          fsdp['params'][key], value, rtol=1e-5, atol=1e-5, err_msg=key)
  # Frozen under FSDP: the backbone is the initialisation, bit for bit.
  config = tiny_config()
  init = {
      '/'.join(k.split('/')): v for k, v in _flat(
          train.init_params(train.create_model(config, 10), config)).items()
  }
  head = out['fsdp_head']['params']
  for key, value in init.items():
    if key.startswith('head/'):
      assert np.any(np.asarray(head[key], np.float32) != value), key
    else:
      np.testing.assert_array_equal(
          np.asarray(head[key], np.float32), value, err_msg=key)


# ------------------------------------------ export, streamed in groups


def _save_state(workdir, case):
  """A train state as a run saves it, of test_checkpoint's 2-layer model:
  'hybrid' (ResNet root, SGD momentum) or 'scanned_ema' (scanned blocks;
  Adam and an average of the weights, all leaves + 1). Returns the
  parameters export should write (linen names, per layer)."""
  hybrid = case == 'hybrid'
  config = test_checkpoint.tiny_config('gap' if hybrid else 'token',
                                       16 if hybrid else None,
                                       () if hybrid else None,
                                       2 if hybrid else 8)
  params = test_checkpoint.random_params(config, (16, 16))
  tx = optax.sgd(0.1, momentum=0.9) if hybrid else optax.adam(1e-3)
  state = {'params': params, 'opt_state': tx.init(params)}
  if case == 'scanned_ema':
    state['params'] = layouts.layers_to_scan(params, 2)
    ema = weight_ema.with_weight_ema(tx, 0.9).init(state['params'])
    state['opt_state'] = ema._replace(
        ema_params=jax.tree_util.tree_map(lambda x: x + 1, ema.ema_params))
    params = jax.tree_util.tree_map(lambda x: x + 1, params)
  ckpts = train_checkpoint.TrainCheckpoints(workdir)
  ckpts.save(1, state)
  ckpts.close()
  return params


@pytest.fixture(scope='module')
def saved_state(tmp_path_factory):
  """case -> (workdir, parameters) of `_save_state`, saved once a module."""
  cache = {}

  def get(case):
    if case not in cache:
      workdir = str(tmp_path_factory.mktemp(case))
      cache[case] = workdir, _save_state(workdir, case)
    return cache[case]

  return get


# A plain ViT is exported from FSDP shards in _FSDP_SCRIPT.
@pytest.mark.parametrize('case', ['hybrid', 'scanned_ema'])
def test_streamed_export_writes_the_whole_tree_file(tmp_path, saved_state,
                                                    case):
  """Every `.npy` entry as `checkpoint.save` of `restore_params` writes it,
  byte for byte, under both naming schemes."""
  workdir, params = saved_state(case)
  for names in npz.NAME_SCHEMES:
    differences, count = export_differences(workdir, str(tmp_path), names)
    assert differences == [] and count == len(trees.flatten_tree(params))
  exported = checkpoint.load(str(tmp_path / 'streamed_released.npz'))
  test_checkpoint.assert_trees_equal(exported, params)


def test_export_reads_one_parameter_at_a_time(tmp_path, saved_state,
                                              monkeypatch):
  """With a read budget of 0 bytes, each read restores one leaf, never one of
  the optimizer's moments; its arrays are written, and it is gone, before
  the next read."""
  workdir, params = saved_state('scanned_ema')
  path = str(tmp_path / 'model.npz')
  monkeypatch.setattr(train_checkpoint, 'READ_GROUP_BYTES', 0)
  events, alive = [], []
  read = train_checkpoint.TrainCheckpoints._read_leaves  # pylint: disable=protected-access

  def read_one(self, directory, item):
    # The leaf read before is gone. (orbax's reader threads may still hold
    # it for a moment after handing it over.)
    deadline = time.monotonic() + 5
    while any(ref() is not None for ref in alive):
      assert time.monotonic() < deadline, 'a leaf read before is still held'
      time.sleep(0.001)
    restored = read(self, directory, item)
    (key,
    ), leaves = trees.flatten_tree(item), jax.tree_util.tree_leaves(restored)
    assert len(leaves) == 1 and isinstance(leaves[0], np.ndarray)
    alive.append(weakref.ref(leaves[0]))
    events.append(key)
    return restored

  def restore(*unused_args):
    raise AssertionError('The whole train state was restored.')

  write = np.lib.format.write_array

  def write_one(f, array, **kw):
    events.append(array.shape)
    write(f, array, **kw)

  monkeypatch.setattr(train_checkpoint.TrainCheckpoints, '_read_leaves',
                      read_one)
  monkeypatch.setattr(train_checkpoint.TrainCheckpoints, 'restore', restore)
  monkeypatch.setattr(np.lib.format, 'write_array', write_one)
  export.export(workdir, path)
  reads = [e for e in events if isinstance(e, str)]
  # The average replaces every parameter; no moment (mu, nu) is read.
  scanned = layouts.layers_to_scan(params, 2)
  assert sorted(reads) == sorted(
      f'opt_state/ema_params/{k}' for k in trees.flatten_tree(scanned))
  # After each read, its arrays (a scanned leaf: one per layer) are written.
  for i, key in enumerate(reads):
    start = events.index(key) + 1
    end = events.index(reads[i + 1]) if i + 1 < len(reads) else len(events)
    assert end - start == (2 if '/encoderblock/' in key else 1), key
  assert len(npz.read_npz(path)) == len(trees.flatten_tree(params))


@pytest.mark.parametrize('budget', ['largest', 'default'])
def test_export_reads_groups_within_the_budget(tmp_path, saved_state,
                                               monkeypatch, budget):
  """Reads take consecutive leaves up to READ_GROUP_BYTES (a larger leaf
  alone): the tiny model in one read by default; the file is the same, byte
  for byte, as the one of one leaf per read."""
  workdir, _ = saved_state('scanned_ema')
  default = train_checkpoint.READ_GROUP_BYTES
  single = str(tmp_path / 'single.npz')
  monkeypatch.setattr(train_checkpoint, 'READ_GROUP_BYTES', 0)
  export.export(workdir, single)
  sizes = {
      k: v.size * v.dtype.itemsize
      for k, v in train_checkpoint.TrainCheckpoints(workdir).iter_params()
  }
  limit = max(sizes.values()) if budget == 'largest' else default
  monkeypatch.setattr(train_checkpoint, 'READ_GROUP_BYTES', limit)
  reads = []
  read = train_checkpoint.TrainCheckpoints._read_leaves  # pylint: disable=protected-access

  def read_group(self, directory, item):
    reads.append(list(trees.flatten_tree(item)))
    return read(self, directory, item)

  monkeypatch.setattr(train_checkpoint.TrainCheckpoints, '_read_leaves',
                      read_group)
  grouped = str(tmp_path / 'grouped.npz')
  export.export(workdir, grouped)
  prefix = 'opt_state/ema_params/'
  names = [k[len(prefix):] for group in reads for k in group]
  assert sorted(names) == sorted(sizes)
  for group in reads:
    assert len(group) == 1 or sum(
        sizes[k[len(prefix):]] for k in group) <= limit, group
  if budget == 'default':
    assert len(reads) == 1
  else:
    assert 1 < len(reads) < len(sizes)
  with open(single, 'rb') as f, open(grouped, 'rb') as g:
    assert f.read() == g.read()


# ------------------------------------------------------ masked patch pred.


def test_mpp_pretraining_lowers_the_loss_and_fine_tunes(tmp_path):
  config = tiny_config(
      objective='mpp',
      total_steps=30,
      batch=64,
      accum_steps=2,
      optimizer='adamw',
      base_lr=1e-2,
      weight_decay=0.0,
      warmup_steps=3,
      eval_every=30,
      checkpoint_every=30,
      log_every=10)
  model = train.create_model(config, 10)
  assert isinstance(model, models_mpp.MaskedPatchPredictor)
  start = train.init_params(model, config)
  assert {'mask_token', 'mpp_head'} <= set(start)
  # At initialisation the zero mpp_head predicts uniformly: loss ln 512.
  images = np.random.RandomState(0).uniform(-1, 1, (4, 28, 28, 3))
  loss0 = models_mpp.loss_fn(
      start, images.astype(np.float32), jax.random.PRNGKey(0), model=model)
  np.testing.assert_allclose(loss0, math.log(512), rtol=1e-6)

  summary = train.train_and_evaluate(config, str(tmp_path / 'mpp'))
  assert summary['objective'] == 'mpp'
  assert summary['final_train_loss'] < math.log(512) - 2.0, summary
  # Mean-colour accuracy on the corrupted test patches.
  assert 0.3 < summary['accuracy'] <= 1.0

  path = str(tmp_path / 'mpp.npz')
  export.export(str(tmp_path / 'mpp'), path)
  exported = npz.read_npz(path)
  assert 'mask_token' in exported and 'mpp_head/kernel' in exported
  ft = tiny_config(total_steps=2, pretrained_path=path)
  ft.model.posemb = config.model.posemb
  ft_model = train.create_model(ft, 10)
  ft_start = train.init_params(ft_model, ft)
  assert 'mask_token' not in ft_start and 'mpp_head' not in ft_start
  np.testing.assert_array_equal(ft_start['embedding']['kernel'],
                                exported['embedding/kernel'])
  assert not np.any(ft_start['head']['kernel'])
  ft_summary = train.train_and_evaluate(ft, str(tmp_path / 'ft'))
  assert ft_summary['objective'] == 'classification'
  assert np.isfinite(ft_summary['final_train_loss'])


def test_mpp_labels_are_example_indices():
  labels = objectives.mpp_labels((2, 3))
  assert labels.shape == (2, 3, 1) and labels.dtype == np.int32
  np.testing.assert_array_equal(labels[1, :, 0], [0, 1, 2])


def test_mpp_refuses_a_pretrained_checkpoint():
  with pytest.raises(ValueError, match='pre-trains from scratch'):
    train.train_and_evaluate(
        tiny_config(objective='mpp', pretrained_path='x.npz'), '/tmp/unused')
  with pytest.raises(ValueError, match='Unknown config.objective'):
    train.train_and_evaluate(tiny_config(objective='simclr'), '/tmp/unused')
  with pytest.raises(ValueError, match='Unknown config.parallelism'):
    train.train_and_evaluate(tiny_config(parallelism='tp'), '/tmp/unused')


# ------------------------------------------------- few-shot during training


def test_fewshot_during_training_equals_the_evaluator_on_the_checkpoint(
    frozen_run):
  config, workdir, summary = frozen_run
  history = summary['fewshot_history']
  assert [step for step, _ in history] == [2, 4]
  assert read_summary(workdir)['fewshot_history'] == history
  for _, results in history:
    assert sorted(results) == ['fewshot/1shot', 'fewshot/3shot']
    assert all(0.0 <= v <= 1.0 for v in results.values())
  params = train_checkpoint.TrainCheckpoints(workdir).restore_params(4)
  again = fewshot.make_fewshot_evaluator(config)(params)
  assert again == pytest.approx(history[-1][1], abs=1e-9)
  # The dataset report of the run.
  with open(os.path.join(workdir, 'class_names.json')) as f:
    assert len(json.load(f)) == 10
  assert os.path.exists(os.path.join(workdir, 'split.json'))

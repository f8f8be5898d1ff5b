"""Two processes x 2 devices train exactly like one process x 4 devices.

Each process runs `jax.distributed.initialize` on 127.0.0.1 with its own
XLA_FLAGS device count and feeds its own share of the global batch, as the
input pipeline splits it per process. The one-process reference feeds the
union of both shares (in the same device order) to 4 devices. Both data
parallelisms are pinned: pmap (replicated state) and FSDP (state sharded
across the processes, checkpoints written shard by shard and resumed, then
exported to `.npz` by both processes, process 0 writing the file).

Before them, two processes x 4 devices save an FSDP state without
gathering it (`process_allgather` raises there), each writing its shards;
the two workers restore it onto 2 x 2 devices (FSDP and pmap) and the
reference onto 1 x 4. The processes run once, for all tests (a module
fixture): 5 processes, about 155 CPU s (each one's JSON output holds its CPU
seconds per phase). The savers import no TensorFlow and build no datasets;
the workers' pmap losses are the ones their train loop logs.
"""

import json
import os
import shutil
import socket
import subprocess
import textwrap

import numpy as np
import pytest
import tensorstore as ts

import compile_settings
import preloaded
from test_train import REPO
from test_train import tiny_config
from vit_jax import checkpoint
from vit_jax import input_pipeline
from vit_jax.checkpoints import train_checkpoint
from vit_jax.checkpoints import trees

STEPS = 3
# tiny_config's fields of the pmap and the FSDP runs. FSDP: the tiny model's
# weight matrices (512+ elements) are split over the 4 devices of both
# processes; checkpoints every 2 steps.
_CONFIG = {
    'batch': 16,
    'batch_eval': 200,
    'total_steps': STEPS,
    'warmup_steps': 0,
    'model.transformer.dropout_rate': 0.1
}
_FSDP_CONFIG = dict(
    _CONFIG, checkpoint_every=2, parallelism='fsdp', fsdp_min_shard_size=256)

# Shared by all processes (the savers too, which import no TensorFlow): the
# CPU seconds of each phase and a process_allgather that raises.
_JAX_ONLY = """
import json, os, shutil, sys, time
import jax, numpy as np

cpu = {}
def phase(name):
  # CPU seconds (all threads) since the previous phase, for the JSON output.
  cpu[name] = time.process_time() - sum(cpu.values())

def forbid_gathering():
  # Makes process_allgather raise for more than 1 KiB: the code after never
  # gathers the state (only the small values of jax's own barriers).
  from jax.experimental import multihost_utils
  gather = multihost_utils.process_allgather
  def small_gather(tree, *args, **kwargs):
    size = sum(np.size(x) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(tree))
    assert size <= 1024, f'process_allgather of {size} bytes'
    return gather(tree, *args, **kwargs)
  multihost_utils.process_allgather = small_gather
  return lambda: setattr(multihost_utils, 'process_allgather', gather)
"""

# Shared by the workers and the reference: the configs, with dropout on
# (per-device keys come from the global device index, so they agree too),
# and restoring. vit_jax.input_pipeline comes first: it imports TensorFlow
# without Keras, which test_train's `import tensorflow` would load (4-5 CPU s
# a process).
_COMMON = _JAX_ONLY + """
import flax.jax_utils
from vit_jax import input_pipeline, train
from test_train import tiny_config
from vit_jax.checkpoints import trees
from vit_jax.parallel import runners, sharding
from vit_jax.training import optim, step_guards
from vit_jax.checkpoints import train_checkpoint

STEPS = %(steps)d
config = tiny_config(**%(config)r)
fsdp_config = tiny_config(**%(fsdp_config)r)

def flat(params):
  return {k: np.asarray(v).tolist()
          for k, v in trees.flatten_tree(params).items()}

def restored(cfg, workdir):
  # The params of workdir's newest step as the train loop restores them for
  # cfg (on this process count and device count), gathered to numpy, with
  # the step and whether they hold the runner's layout.
  from jax.experimental import multihost_utils
  model = train.create_model(cfg, 10)
  tx, _ = optim.make_optimizer(cfg)
  ckpts = train_checkpoint.TrainCheckpoints(workdir)
  state, _, step, runner = train._init_or_restore(cfg, model, tx, ckpts)
  ckpts.close()
  params = state['params']
  layout = all(isinstance(x, np.ndarray) for x in
               jax.tree_util.tree_leaves(params))
  if hasattr(runner, 'param_shardings'):
    layout = jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda x, s: x.sharding == s, params, runner.param_shardings))
    params = multihost_utils.process_allgather(params, tiled=True)
  return {'step': step, 'layout': layout, 'params': flat(params)}
""" % dict(
    steps=STEPS, config=_CONFIG, fsdp_config=_FSDP_CONFIG)

# The reference's pmap loss trajectory: make_update_fn on the real pipeline.
_TRAJECTORY = """
def trajectory(next_batch):
  model = train.create_model(config, 10)
  params = train.init_params(model, config)
  tx, _ = optim.make_optimizer(config)
  update_fn = train.make_update_fn(apply_fn=model.apply, accum_steps=1, tx=tx)
  params_repl, opt_repl = flax.jax_utils.replicate(
      (params, jax.device_get(jax.jit(tx.init)(params))),
      axis_name=runners.AXIS)
  keys = step_guards.StepKeys(config.seed)
  losses = []
  for step in range(1, STEPS + 1):
    rng = np.broadcast_to(keys(step), (jax.local_device_count(), 2))
    params_repl, opt_repl, loss, _ = update_fn(params_repl, opt_repl,
                                               next_batch(), rng)
    losses.append(float(runners.first_replica(loss)))
  return losses
"""

# One of two processes x 4 devices: saves an FSDP state without gathering it.
# Without TensorFlow (vit_jax.train and test_train import it): the model,
# optimizer and runner train._init_or_restore makes of the FSDP config
# (argv[5]: its JSON and the image size), built here.
_SAVER = _JAX_ONLY + """
import contextlib
import jax.numpy as jnp
import ml_collections
from vit_jax import models
from vit_jax.checkpoints import train_checkpoint
from vit_jax.parallel import sharding
from vit_jax.training import objectives, optim
port, pid, out, workdir = sys.argv[1], int(sys.argv[2]), *sys.argv[3:5]
jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                           num_processes=2, process_id=pid)
assert jax.process_count() == 2 and jax.device_count() == 8
forbid_gathering()
with open(sys.argv[5]) as f:
  spec = json.load(f)
config = ml_collections.ConfigDict(spec['config'])
assert config.parallelism == 'fsdp' and not config.get('trainable')
phase('set_up')
model = models.model_class(config.model)(num_classes=10, **config.model)
tx, _ = optim.make_optimizer(config)
params = jax.device_get(jax.jit(lambda: model.init(
    jax.random.PRNGKey(0), jnp.zeros([1, *spec['image_size'], 3]),
    train=False))()['params'])
runner = sharding.FsdpRunner(
    params=params, loss_fn=objectives.make_loss_fn(model, config), tx=tx,
    accum_steps=config.accum_steps, trainable_mask=None,
    min_shard_size=config.fsdp_min_shard_size, mesh_sizes=config.mesh,
    counts_fn=objectives.make_counts_fn(model, config),
    confusion_fn=objectives.top1_confusion(model.apply, model.num_classes))
ckpts = train_checkpoint.TrainCheckpoints(workdir)
with contextlib.closing(ckpts):
  # Random values, in the same layout: the written bytes do not depend on
  # how well zstd compresses (Adam's zero moments would vanish). Drawn in
  # numpy and placed shard by shard, so nothing is compiled for them.
  rng = np.random.default_rng(1)
  def noisy(x):
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      return x
    value = rng.standard_normal(x.shape).astype(x.dtype)
    return jax.make_array_from_callback(x.shape, x.sharding,
                                        lambda index: value[index])
  params, opt_state = runner.place(
      params, jax.device_get(jax.jit(tx.init)(params)))
  state = jax.tree_util.tree_map(
      noisy, {'params': params, 'opt_state': opt_state})
  ckpts.save(1, state, runner.saved_state)
  # Read back onto the same layout: every shard this process holds.
  back = ckpts.restore(1, runner.restore_template(state))
  same = all(np.array_equal(a.data, b.data) and a.index == b.index
             for x, y in zip(jax.tree_util.tree_leaves(state),
                             jax.tree_util.tree_leaves(back))
             for a, b in zip(x.addressable_shards, y.addressable_shards))
phase('save')
json.dump({'same': same, 'cpu': cpu}, open(out, 'w'))
"""

# One of two processes: the pmap train loop, then the FSDP loop (gathering
# nothing), interrupted and resumed; then the 8-device state restored.
_WORKER = _COMMON + """
from jax.experimental import multihost_utils
port, pid, out, workdir = sys.argv[1], int(sys.argv[2]), *sys.argv[3:5]
jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                           num_processes=2, process_id=pid)
assert jax.process_count() == 2 and jax.device_count() == 4
phase('set_up')
# The real loop (its losses in metrics.jsonl, written by process 0): eval
# counts and checkpoints across processes.
summary = train.train_and_evaluate(config, os.path.join(workdir, 'pmap'))
pmap = {'final_train_loss': summary['final_train_loss'],
        'accuracy': summary['accuracy'], 'step': summary['step'],
        'compiles': summary['train_step_compilations']}
phase('pmap')

fsdp_dir = os.path.join(workdir, 'fsdp')
allow_gathering = forbid_gathering()
first = train.train_and_evaluate(fsdp_config, fsdp_dir)
phase('fsdp')
ckpts = train_checkpoint.TrainCheckpoints(fsdp_dir)
steps_saved = ckpts.all_steps()
uninterrupted = ckpts.restore_params()
ckpts.close()
# Lose the last checkpoint: the same command resumes from step 2, restoring
# the gathered state into shards on both processes.
multihost_utils.sync_global_devices('read the last step')
if pid == 0:
  shutil.rmtree(os.path.join(ckpts.directory, str(STEPS)))
multihost_utils.sync_global_devices('removed the last step')
resumed = train.train_and_evaluate(fsdp_config, fsdp_dir)
phase('fsdp_resumed')
# Both processes export (each read is collective); process 0 writes.
from vit_jax.checkpoints import export
exported_step = export.export(fsdp_dir, os.path.join(workdir, 'fsdp.npz'))
phase('export')
allow_gathering()
params = train_checkpoint.TrainCheckpoints(fsdp_dir).restore_params()
layouts = {'fsdp8_to_fsdp': restored(fsdp_config,
                                     os.path.join(workdir, 'from8')),
           'fsdp8_to_pmap': restored(config, os.path.join(workdir, 'from8')),
           'pmap_to_fsdp': restored(fsdp_config,
                                    os.path.join(workdir, 'pmap'))}
phase('restores')
keys = ('accuracy', 'final_train_loss', 'train_step_compilations',
        'start_step')
json.dump({'pmap': pmap, 'layouts': layouts, 'fsdp': {
    'steps_saved': steps_saved, 'exported_step': exported_step,
    'first': {k: first[k] for k in keys},
    'resumed': {k: resumed[k] for k in keys},
    'uninterrupted': flat(uninterrupted), 'params': flat(params)},
           'cpu': cpu}, open(out, 'w'))
"""

# One process x 4 devices fed the union of both processes' shares.
_REFERENCE = _COMMON + _TRAJECTORY + """
assert jax.process_count() == 1 and jax.device_count() == 4
phase('set_up')

def union_of_shares():
  its = [input_pipeline.get_datasets(config, process_index=i,
                                     process_count=2)[0].as_numpy_iterator()
         for i in range(2)]

  def union():
    # Process i's [4, 2, ...] share -> its 8 examples; both -> [4 devices, 4].
    parts = [next(it) for it in its]
    return {k: np.concatenate([p[k].reshape(8, *p[k].shape[2:])
                               for p in parts]
                              ).reshape(4, 4, *parts[0][k].shape[2:])
            for k in ('image', 'label')}
  return union

# The batches of both trajectories, read once.
union = union_of_shares()
shares = [union() for _ in range(STEPS)]
pmap_losses = trajectory(iter(shares).__next__)
phase('pmap')

model = train.create_model(fsdp_config, 10)
params = train.init_params(model, fsdp_config)
tx, _ = optim.make_optimizer(fsdp_config)
runner = train.make_runner(fsdp_config, model, tx, None, params)
sharded = [k for k, s in trees.flatten_tree(
    runner.param_shardings).items() if s.spec != jax.sharding.PartitionSpec()]
params, opt_state = runner.place(
    params, jax.device_get(jax.jit(tx.init)(params)))
keys = step_guards.StepKeys(fsdp_config.seed)
losses = []
for step in range(1, STEPS + 1):
  params, opt_state, loss = runner.step(
      params, opt_state, sharding.shard_batch(shares[step - 1], runner.mesh),
      keys(step))
  losses.append(runner.scalar(loss))
phase('fsdp')
layouts = {'fsdp8_to_fsdp': restored(fsdp_config, sys.argv[2])}
phase('restore')
json.dump({'pmap': {'losses': pmap_losses}, 'layouts': layouts,
           'fsdp': {'losses': losses, 'params': flat(runner.to_host(params)),
                    'sharded': sharded}, 'cpu': cpu}, open(sys.argv[1], 'w'))
"""


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_pair(script, devices, outs, workdir, *args):
  """Starts `script` as 2 processes of `devices` devices each (argv: port,
  process index, its output file, `workdir`, `args`); returns the
  processes."""
  port = _free_port()
  return [
      subprocess.Popen(
          preloaded.command(
              _env(devices), '-c', textwrap.dedent(script), str(port), str(i),
              outs[i], workdir, *args),
          cwd=REPO,
          env=_env(devices),
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True) for i in range(2)
  ]


def _wait(processes):
  logs = [p.communicate(timeout=600)[0] for p in processes]
  for p, log in zip(processes, logs):
    assert p.returncode == 0, log[-4000:]


def _env(devices):
  env = dict(os.environ)
  env['XLA_FLAGS'] = compile_settings.xla_flags(devices)
  env['PYTHONPATH'] = os.pathsep.join([REPO, os.path.join(REPO, 'tests')])
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  return env


@pytest.fixture(scope='module')
def both(tmp_path_factory):
  """Runs 2 worker processes (2 devices each) and the 4-device reference
  once for both tests.

  Returns (the workers' JSON outputs, the reference's, the workers'
  workdir, the savers' JSON outputs and workdir).
  """
  tmp_path = tmp_path_factory.mktemp('multihost')
  saved8 = str(tmp_path / 'saved8')
  saver_outs = [str(tmp_path / f's{i}.json') for i in range(2)]
  fsdp_config = tiny_config(**_FSDP_CONFIG)
  spec = str(tmp_path / 'fsdp_config.json')
  with open(spec, 'w') as f:
    json.dump(
        {
            'config': json.loads(fsdp_config.to_json_best_effort()),
            'image_size': input_pipeline.get_image_size(fsdp_config)
        }, f)
  _wait(_run_pair(_SAVER, 4, saver_outs, saved8, spec))
  workdir = str(tmp_path / 'work')
  for copy in (os.path.join(workdir, 'from8'), str(tmp_path / 'ref8')):
    shutil.copytree(
        os.path.join(saved8, 'checkpoints'), os.path.join(copy, 'checkpoints'))
  outs = [str(tmp_path / f'p{i}.json') for i in range(2)]
  workers = _run_pair(_WORKER, 2, outs, workdir)
  ref_out = str(tmp_path / 'ref.json')
  ref = subprocess.run(
      preloaded.command(
          _env(4), '-c', textwrap.dedent(_REFERENCE), ref_out,
          str(tmp_path / 'ref8')),
      cwd=REPO,
      env=_env(4),
      capture_output=True,
      text=True,
      timeout=600)
  _wait(workers)
  assert ref.returncode == 0, ref.stderr[-4000:]
  with open(ref_out) as f:
    want = json.load(f)
  results = []
  for o in outs:
    with open(o) as f:
      results.append(json.load(f))
  savers = []
  for o in saver_outs:
    with open(o) as f:
      savers.append(json.load(f))
  return results, want, workdir, savers, saved8


def test_two_processes_match_one_process(both):
  results, want, workdir, _, _ = both
  results = [r['pmap'] for r in results]
  workdir = os.path.join(workdir, 'pmap')
  want = want['pmap']['losses']
  # The head starts at zero: step 1's loss is log(10) whatever the batch.
  assert abs(want[0] - np.log(10)) < 1e-5
  assert len(want) == STEPS and len(set(want)) == STEPS  # it trains
  # Every step's loss of the pair's train loop (logged by process 0).
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  losses = [r['train_loss'] for r in records if 'train_loss' in r]
  assert [r['step'] for r in records if 'train_loss' in r
         ] == list(range(1, STEPS + 1))
  np.testing.assert_allclose(losses, want, rtol=1e-5)
  for r in results:
    np.testing.assert_allclose(r['final_train_loss'], want[-1], rtol=1e-5)
    assert r['step'] == STEPS and r['compiles'] == 1
  # Evaluation sums correct answers over both processes' shards.
  assert results[0]['accuracy'] == results[1]['accuracy']
  # Written once, by process 0; one checkpoint for the pair.
  summary = json.load(open(os.path.join(workdir, 'summary.json')))
  assert summary['processes'] == 2 and summary['devices'] == 4
  assert summary['accuracy'] == results[0]['accuracy']
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == [str(STEPS)]


def test_fsdp_two_processes_match_one_process_and_resume(both):
  results, want, workdir, _, _ = both
  results, want = [r['fsdp'] for r in results], want['fsdp']
  workdir = os.path.join(workdir, 'fsdp')
  # The state really is split across the processes: every weight matrix.
  assert len(want['sharded']) >= 4, want['sharded']
  assert 'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel' in (
      want['sharded'])
  assert len(set(want['losses'])) == STEPS  # it trains
  for r in results:
    assert r['steps_saved'] == [2, STEPS]
    assert r['first']['start_step'] == 0 and r['resumed']['start_step'] == 2
    assert r['first']['train_step_compilations'] == 1
    assert r['resumed']['train_step_compilations'] == 1
    np.testing.assert_allclose(
        r['first']['final_train_loss'], want['losses'][-1], rtol=1e-5)
    # The uninterrupted run, and the run resumed from step 2 on both
    # processes, end where the one-process run ends. The attention key
    # biases are left out: adding a bias to every key shifts each query's
    # scores by one constant, so their exact gradient is zero and what they
    # hold is rounding noise (which depends on the reduction order) scaled
    # by Adam; they only have to stay well below one Adam step (lr 4e-3),
    # which a real gradient would move them by.
    for got in (r['uninterrupted'], r['params']):
      assert got.keys() == want['params'].keys()
      for key, value in want['params'].items():
        if key.endswith('/key/bias'):
          assert np.max(np.abs([got[key], value])) < 1e-3, key
          continue
        np.testing.assert_allclose(
            got[key], value, rtol=1e-5, atol=1e-5, err_msg=key)
    assert r['resumed']['accuracy'] == r['first']['accuracy']
  assert results[0]['params'] == results[1]['params']
  summary = json.load(open(os.path.join(workdir, 'summary.json')))
  assert summary['processes'] == 2 and summary['devices'] == 4


def _chunks_written(ocdbt_folder):
  """{array name: {zarr chunk index: stored bytes}} in one process's OCDBT
  store (the files' sizes vary from run to run with how OCDBT packs them;
  the chunks and their bytes do not)."""
  store = ts.KvStore.open({
      'driver': 'ocdbt',
      'base': f'file://{ocdbt_folder}/'
  }).result()
  chunks = {}
  for key in store.list().result():
    name, chunk = key.decode().rsplit('/', 1)
    if not chunk.startswith('.'):
      index = tuple(map(int, chunk.split('.')))
      chunks.setdefault(name, {})[index] = len(store.read(key).result().value)
  return chunks


def test_fsdp_export_on_two_processes(both):
  """`export.export` on both processes of the FSDP run (process_allgather
  raising): one released-format file, the run's final parameters exactly."""
  results, _, workdir, _, _ = both
  assert [r['fsdp']['exported_step'] for r in results] == [STEPS, STEPS]
  with np.load(os.path.join(workdir, 'fsdp.npz')) as f:
    assert 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel' in f.files
  exported = trees.flatten_tree(
      checkpoint.load(os.path.join(workdir, 'fsdp.npz')))
  want = results[0]['fsdp']['params']
  assert exported.keys() == want.keys()
  for key, value in exported.items():
    np.testing.assert_array_equal(
        value, np.asarray(want[key], np.float32), err_msg=key)
  assert not [n for n in os.listdir(workdir) if n.startswith('fsdp.npz.')]


def test_fsdp_save_is_written_shard_by_shard_by_each_process(both):
  """2 processes x 4 devices: each process writes the chunks of the shards
  its own devices hold, about half of the state's bytes, no chunk twice, and
  none gathers the state (the savers and the FSDP runs of the workers ran
  with process_allgather raising)."""
  _, _, _, savers, saved8 = both
  assert [s['same'] for s in savers] == [True, True]
  step = os.path.join(train_checkpoint.checkpoint_dir(saved8), '1', 'default')
  written = [
      _chunks_written(os.path.join(step, f'ocdbt.process_{i}'))
      for i in range(2)
  ]
  names = set(written[0]) | set(written[1])
  for name in names:
    assert not written[0].get(name, {}).keys() & written[1].get(name, {}), name
  split = {
      n for n in names
      if len(written[0].get(n, ())) + len(written[1].get(n, ())) == 8
  }
  assert 'params.Transformer.encoderblock_0.MlpBlock_0.Dense_0.kernel' in split
  assert 'opt_state.1.0.mu.Transformer.encoderblock_0.MlpBlock_0.Dense_0.' \
         'kernel' in split
  # The devices are in (process, id) order: FSDP shards 0-3 live on
  # process 0, shards 4-7 on process 1.
  for name in split:
    for i in range(2):
      along = {max(chunk) for chunk in written[i][name]}
      assert along == set(range(4 * i, 4 * i + 4)), (name, i, along)
  size = [sum(sum(c.values()) for c in w.values()) for w in written]
  assert min(size) > 0.4 * sum(size), size


def test_restore_onto_other_layouts(both):
  """The FSDP state saved on 2 x 4 devices, restored onto 2 x 2 devices
  (FSDP and pmap) and 1 x 4 (FSDP); the pmap run's state onto FSDP 2 x 2:
  the saved parameters, in the runner's layout."""
  results, want, workdir, _, saved8 = both
  saved = train_checkpoint.TrainCheckpoints(saved8).restore_params()
  from_pmap = train_checkpoint.TrainCheckpoints(os.path.join(
      workdir, 'pmap')).restore_params()
  flat = lambda p: {
      k: np.asarray(v).tolist() for k, v in trees.flatten_tree(p).items()
  }
  cases = [(r['layouts'], name)
           for r in results
           for name in ('fsdp8_to_fsdp', 'fsdp8_to_pmap')]
  cases.append((want['layouts'], 'fsdp8_to_fsdp'))
  for layouts, name in cases:
    got = layouts[name]
    assert got['step'] == 1 and got['layout'], name
    assert got['params'] == flat(saved), name
  for r in results:
    got = r['layouts']['pmap_to_fsdp']
    assert got['step'] == STEPS and got['layout']
    assert got['params'] == flat(from_pmap)

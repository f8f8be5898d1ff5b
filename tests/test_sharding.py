"""Sharded (FSDP) training under jit: layout of the train state, equivalence
with the pmapped step of train.py and with a plain single-device step, on
the 1-D mesh and on data x fsdp meshes.

The 8-device cases run once, in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 set before JAX starts;
it prints its measurements as JSON and the tests below assert on them.
It trains a 1-layer ViT for two steps in eight step programs (pmap, one
device, the 1-D mesh, dropout on 8 devices and on 1, the 2 x 4 mesh with 2
accumulation steps, 8 x 1 and 1 x 8) and imports neither vit_jax.train nor
vit_jax.reporting, which would load TensorFlow: 47-52 CPU s in all (its
CPU seconds per phase are in the output, printed with `pytest -s`).
"""

import json
import os
import subprocess
import sys

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import compile_settings
from vit_jax.parallel import device_mesh  # pylint: disable=wrong-import-position
from vit_jax.parallel import sharded_step  # pylint: disable=wrong-import-position
from vit_jax.parallel import sharding  # pylint: disable=wrong-import-position
from vit_jax.training import objectives  # pylint: disable=wrong-import-position

# Leaves of the tiny model with at least this many elements are sharded:
# every kernel and the position embedding; biases, LayerNorm, cls stay whole.
MIN_SIZE = 256
TOL = 1e-5

_EIGHT_DEVICES = r'''
import json
import time
import flax.jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
# No vit_jax.train or vit_jax.reporting: they import TensorFlow.
from vit_jax import models
from vit_jax.parallel import device_mesh, sharded_step, sharding
from vit_jax.training import objectives, optim, pmap_step

assert jax.device_count() == 8, jax.devices()
MIN_SIZE = %(min_size)d
STEPS = 2
cpu = {'imports': time.process_time()}


def phase(name):
  cpu[name] = time.process_time() - sum(cpu.values())


class CompileCounter:
  # progress.CompileCounter (which imports TensorFlow with its module).
  def __init__(self):
    self.count, self.active = 0, False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del duration, kwargs
    if self.active and event == '/jax/core/compile/backend_compile_duration':
      self.count += 1

  def __enter__(self):
    self.active = True

  def __exit__(self, *exc):
    self.active = False


def make_model(dropout):
  return models.VisionTransformer(
      num_classes=10, hidden_size=32,
      patches=ml_collections.ConfigDict({'size': (8, 8)}),
      transformer=ml_collections.ConfigDict(dict(
          num_layers=1, mlp_dim=64, num_heads=2, dropout_rate=dropout,
          attention_dropout_rate=0.0)))


model = make_model(0.0)
params = jax.device_get(jax.jit(lambda: model.init(
    jax.random.PRNGKey(0), jnp.zeros([1, 32, 32, 3]), train=False))()['params'])
# The project's fine-tuning optimizer: clip 1.0, then SGD momentum 0.9 with a
# cosine schedule (float32 momentum, so that float rounding stays tiny).
tx, _ = optim.make_optimizer(ml_collections.ConfigDict(dict(
    optimizer='sgd_momentum', total_steps=STEPS, base_lr=0.1,
    decay_type='cosine', warmup_steps=0, linear_end=1e-5, grad_norm_clip=1.0,
    momentum=0.9, optim_dtype=None, weight_decay=0.0)))
data = np.random.RandomState(0)
batches = [{'image': data.uniform(-1, 1, (16, 32, 32, 3)).astype(np.float32),
            'label': np.eye(10, dtype=np.float32)[data.randint(0, 10, 16)]}
           for _ in range(STEPS)]
keys = [np.asarray(jax.random.PRNGKey(100 + s)) for s in range(STEPS)]
pmap_layout = lambda b: {k: v.reshape((8, 2) + v.shape[1:]) for k, v in b.items()}
flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(x) for p, x in
                     jax.tree_util.tree_leaves_with_path(tree)}
# One program for the optimizer's initial state, not one per eager op.
opt_init = lambda p: jax.device_get(jax.jit(tx.init)(p))
phase('set_up')


def run_pmap():
  # train.make_update_fn's step, softmax cross-entropy.
  update_fn = pmap_step.make_update_fn(
      loss_fn=objectives.classification_loss_fn(model.apply), accum_steps=1,
      tx=tx, trainable_mask=None, axis_name='batch')
  p, o = flax.jax_utils.replicate((params, opt_init(params)))
  losses = []
  for batch, key in zip(batches, keys):
    p, o, loss, _ = update_fn(p, o, pmap_layout(batch),
                              np.broadcast_to(key, (8, 2)))
    losses.append(float(np.asarray(loss)[0]))
  # Indexed in numpy: indexing the device arrays would compile programs.
  return losses, {k: v[0] for k, v in flat(p).items()}


def run_single_device():
  """A plain jitted step on one device: the reference for both."""
  @jax.jit
  def step(p, o, batch):
    def loss_fn(p):
      logits = model.apply({'params': p}, batch['image'], train=True)
      return objectives.softmax_xent(logits=logits, labels=batch['label'])
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, o = tx.update(grads, o, p)
    return jax.tree_util.tree_map(jnp.add, p, updates), o, loss
  p, o = jax.device_put((params, opt_init(params)), jax.devices()[0])
  losses = []
  for batch in batches:
    p, o, loss = step(p, o, batch)
    losses.append(float(loss))
  return losses, flat(p)


def run_sharded(mdl, mesh, accum_steps):
  ps = sharding.fsdp_shardings(params, mesh, min_size=MIN_SIZE)
  os_ = sharding.fsdp_shardings(jax.eval_shape(tx.init, params), mesh,
                                min_size=MIN_SIZE)
  p = sharding.shard_params(params, ps)
  o = sharding.shard_params(opt_init(params), os_)  # compiles nothing new
  update_fn = sharded_step.make_sharded_update_fn(
      loss_fn=objectives.classification_loss_fn(mdl.apply, 'softmax_xent'),
      tx=tx, mesh=mesh, param_shardings=ps,
      opt_shardings=os_, accum_steps=accum_steps)
  losses, rngs = [], []
  compiles = CompileCounter()
  for batch, key in zip(batches, keys):
    b = sharding.shard_batch(pmap_layout(batch), mesh)
    with compiles:
      p, o, loss, new_rng = update_fn(p, o, b, key)
    losses.append(float(loss))
    rngs.append(np.asarray(new_rng).tolist())
  return losses, p, o, compiles.count, rngs


def describe(x):
  return {'spec': [None if a is None else str(a) for a in x.sharding.spec],
          'devices': len(x.sharding.device_set),
          'shape': list(x.shape),
          'shard_shape': list(x.addressable_shards[0].data.shape),
          'replicated': bool(x.sharding.is_fully_replicated)}


def diff(a, b):
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def placement(x, mesh):
  """Where the shards of `x` are, in the mesh's [data, fsdp] grid."""
  by_device = {s.device: s for s in x.addressable_shards}
  grid = [[by_device[d] for d in row] for row in mesh.devices]
  return {
      'spec': [None if a is None else a if isinstance(a, str) else list(a)
               for a in x.sharding.spec],
      'shard_shape': list(grid[0][0].data.shape),
      'starts': [[[sl.start or 0 for sl in s.index] for s in row]
                 for row in grid],
      'rows_equal': all(np.array_equal(np.asarray(grid[0][j].data),
                                       np.asarray(row[j].data))
                        for row in grid for j in range(len(row)))}


def compare(losses, p):
  return {
      'losses': losses,
      'loss_vs_pmap': max(abs(a - b) for a, b in zip(losses, pmap_losses)),
      'params_vs_pmap': diff(flat(p), pmap_params),
      'loss_vs_single': max(abs(a - b) for a, b in zip(losses, ref_losses)),
      'params_vs_single': diff(flat(p), ref_params)}


out = {}
pmap_losses, pmap_params = run_pmap()
phase('pmap')
ref_losses, ref_params = run_single_device()
phase('single_device')
# The 1-D mesh, no accumulation.
losses, p, o, n_compiles, rngs = run_sharded(model, device_mesh.make_mesh(), 1)
fsdp_1d_params = flat(p)
out['accum1'] = dict(compare(losses, p), compiles=n_compiles, new_rngs=rngs,
                     params={k: v.tolist() for k, v in fsdp_1d_params.items()})
mlp = p['Transformer']['encoderblock_0']['MlpBlock_0']
mu = o[1][0].trace  # chain(clip, sgd): sgd = chain(trace, scale)
out['layout'] = {
    'kernel': describe(mlp['Dense_0']['kernel']),
    'bias': describe(mlp['Dense_0']['bias']),
    'posemb': describe(p['Transformer']['posembed_input']['pos_embedding']),
    'momentum_kernel': describe(
        mu['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_0']['kernel']),
    'momentum_bias': describe(
        mu['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_0']['bias']),
}
phase('fsdp_1d')
out['pmap_losses'] = pmap_losses
out['single_losses'] = ref_losses
out['keys'] = [k.tolist() for k in keys]
# Dropout: one key for the global batch, drawn shard by shard.
dropout_model = make_model(0.3)
out['dropout_8'] = run_sharded(dropout_model, device_mesh.make_mesh(), 1)[0]
out['dropout_1'] = run_sharded(dropout_model,
                               device_mesh.make_mesh(jax.devices()[:1]), 1)[0]
phase('dropout')
# The data x fsdp meshes: 2 x 4 (hybrid, with 2 accumulation steps: it is
# also the accumulation run), 8 x 1 (data parallel), 1 x 8.
for data, fsdp, accum in ((2, 4, 2), (8, 1, 1), (1, 8, 1)):
  mesh = device_mesh.make_data_fsdp_mesh(data, fsdp)
  losses, p, o, n_compiles, _ = run_sharded(model, mesh, accum)
  out[f'mesh{data}x{fsdp}'] = dict(
      compare(losses, p), accum_steps=accum,
      shape=[mesh.shape['data'], mesh.shape['fsdp']], compiles=n_compiles,
      params_vs_fsdp_1d=diff(flat(p), fsdp_1d_params),
      params_equal_fsdp_1d=all(np.array_equal(v, fsdp_1d_params[k])
                               for k, v in flat(p).items()),
      params={k: v.tolist() for k, v in flat(p).items()})
  if data == 2:
    mlp = p['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_0']
    mu = o[1][0].trace['Transformer']['encoderblock_0']['MlpBlock_0'][
        'Dense_0']
    image = sharding.shard_batch(pmap_layout(batches[0]), mesh)['image']
    out['layout2x4'] = {
        'kernel': placement(mlp['kernel'], mesh),
        'momentum_kernel': placement(mu['kernel'], mesh),
        'bias': placement(mlp['bias'], mesh),
        'image': placement(image, mesh)}
  phase(f'mesh{data}x{fsdp}')
out['cpu_seconds'] = cpu
print('RESULT ' + json.dumps(out))
'''


@pytest.fixture(scope='module')
def eight():
  """Runs the 8-device script once; its measurements as a dict."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = compile_settings.xla_flags(8)
  env['PYTHONPATH'] = os.pathsep.join([REPO, env.get('PYTHONPATH', '')])
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  # Each program is compiled once: writing them to the persistent cache
  # would only cost time.
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  result = subprocess.run(
      [sys.executable, '-c', _EIGHT_DEVICES % {
          'min_size': MIN_SIZE
      }],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=900)  # a loaded 2-core machine took over 300 s
  assert result.returncode == 0, result.stderr[-4000:]
  line, = [l for l in result.stdout.splitlines() if l.startswith('RESULT ')]
  out = json.loads(line[len('RESULT '):])
  print('8-device script, CPU seconds:', out['cpu_seconds'])  # with -s
  return out


# ------------------------------------------------------------ 8 devices


def test_large_leaves_sharded_small_replicated(eight):
  layout = eight['layout']
  # MlpBlock Dense_0 kernel (32, 64): the largest dim (64) is split.
  for name in ('kernel', 'momentum_kernel'):
    leaf = layout[name]
    assert leaf['shape'] == [32, 64], name
    assert leaf['spec'] == [None, 'data'], name
    assert leaf['devices'] == 8 and not leaf['replicated'], name
    assert leaf['shard_shape'] == [32, 64 // 8], name
  # Position embedding (1, 17, 32): 17 is not divisible by 8, 32 is.
  assert layout['posemb']['spec'] == [None, None, 'data']
  assert layout['posemb']['shard_shape'] == [1, 17, 4]
  # The bias (64 elements < MIN_SIZE) and its momentum: whole on every device.
  for name in ('bias', 'momentum_bias'):
    leaf = layout[name]
    assert leaf['replicated'] and leaf['devices'] == 8, name
    assert leaf['shard_shape'] == leaf['shape'] == [64], name


def test_sharded_equals_pmap(eight):
  run = eight['accum1']
  assert run['loss_vs_pmap'] < TOL, run
  assert run['params_vs_pmap'] < TOL, run['params_vs_pmap']
  # Two real steps: the loss moved (the model learned something).
  assert run['losses'][0] != run['losses'][-1]
  np.testing.assert_allclose(run['losses'], eight['pmap_losses'], atol=TOL)


def test_sharded_equals_single_device(eight):
  # mesh2x4 runs with 2 accumulation steps.
  for accum in ('accum1', 'mesh2x4'):
    run = eight[accum]
    assert run['loss_vs_single'] < TOL, (accum, run['loss_vs_single'])
    assert run['params_vs_single'] < TOL, (accum, run['params_vs_single'])
  np.testing.assert_allclose(
      eight['pmap_losses'], eight['single_losses'], atol=TOL)


def test_accumulation_equals_one_step(eight):
  # 2 accumulation steps on the 2 x 4 mesh, none on the 1-D mesh.
  one, two = eight['accum1'], eight['mesh2x4']
  assert two['accum_steps'] == 2
  np.testing.assert_allclose(two['losses'], one['losses'], atol=TOL)
  for name, value in one['params'].items():
    np.testing.assert_allclose(
        two['params'][name], value, atol=TOL, err_msg=name)
  assert two['params_vs_pmap'] < TOL


def test_compiles_once_and_rng_like_pmap(eight):
  # out_shardings pin the train state: step 2 reuses step 1's program.
  assert eight['accum1']['compiles'] == 1
  assert eight['mesh2x4']['compiles'] == 1  # with accumulation
  for key, new in zip(eight['keys'], eight['accum1']['new_rngs']):
    expected = np.asarray(jax.random.split(np.asarray(key, np.uint32))[1])
    assert new == expected.tolist()


def test_dropout_independent_of_device_count(eight):
  # One key for the global batch and partitionable threefry: the same
  # masks, so the same losses, on 8 devices and on 1.
  np.testing.assert_allclose(eight['dropout_8'], eight['dropout_1'], atol=TOL)
  # Dropout is really on: the losses differ from the dropout-free run (from
  # step 2; the zero-initialised head makes every first loss log(10)).
  assert abs(eight['dropout_8'][1] - eight['accum1']['losses'][1]) > 1e-3


def test_hybrid_2x4_mesh_splits_state_over_fsdp_and_batch_over_all(eight):
  layout = eight['layout2x4']
  # The (32, 64) kernel and its momentum: columns 16j..16j+15 on fsdp column
  # j, the same values in both data rows.
  for name in ('kernel', 'momentum_kernel'):
    leaf = layout[name]
    assert leaf['spec'] == [None, 'fsdp'], name
    assert leaf['shard_shape'] == [32, 64 // 4], name
    assert leaf['starts'] == [[[0, 16 * j] for j in range(4)]] * 2, name
    assert leaf['rows_equal'], name
  # The bias (below MIN_SIZE): whole on all 8 devices.
  bias = layout['bias']
  assert bias['shard_shape'] == [64] and bias['rows_equal']
  assert bias['starts'] == [[[0]] * 4] * 2
  # The batch of 16: 2 rows per device, row block 4i + j on mesh (i, j).
  image = layout['image']
  assert image['spec'] == [['data', 'fsdp']]
  assert image['shard_shape'] == [2, 32, 32, 3]
  assert image['starts'] == [
      [[2 * (4 * i + j), 0, 0, 0] for j in range(4)] for i in range(2)
  ]
  assert not image['rows_equal']


def test_data_fsdp_meshes_train_like_pmap_and_the_1d_mesh(eight):
  for name, shape in (('mesh2x4', [2, 4]), ('mesh8x1', [8,
                                                        1]), ('mesh1x8', [1,
                                                                          8])):
    run = eight[name]
    assert run['shape'] == shape, name
    assert run['compiles'] == 1, name
    assert run['params_vs_pmap'] < TOL, (name, run['params_vs_pmap'])
    assert run['params_vs_fsdp_1d'] < TOL, (name, run['params_vs_fsdp_1d'])
    np.testing.assert_allclose(
        run['losses'], eight['pmap_losses'], atol=TOL, err_msg=name)
  # 1 x 8 compiles to the 1-D mesh's program: the same parameters, bit for
  # bit.
  assert eight['mesh1x8']['params_equal_fsdp_1d']


# ------------------------------------------------------------ one device


@pytest.mark.parametrize(
    'shape, spec',
    [
        ((768, 3072), P(None, 'data')),  # the largest dim
        ((3072, 768), P('data')),
        ((768, 12, 64), P('data')),  # q/k/v kernel
        ((12, 64, 768), P(None, None, 'data')),
        ((1, 197, 768), P(None, None, 'data')),  # 197 not divisible: next one
        ((12, 768, 3072), P(None, None,
                            'data')),  # scanned: layer axis not split
        ((1001, 999), P()),  # no divisible dim: replicated
        ((3072,), P()),  # small: replicated
        ((), P()),
    ])
def test_partition_spec_rule(shape, spec):
  assert sharding.fsdp_partition_spec(shape, 8, min_size=2**16) == spec


def test_partition_spec_ties_and_one_shard():
  assert sharding.fsdp_partition_spec((512, 512), 8, min_size=1) == P('data')
  assert sharding.fsdp_partition_spec((512, 512), 1, min_size=1) == P()
  assert sharding.fsdp_partition_spec((4, 64), 8, min_size=1,
                                      axis_name='fsdp') == P(None, 'fsdp')


def test_single_device_mesh_replicates_and_round_trips():
  mesh = device_mesh.make_mesh()
  assert mesh.axis_names == ('data',) and mesh.size == jax.device_count()
  tree = {
      'w': np.arange(2**16, dtype=np.float32).reshape(256, 256),
      'b': np.ones(3, np.int32),
      'count': np.int32(7)
  }
  shardings = sharding.fsdp_shardings(tree, mesh)
  placed = sharding.shard_params(tree, shardings)
  for name, value in tree.items():
    assert placed[name].sharding == shardings[name]
    assert placed[name].dtype == np.asarray(value).dtype
    np.testing.assert_array_equal(np.asarray(placed[name]), value)
  # ShapeDtypeStructs give the same shardings as the arrays.
  shapes = jax.eval_shape(lambda t: t, tree)
  assert sharding.fsdp_shardings(shapes, mesh) == shardings


@pytest.mark.parametrize(
    'make_mesh', [device_mesh.make_mesh, device_mesh.make_data_fsdp_mesh])
def test_shard_batch_layouts(make_mesh):
  mesh = make_mesh()
  n = jax.local_device_count()
  image = np.arange(n * 2 * 4 * 4 * 3, dtype=np.float32).reshape(n, 2, 4, 4, 3)
  label = np.arange(n * 2 * 5, dtype=np.float32).reshape(n, 2, 5)
  out = sharding.shard_batch({'image': image, 'label': label}, mesh)
  assert out['image'].shape == (n * 2, 4, 4, 3)
  np.testing.assert_array_equal(
      np.asarray(out['image']), image.reshape(n * 2, 4, 4, 3))
  np.testing.assert_array_equal(
      np.asarray(out['label']), label.reshape(n * 2, 5))
  flat = sharding.shard_batch({'image': image[0]}, mesh)
  np.testing.assert_array_equal(np.asarray(flat['image']), image[0])


def test_mesh_shape_resolves_minus_one_and_rejects_what_does_not_fit():
  assert device_mesh.mesh_shape(2, -1, 8) == (2, 4)
  assert device_mesh.mesh_shape(-1, 1, 8) == (8, 1)
  assert device_mesh.mesh_shape(1, -1, 8) == (1, 8)
  assert device_mesh.mesh_shape(4, 2, 8) == (4, 2)
  for data, fsdp, words in ((2, 2, r'data=2 x fsdp=2 = 4 devices'),
                            (3, -1, r'data=3 does not divide the 8 devices; '
                             r'choose one of \[1, 2, 4, 8\]'), (-1, -1,
                                                                'both -1'),
                            (0, 8, 'data=0 is not a number of devices'),
                            (1, -2, 'fsdp=-2 is not a number of devices')):
    with pytest.raises(ValueError, match=words):
      device_mesh.mesh_shape(data, fsdp, 8)


class _FakeDevice:
  """What mesh_utils reads of a CPU device, for process layouts of tests."""
  platform = device_kind = 'cpu'

  def __init__(self, id_, process_index):
    self.id, self.process_index = id_, process_index


def _grid_processes(processes, local, data, fsdp):
  # Listed round-robin over processes: the grid must still group them.
  devices = [
      _FakeDevice(p * local + i, p)
      for i in range(local)
      for p in range(processes)
  ]
  grid = device_mesh.device_grid(data, fsdp, devices)
  assert grid.shape == (data, fsdp)
  assert sorted(d.id for d in grid.flat) == list(range(processes * local))
  return [[d.process_index for d in row] for row in grid]


def test_device_grid_keeps_each_process_together():
  # Whole data rows per process: the processes lie along data.
  assert _grid_processes(2, 4, 2, 4) == [[0] * 4, [1] * 4]
  assert _grid_processes(2, 4, 8, 1) == [[0]] * 4 + [[1]] * 4
  assert _grid_processes(4, 2, 4, 2) == [[p] * 2 for p in range(4)]
  # A data row spans whole processes.
  assert _grid_processes(2, 4, 1, 8) == [[0] * 4 + [1] * 4]
  assert _grid_processes(4, 2, 2, 4) == [[0, 0, 1, 1], [2, 2, 3, 3]]
  # Neither (3 devices per process, rows of 2): still contiguous row by row.
  assert _grid_processes(2, 3, 3, 2) == [[0, 0], [0, 1], [1, 1]]


def test_bad_input_errors():
  mesh = device_mesh.make_mesh()
  with pytest.raises(ValueError, match='pmap_layout'):
    sharding.shard_batch({'x': np.zeros((2, 3))}, mesh)
  with pytest.raises(ValueError, match='no axis .model'):
    sharding.fsdp_shardings({'w': np.zeros(3)}, mesh, axis_name='model')
  with pytest.raises(ValueError, match='no devices'):
    device_mesh.make_mesh([])
  with pytest.raises(ValueError, match='Unknown loss'):
    objectives.classification_loss_fn(None, 'l2')


def _linear_model(variables, images, train=False, rngs=None):
  """A linear classifier with the `model.apply` signature; compiles fast."""
  del train, rngs
  return images.reshape(images.shape[0], -1) @ variables['params']['w']


def test_batch_not_divisible_by_accum_steps():
  import optax  # pylint: disable=g-import-not-at-top
  params = {'w': np.zeros((4 * 4 * 3, 3), np.float32)}
  tx = optax.sgd(0.1)
  mesh = device_mesh.make_mesh()
  ps = sharding.fsdp_shardings(params, mesh)
  os_ = sharding.fsdp_shardings(jax.eval_shape(tx.init, params), mesh)
  update_fn = sharded_step.make_sharded_update_fn(
      loss_fn=objectives.classification_loss_fn(_linear_model, 'softmax_xent'),
      tx=tx,
      mesh=mesh,
      param_shardings=ps,
      opt_shardings=os_,
      accum_steps=3)
  batch = {
      'image': np.zeros((4 * jax.device_count(), 4, 4, 3), np.float32),
      'label': np.zeros((4 * jax.device_count(), 3), np.float32)
  }
  with pytest.raises(ValueError, match='accum_steps=3'):
    update_fn(
        sharding.shard_params(params, ps), tx.init(params), batch,
        jax.random.PRNGKey(0))


def test_eval_fn_counts_top1_hits_without_padding():
  rng = np.random.RandomState(1)
  params = {'w': rng.normal(size=(4 * 4 * 3, 5)).astype(np.float32)}
  n = 8 * jax.device_count()
  images = rng.normal(size=(n, 4, 4, 3)).astype(np.float32)
  labels = np.eye(5, dtype=np.float32)[rng.randint(0, 5, n)]
  labels[0] = 1.0  # multi-label: any class is a hit
  mask = (np.arange(n) < n - 3).astype(np.float32)  # 3 padding examples
  mesh = device_mesh.make_mesh()
  ps = sharding.fsdp_shardings(params, mesh)
  eval_fn = sharded_step.make_sharded_eval_fn(
      apply_fn=_linear_model, mesh=mesh, param_shardings=ps)
  correct, count = eval_fn(
      sharding.shard_params(params, ps), {
          'image': images,
          'label': labels,
          'mask': mask
      })
  top1 = np.argmax(images.reshape(n, -1) @ params['w'], axis=-1)
  hits = labels[np.arange(n), top1] * mask
  assert float(count) == n - 3
  assert float(correct) == hits.sum()
  assert 0 < hits.sum() < n - 3

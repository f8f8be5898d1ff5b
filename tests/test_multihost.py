"""Two processes x 2 devices train exactly like one process x 4 devices.

Each process runs `jax.distributed.initialize` on 127.0.0.1 with its own
XLA_FLAGS device count and feeds its own share of the global batch, as the
input pipeline splits it per process. The one-process reference feeds the
union of both shares (in the same device order) to 4 devices.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

from test_train import REPO

STEPS = 4

# Shared by both sides: the loss trajectory of make_update_fn on the real
# pipeline, with dropout on (per-device keys come from the global device
# index, so they agree too).
_COMMON = """
import json, sys
import flax.jax_utils, jax, numpy as np
from test_train import tiny_config
from vit_jax import input_pipeline, optim, train

STEPS = %d
config = tiny_config(batch=16, batch_eval=200, total_steps=STEPS,
                     warmup_steps=0,
                     **{'model.transformer.dropout_rate': 0.1})

def trajectory(next_batch):
  model = train.create_model(config, 10)
  params = train.init_params(model, config)
  tx, _ = optim.make_optimizer(config)
  update_fn = train.make_update_fn(apply_fn=model.apply, accum_steps=1, tx=tx)
  params_repl, opt_repl = flax.jax_utils.replicate(
      (params, jax.device_get(tx.init(params))), axis_name=train.AXIS)
  keys = train._StepKeys(config.seed)
  losses = []
  for step in range(1, STEPS + 1):
    rng = np.broadcast_to(keys(step), (jax.local_device_count(), 2))
    params_repl, opt_repl, loss, _ = update_fn(params_repl, opt_repl,
                                               next_batch(), rng)
    losses.append(float(train._first(loss)))
  return losses
""" % STEPS

_WORKER = _COMMON + """
port, pid, out, workdir = sys.argv[1], int(sys.argv[2]), *sys.argv[3:5]
jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                           num_processes=2, process_id=pid)
assert jax.process_count() == 2 and jax.device_count() == 4
ds_train, _ = input_pipeline.get_datasets(config)
it = ds_train.as_numpy_iterator()
losses = trajectory(lambda: {k: v for k, v in next(it).items()
                             if k != 'mask'})
# The real loop too: eval counts and checkpoints across processes.
summary = train.train_and_evaluate(config, workdir)
json.dump({'losses': losses, 'accuracy': summary['accuracy'],
           'step': summary['step'], 'compiles':
           summary['train_step_compilations']}, open(out, 'w'))
"""

_REFERENCE = _COMMON + """
assert jax.process_count() == 1 and jax.device_count() == 4
its = [input_pipeline.get_datasets(config, process_index=i, process_count=2)[0]
       .as_numpy_iterator() for i in range(2)]

def union():
  # Process i's [4, 2, ...] share -> its 8 examples; both -> [4 devices, 4].
  parts = [next(it) for it in its]
  return {k: np.concatenate([p[k].reshape(8, *p[k].shape[2:]) for p in parts]
                            ).reshape(4, 4, *parts[0][k].shape[2:])
          for k in ('image', 'label')}

json.dump({'losses': trajectory(union)}, open(sys.argv[1], 'w'))
"""


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['PYTHONPATH'] = os.pathsep.join([REPO, os.path.join(REPO, 'tests')])
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  return env


def test_two_processes_match_one_process(tmp_path):
  port = _free_port()
  workdir = str(tmp_path / 'work')
  outs = [str(tmp_path / f'p{i}.json') for i in range(2)]
  workers = [subprocess.Popen(
      [sys.executable, '-c', textwrap.dedent(_WORKER), str(port), str(i),
       outs[i], workdir], cwd=REPO, env=_env(2), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  ref_out = str(tmp_path / 'ref.json')
  reference = subprocess.run(
      [sys.executable, '-c', textwrap.dedent(_REFERENCE), ref_out], cwd=REPO,
      env=_env(4), capture_output=True, text=True, timeout=600)
  logs = [w.communicate(timeout=600)[0] for w in workers]
  for w, log in zip(workers, logs):
    assert w.returncode == 0, log[-4000:]
  assert reference.returncode == 0, reference.stderr[-4000:]

  results = [json.load(open(o)) for o in outs]
  want = json.load(open(ref_out))['losses']
  # The head starts at zero: step 1's loss is log(10) whatever the batch.
  assert abs(want[0] - np.log(10)) < 1e-5
  assert len(want) == STEPS and len(set(want)) == STEPS  # it trains
  for r in results:
    np.testing.assert_allclose(r['losses'], want, rtol=1e-5)
    assert r['step'] == STEPS and r['compiles'] == 1
  # Evaluation sums correct answers over both processes' shards.
  assert results[0]['accuracy'] == results[1]['accuracy']
  # Written once, by process 0; one checkpoint for the pair.
  summary = json.load(open(os.path.join(workdir, 'summary.json')))
  assert summary['processes'] == 2 and summary['devices'] == 4
  assert summary['accuracy'] == results[0]['accuracy']
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == [str(STEPS)]

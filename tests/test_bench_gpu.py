"""bench/gpu.py: its batch search, and its run at tiny sizes on CPU in an
environment where only a GPU image's packages import.

The GPU image: Python with jax, flax, optax, orbax-checkpoint, numpy, scipy,
ml_collections, torch and timm (and what they require), this package
installed with --no-deps; TensorFlow and the input pipeline's other packages
are absent. tests/gpu_image/sitecustomize.py makes any other import fail.
"""

import importlib.metadata
import os
import re
import subprocess
import sys

from packaging import requirements
import pytest

from bench import gpu
from bench import throughput_metrics
from vit_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_IMAGE = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy',
             'scipy', 'ml-collections', 'torch', 'timm')
# Required by setup.py for the input pipeline, the train loop's logs and the
# main job, and never needed by the model, checkpoints or the benchmark
# (PIL and tqdm come with timm's torchvision and huggingface_hub).
NOT_NEEDED = ('tensorflow', 'tensorflow_datasets', 'clu', 'tensorboard',
              'tf_keras', 'keras', 'mlxtend', 'matplotlib', 'PIL', 'tqdm',
              'sklearn', 'pandas')


def _canonical(name):
  return re.sub(r'[-_.]+', '-', name).lower()


def gpu_image_modules():
  """Top-level modules of GPU_IMAGE, its requirements and this checkout."""
  todo, dists = [_canonical(n) for n in GPU_IMAGE], set()
  while todo:
    name = todo.pop()
    if name in dists:
      continue
    try:
      requires = importlib.metadata.distribution(name).requires or []
    except importlib.metadata.PackageNotFoundError:
      continue
    dists.add(name)
    for line in requires:
      req = requirements.Requirement(line)
      if req.marker is None or req.marker.evaluate({'extra': ''}):
        todo.append(_canonical(req.name))
  modules = {
      m for m, owners in importlib.metadata.packages_distributions().items()
      if any(_canonical(d) in dists for d in owners)
  }
  return (modules - set(NOT_NEEDED)) | {'vit_jax', 'bench', 'configs'}


# A checkpoint round trip, then `python -m bench.gpu --tiny`, in one process.
IN_GPU_IMAGE = f"""
import importlib.util, runpy, sys, tempfile
hidden = [m for m in {NOT_NEEDED!r} if importlib.util.find_spec(m) is None]
print('not importable:', ', '.join(hidden))
import jax, numpy as np
from vit_jax import checkpoint, models
model = models.get_model('testing', num_classes=10)
params = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
    np.zeros((1, 32, 32, 3)))['params']
path = tempfile.mkdtemp() + '/testing.npz'
checkpoint.save(params, path)
same = jax.tree_util.tree_map(np.array_equal, checkpoint.load(path),
                              jax.device_get(params))
assert all(jax.tree_util.tree_leaves(same)), same
print('checkpoint round trip: equal')
sys.argv = ['bench/gpu.py', '--tiny']
runpy.run_module('bench.gpu', run_name='__main__', alter_sys=True)
"""


@pytest.fixture(scope='module')
def tiny_run():
  env = dict(
      os.environ,
      VIT_JAX_ALLOWED_IMPORTS=','.join(sorted(gpu_image_modules())),
      PYTHONPATH=os.pathsep.join(
          [os.path.join(REPO, 'tests', 'gpu_image'), REPO]))
  run = subprocess.run([sys.executable, '-c', IN_GPU_IMAGE],
                       cwd=REPO,
                       env=env,
                       capture_output=True,
                       text=True,
                       timeout=300)
  assert run.returncode == 0, run.stdout + run.stderr
  return run


def test_model_checkpoint_and_benchmark_run_without_tensorflow(tiny_run):
  assert ('not importable: ' + ', '.join(NOT_NEEDED)) in tiny_run.stdout
  assert 'checkpoint round trip: equal' in tiny_run.stdout


def test_tiny_run_prints_the_table(tiny_run):
  out = tiny_run.stdout
  table = out[out.index('\ncommand: python -m bench.gpu --tiny'):]
  assert 'device: cpu' in table
  rows = {
      tuple(c.strip() for c in line.split('|')[1:4]): [
          c.strip() for c in line.split('|')[4:-1]
      ] for line in table.splitlines() if line.startswith('| testing')
  }
  assert set(rows) == {('testing', 'bfloat16', 'reference'),
                       ('testing', 'float32', 'reference'),
                       ('testing', 'bfloat16', 'xla'),
                       ('testing', 'bfloat16', 'cudnn')}
  # One batch per dtype: --tiny's --max-batch is its --start-batch.
  assert re.findall(r'batch +(\d+): peak', out) == ['2', '2']
  assert 'cudnn: skipped, the cuDNN kernel runs on NVIDIA GPUs only' in out
  assert rows['testing', 'bfloat16', 'cudnn'] == ['-'] * 7
  assert rows['testing', 'bfloat16', 'xla'][0] == '2'
  # MFU: images/s x the model's FLOPs over this run's matmul peak.
  peak = {
      d: float(v) * (1e3 if unit == 'T' else 1) for d, v, unit in re.findall(
          r'(float32|bf16 in / f32 accumulate) ([\d.]+) (G|T)FLOP/s', table)
  }
  fwd = throughput_metrics.vit_forward_flops(
      models.get_model('testing', num_classes=10), 32)
  for dtype, peak_name in (('float32', 'float32'),
                           ('bfloat16', 'bf16 in / f32 accumulate')):
    batch, train, train_mfu, infer, infer_mfu = rows['testing', dtype,
                                                     'reference'][:5]
    assert batch == '2'
    for ips, flops, printed in ((train, 3 * fwd, train_mfu), (infer, fwd,
                                                              infer_mfu)):
      expected = 100 * float(ips) * flops / (peak[peak_name] * 1e9)
      assert abs(float(printed.rstrip('%')) - expected) <= 0.6, (dtype, printed,
                                                                 expected)


def _canned_search(monkeypatch, peak_of_batch, **kw):
  """search_batch with `peak_of_batch` for XLA's peak (nothing compiles)."""
  monkeypatch.setattr(
      gpu, '_compile', lambda name, dtype, args, batch:
      (f'compiled {batch}', 1.0, peak_of_batch(batch)))
  args = gpu.parse_args(['--start-batch', '32', '--max-batch', '1024'])
  return [
      f[0] for f in gpu.search_batch(
          'ViT-B_16', 'bfloat16', args, left=lambda: 100., **kw)
  ]


def test_search_jumps_to_the_largest_doubling_that_fits(monkeypatch, capsys):
  affine = lambda batch: 100 + 10 * batch
  assert _canned_search(monkeypatch, affine, limit=affine(300)) == [32, 64, 256]
  out = capsys.readouterr().out
  assert re.findall(r'batch +(\d+): peak', out) == ['32', '64', '256']
  assert 'batch   512: predicted peak' in out and 'does not fit' in out
  # No limit (a CPU): doubling up to --max-batch.
  assert _canned_search(
      monkeypatch, affine, limit=None) == [32, 64, 128, 256, 512, 1024]


def test_search_halves_when_the_prediction_was_wrong(monkeypatch, capsys):
  jump = lambda batch: 10 * batch + (5000 if batch > 64 else 0)
  assert _canned_search(monkeypatch, jump, limit=3100) == [32, 64]
  tried = re.findall(r'batch +(\d+): peak .*', capsys.readouterr().out)
  assert tried == ['32', '64', '256', '128']
  # Even the first batch too large: halved until one fits.
  assert _canned_search(monkeypatch, jump, limit=200) == [16]


def test_a_batch_out_of_memory_when_run_falls_back(monkeypatch):

  def seconds(call, repeats):
    if call() == 8:
      raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating')
    return 0.5

  monkeypatch.setattr(gpu, '_train_call', lambda c, p, batch, a: lambda: batch)
  monkeypatch.setattr(gpu, 'init_params', lambda *_: 'params')
  monkeypatch.setattr(gpu.metrics, 'median_seconds', seconds)
  args = gpu.parse_args(['--tiny'])
  fits = [(4, 'c4', 1., 40), (8, 'c8', 2., 80)]
  row = gpu.time_train('testing', 'float32', args, fits)
  assert (row['batch'], row['train'], row['train_peak']) == (4, 8., 40)
  monkeypatch.setattr(gpu.metrics, 'median_seconds', lambda *_: 1 / 0)
  with pytest.raises(ZeroDivisionError):  # Other errors are not hidden.
    gpu.time_train('testing', 'float32', args, fits)


def test_unknown_dtype_or_attention_fails():
  for argv in (['--dtypes', 'float16'], ['--attention',
                                         'flash'], ['--models', 'ViT-X_16']):
    with pytest.raises(SystemExit):
      gpu.parse_args(argv)

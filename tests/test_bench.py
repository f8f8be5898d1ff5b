"""bench/throughput.py runs: the training-step rows, full and head-only.

On the zoo's 'testing' model (1 block, hidden 10) at 32x32, batch 2, one
timed call: only that the measurements run and report what they should, not
how fast. bench/memory_scaling.py: the per-device bytes of the sharded step
on two devices (last test).
"""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import ceiling
from bench import throughput
from bench import throughput_metrics
from bench import throughput_original
from bench import throughput_steps
import compile_settings
import preloaded
import vit_jax
from vit_jax import models

ARGV = [
    '--models', 'testing', '--dtypes', 'float32', '--batch', '2',
    '--image-size', '32', '--num-classes', '10', '--repeats', '1'
]
FIELDS = ('images_per_s', 'compile_s', 'peak_bytes', 'flops', 'xla_flops')


def _check_row(row):
  for field in FIELDS:
    assert row[field] is not None and row[field] > 0, (field, row)


def test_frozen_rows():
  args = throughput.parse_args(ARGV + ['--what', 'frozen'])
  rows = throughput_steps.measure_frozen('testing', 'float32', args)
  assert set(rows) == {'all', 'head'}
  for row in rows.values():
    _check_row(row)
  full, head = rows['all'], rows['head']
  assert full['trainable'] == full['params'] == head['params']
  # head/kernel [10, 10] and head/bias [10].
  assert head['trainable'] == 110
  # No backbone gradients: forward + the head's weight gradient only.
  assert head['flops'] < full['flops'] / 2
  assert head['xla_flops'] < full['xla_flops'] / 2


def test_main_runs_frozen_section_alone(capsys, monkeypatch):
  """The section's tables, with canned rows (the measuring is tested above)."""
  row = lambda ips, trained: dict(
      images_per_s=ips,
      compile_s=1.,
      peak_bytes=2**20,
      flops=1e6,
      xla_flops=1e6,
      trainable=trained,
      params=1000)
  monkeypatch.setattr(throughput_steps, 'measure_frozen', lambda *_: {
      'all': row(10., 1000),
      'head': row(25., 110)
  })
  throughput.main(ARGV + ['--what', 'frozen', '--dtypes', 'float32,bfloat16'])
  out = capsys.readouterr().out
  for step in ('train (all)', 'train (head only)'):
    rows = re.findall(rf'\| +{re.escape(step)} \| testing \|', out)
    assert len(rows) == 2, out  # float32, bfloat16.
  assert 'x (head/all)' in out
  assert len(re.findall(r'\| +2\.50 \|', out)) == 2  # 25 / 10 img/s.
  # Only the frozen section ran.
  for other in ('## Matmul peak', '## Inference', '## Training step',
                '## Against the original', 'compile time, scan vs loop'):
    assert other not in out


def test_unknown_section_fails():
  with pytest.raises(SystemExit):
    throughput.parse_args(ARGV + ['--what', 'head'])


# ---- The same-run comparison with the original (`--original`).


@pytest.fixture(scope='module')
def stand_in_clone(tmp_path_factory):
  """A directory laid out like a clone of google-research/vision_transformer.

  Its `vit_jax` is a copy of ours (same API and parameter names as the
  original's): what is tested is the side-by-side import and the timing,
  not the original's code, which this repository does not ship.
  """
  root = tmp_path_factory.mktemp('clone')
  shutil.copytree(
      os.path.dirname(models.__file__),
      root / 'vit_jax',
      ignore=shutil.ignore_patterns('__pycache__'))
  return str(root)


def test_original_is_imported_beside_ours(stand_in_clone):
  ours = sys.modules['vit_jax.models_vit']
  module = throughput_original.load_original(stand_in_clone)
  assert module.__file__.startswith(stand_in_clone + os.sep)
  assert module is not ours
  # Ours is back in place for everything imported after.
  assert sys.modules['vit_jax.models_vit'] is ours
  assert sys.modules['vit_jax'].__file__ == vit_jax.__file__


# Training with our blocks scanned: the original's training step, on the
# parameters converted to its per-layer names (the unscanned training step
# is the same call without the conversion).
@pytest.mark.parametrize('what,extra', [('infer', []), ('train', ['--scan'])])
def test_original_is_timed_on_the_same_parameters(stand_in_clone, what, extra):
  args = throughput.parse_args(ARGV + extra +
                               ['--what', what, '--original', stand_in_clone])
  rows = throughput_steps.measure(
      what, 'testing', args, throughput_original.load_original(stand_in_clone))
  assert set(rows) == {'float32', 'original'}
  for row in rows.values():
    _check_row(row)
  assert rows['original']['flops'] == rows['float32']['flops']


def test_original_must_be_a_clone(tmp_path):
  with pytest.raises(SystemExit, match='google-research/vision_transformer'):
    throughput_original.load_original(str(tmp_path))


def test_original_with_other_parameters_or_logits_is_refused(stand_in_clone):
  module = throughput_original.load_original(stand_in_clone)
  ours = models.get_model('testing', num_classes=10)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  params = jax.eval_shape(
      lambda: ours.init(jax.random.key(0), images, train=False))['params']
  params = jax.tree_util.tree_map(  # Every leaf random: a head not zero.
      lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), params)
  assert throughput_original.check_same_function(
      throughput_original.original_model(module, ours), ours, params,
      images) < 1e-5
  with pytest.raises(SystemExit, match='parameter tree differs'):
    throughput_original.check_same_function(  # No class token: no `cls`.
        throughput_original.original_model(module,
                                           ours.clone(classifier='gap')), ours,
        params, images)
  with pytest.raises(SystemExit, match='logits differ'):
    throughput_original.check_same_function(  # Same tree, another function.
        ours.clone(layernorm_epsilon=0.5), ours, params, images)


def test_targets_are_judged_against_the_original_of_the_run(
    capsys, monkeypatch):
  """x original and 'met' from canned rows (the measuring is tested above)."""
  row = lambda ips: dict(
      images_per_s=ips,
      compile_s=1.,
      peak_bytes=2**20,
      flops=1e9,
      xla_flops=1e9)
  monkeypatch.setattr(
      throughput_steps, 'measure', lambda *_: {
          'float32': row(6.6),
          'bfloat16': row(9.0),
          'original': row(5.0)
      })
  throughput.main(['--models', 'ViT-S_16', '--what', 'train', '--repeats', '1'])
  out = capsys.readouterr().out
  table = out[out.index('## Against the original'):].split('\n\n')[0]
  cells = [[c.strip()
            for c in line.strip('|').split('|')]
           for line in table.splitlines()[3:]
           if line.startswith('|')]
  # step, model, dtype, img/s, original, x original, target, met.
  assert [c[:8] for c in cells] == [
      ['train', 'ViT-S_16', 'float32', '6.6', '5.0', '1.32', '>= 1.3', 'yes'],
      ['train', 'ViT-S_16', 'bfloat16', '9.0', '5.0', '1.80', '>= 2', 'NO'],
  ], table


def test_without_the_original_no_ratio_is_printed(capsys, monkeypatch):
  """Only what the run measured is compared: no original, no ratio."""
  row = lambda ips: dict(
      images_per_s=ips,
      compile_s=1.,
      peak_bytes=2**20,
      flops=1e9,
      xla_flops=1e9)
  monkeypatch.setattr(throughput_steps, 'measure', lambda *_: {
      'float32': row(6.6),
      'bfloat16': row(9.0)
  })
  monkeypatch.setattr(throughput_metrics, 'matmul_gflops', lambda *_: 100.)
  throughput.main(
      ['--models', 'ViT-S_16', '--what', 'peak,train', '--repeats', '1'])
  out = capsys.readouterr().out
  peak = out[out.index('## Matmul peak'):].split('\n\n')[0]
  header = [c.strip() for c in peak.splitlines()[1].strip('|').split('|')]
  assert header == ['matmul', 'GFLOP/s'], peak
  table = out[out.index('## Against the original'):].split('\n\n')[0]
  cells = [[c.strip()
            for c in line.strip('|').split('|')]
           for line in table.splitlines()[3:]
           if line.startswith('|')]
  # step, model, dtype, img/s, original, x original, target, met.
  assert [c[:8] for c in cells] == [
      ['train', 'ViT-S_16', 'float32', '6.6', '-', '-', '>= 1.3', '-'],
      ['train', 'ViT-S_16', 'bfloat16', '9.0', '-', '-', '>= 2', '-'],
  ], table
  assert 'The original was not measured in this run' in out


def test_timm_without_timm_says_how_to_get_it(monkeypatch):
  monkeypatch.setitem(sys.modules, 'timm', None)  # `import timm` fails.
  args = throughput.parse_args(ARGV + ['--timm'])
  with pytest.raises(SystemExit, match='pip install torch timm'):
    throughput_original.timm_inference('ViT-S_16', args)


# ---- The matmul ceiling (`bench.ceiling`, `--what ceiling`).


def _abstract_params(model, images):
  """The parameters' shapes: the matmuls are counted from a traced jaxpr,
  and `dots_only` draws operands of its own."""
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), images[:1], train=False))['params']


def _testing_step(scan=False):
  model = models.get_model('testing', num_classes=10, scan=scan)
  images, labels = throughput_steps.batch_arrays(2, 32, 10)
  params = _abstract_params(model, images)
  tx = throughput_steps.make_optimizer()
  step = throughput_steps.make_train_step(model, tx)
  return model, step, (params, jax.eval_shape(tx.init, params), images, labels,
                       jax.random.key(1))


def test_ceiling_counts_the_forward_matmuls_exactly():
  model, _, (params, _, images, _, _) = _testing_step()
  ops = ceiling.matmul_ops(
      lambda p, x: model.apply({'params': p}, x, train=False), params, images)
  # Patch embedding, q, k, v, q k^T, softmax(.) v, out, MLP x2, head.
  assert [op.name for op in ops].count('conv_general_dilated') == 1
  assert len(ops) == 10
  assert sum(op.flops for op in ops) == (
      2 * throughput_metrics.vit_forward_flops(model, 32))


def test_ceiling_counts_the_backward_and_each_scanned_layer():
  model, step, args = _testing_step()
  ops = ceiling.matmul_ops(step, *args)
  conv = [op for op in ops if op.name == 'conv_general_dilated']
  # Each matmul gives two in the backward pass, but the images need no
  # gradient: the patch embedding's backward is its kernel gradient alone.
  assert len(ops) == 3 * 10 - 1 and len(conv) == 2
  forward = 2 * throughput_metrics.vit_forward_flops(model, 32)
  assert sum(op.flops for op in ops) == 3 * forward - conv[0].flops

  layers = dict(
      models.MODEL_CONFIGS['testing'].transformer.to_dict(), num_layers=3)
  deep = lambda scan: models.get_model(
      'testing', num_classes=10, scan=scan, transformer=layers)
  counted = {}
  for scan in (False, True):
    m = deep(scan)
    images = args[2]
    params = _abstract_params(m, images)
    counted[scan] = ceiling.matmul_ops(
        lambda p, x, m=m: m.apply({'params': p}, x, train=False),
        params,
        images)
  assert len(counted[True]) == len(counted[False]) == 1 + 3 * 8 + 1
  assert (sum(op.flops for op in counted[True]) == sum(
      op.flops for op in counted[False]))


def test_dots_only_computes_every_product_at_its_shape():
  _, step, args = _testing_step()
  ops = ceiling.matmul_ops(step, *args)
  outs = jax.block_until_ready(ceiling.dots_only(ops)())
  assert [o.shape for o in outs] == [op.out_shape for op in ops]
  assert all(
      bool(jnp.all(jnp.isfinite(o))) and float(jnp.abs(o).max()) > 0
      for o in outs)
  with pytest.raises(ValueError, match='no matmuls'):
    ceiling.dots_only([])


def test_ceiling_refuses_data_dependent_loops():

  def loop(x):
    return jax.lax.while_loop(lambda c: c[1] < 3, lambda c:
                              (c[0] @ c[0], c[1] + 1), (x, 0))[0]

  with pytest.raises(NotImplementedError, match="'while'"):
    ceiling.matmul_ops(loop, jnp.ones((4, 4)))


@pytest.mark.parametrize('what', ['infer', 'train'])
def test_measure_times_the_ceiling_beside_the_call(what):
  args = throughput.parse_args(ARGV + ['--what', f'{what},ceiling'])
  row = throughput_steps.measure(what, 'testing', args)['float32']
  _check_row(row)
  assert row['ceiling_images_per_s'] > 0
  model = models.get_model('testing', num_classes=10)
  forward = throughput_metrics.vit_forward_flops(model, 32)
  if what == 'infer':
    assert row['matmul_flops'] == row['flops'] == forward
  else:
    assert forward * 2 < row['matmul_flops'] < row['flops'] == 3 * forward


def test_ceiling_needs_infer_or_train():
  with pytest.raises(SystemExit):
    throughput.parse_args(ARGV + ['--what', 'ceiling'])


def test_ceiling_table_against_the_original_of_the_run(capsys, monkeypatch):
  """% of ceiling and ceiling x original from canned rows."""
  row = lambda ips, top=None: dict(
      images_per_s=ips,
      compile_s=1.,
      peak_bytes=2**20,
      flops=1e9,
      xla_flops=1e9,
      **({}
         if top is None else dict(ceiling_images_per_s=top, matmul_flops=2e9)))
  monkeypatch.setattr(
      throughput_steps, 'measure', lambda *_: {
          'float32': row(5.0, top=6.0),
          'bfloat16': row(7.5, top=12.5),
          'original': row(5.0)
      })
  throughput.main(
      ['--models', 'ViT-S_16', '--what', 'train,ceiling', '--repeats', '1'])
  out = capsys.readouterr().out
  table = out[out.index('## Matmul ceiling'):].split('\n\n')[0]
  cells = [[c.strip()
            for c in line.strip('|').split('|')]
           for line in table.splitlines()[3:]
           if line.startswith('|')]
  # img/s, alone, % of ceiling, GFLOP/img, GFLOP/s, % of peak (no peak
  # section: '-'), ceiling x original, target.
  assert [c[3:] for c in cells] == [
      ['5.0', '6.0', '83', '2.00', '12', '-', '1.20', '>= 1.3'],
      ['7.5', '12.5', '60', '2.00', '25', '-', '2.50', '>= 2'],
  ], table


def test_matmuls_by_shape_group_and_time_each_kind_once():
  _, step, args = _testing_step()
  ops = ceiling.matmul_ops(step, *args)
  calls = []

  def fake_time(call):  # Runs the call; 'takes' 1 ms per op it computes.
    calls.append(len(jax.block_until_ready(call())))
    return 1e-3 * calls[-1]

  timings = ceiling.by_shape(ops, fake_time)
  assert calls == [1] * len(timings)  # Every distinct op alone, once.
  assert sum(t.count for t in timings) == len(ops)
  assert len(timings) < len(ops)  # e.g. q, k and v share one shape.
  counts = [t.count for t in timings]
  assert counts == sorted(counts, reverse=True)  # Equal times: by count.
  qkv = timings[0]
  assert qkv.op.name == 'dot_general' and qkv.count >= 3
  assert qkv.gflops_per_s == pytest.approx(qkv.op.flops / 1e-3 / 1e9)
  # q, k, v: [batch, tokens, hidden] x [hidden, heads, head dim].
  assert qkv.describe() == ('dot_general float32[2,5,10] x float32[10,2,5] '
                            '-> float32, contract (2,)x(0,)')


def test_ceiling_too_big_for_the_device_is_skipped_with_a_reason(
    capsys, monkeypatch):
  ops = ceiling.matmul_ops(lambda a, b: a @ b, jnp.ones((4, 8)),
                           jnp.ones((8, 16)))
  assert ceiling.bytes_needed(ops) == (4 * 8 + 8 * 16 + 4 * 16) * 4
  assert ceiling.memory_budget_bytes() > 2**20
  monkeypatch.setattr(ceiling, 'memory_budget_bytes', lambda: 1000)
  args = throughput.parse_args(ARGV + ['--what', 'train,ceiling'])
  row = throughput_steps.measure('train', 'testing', args)['float32']
  _check_row(row)  # The step itself is still measured.
  assert 'ceiling_images_per_s' not in row
  assert 'matmul ceiling skipped' in capsys.readouterr().out


# ---- bench/memory_scaling.py: per-device memory of the sharded step.

_MEMORY_ROWS = r'''
import json
import jax
from bench import memory_scaling
assert jax.device_count() == 2, jax.devices()
args = memory_scaling.parse_args(
    ['--image-size', '32', '--num-classes', '10', '--min-shard-size', '64'])
config = memory_scaling.make_config('testing', 2, (1, 2), args)
_, (params, _, _, _) = memory_scaling.abstract_step(config, 10)
shapes = [list(x.shape) for x in jax.tree_util.tree_leaves(params)]
rows = {f'{d}x{f}': memory_scaling.measure('testing', 2, (d, f), args)
        for d, f in ((2, 1), (1, 2))}
print('JSON' + json.dumps({'shapes': shapes, 'rows': rows}))
'''


def test_memory_scaling_splits_the_state_over_fsdp_only():
  """The 'testing' model on 2 devices: 2 x 1 holds all of the train state
  on each device, 1 x 2 half of every leaf the FSDP rule splits."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(
      os.environ,
      XLA_FLAGS=compile_settings.xla_flags(2),
      PYTHONPATH=os.pathsep.join([repo, os.environ.get('PYTHONPATH', '')]))
  out = subprocess.run(
      preloaded.command(env, '-c', _MEMORY_ROWS),
      env=env,
      cwd=repo,
      capture_output=True,
      text=True,
      check=True)
  found = json.loads(out.stdout.split('JSON', 1)[1])
  data, fsdp = found['rows']['2x1'], found['rows']['1x2']
  total = data['params_total']
  # float32 leaves: one of >= 64 elements with an even dimension is halved.
  split = sum(4 * int(np.prod(s))
              for s in found['shapes']
              if np.prod(s) >= 64 and any(n % 2 == 0 for n in s))
  assert 0 < split < total
  assert data['params'] == total
  assert fsdp['params'] == total - split // 2
  # AdamW: two float32 moments per parameter, split as the parameters are,
  # and two int32 step counts (Adam's and the learning-rate schedule's).
  assert data['opt_total'] == data['opt'] == 2 * total + 8
  for row in (data, fsdp):
    assert row['opt'] == 2 * row['params'] + 8
    assert row['args'] >= row['params'] + row['opt']
    assert row['temp'] > 0
    assert row['peak'] >= row['args']


def test_main_job_report_speed_columns_and_baseline_ratio():
  from bench import main_job  # pylint: disable=g-import-not-at-top
  rows = [
      dict(
          seed=0,
          accuracy=0.987,
          train_s=80.,
          wall_s=90.,
          steps=2000,
          images_per_s=6000.,
          input_wait_s=4.,
          train_flops_per_image=1e7),
      dict(
          seed=1,
          accuracy=0.983,
          train_s=100.,
          wall_s=110.,
          steps=2000,
          images_per_s=5000.,
          input_wait_s=0.,
          train_flops_per_image=1e7)
  ]
  baseline = dict(
      seed=0,
      accuracy=0.986,
      train_s=190.,
      images_per_s=2500.,
      checkout='/tmp/before')
  text = main_job.report(rows, 'cmd', peak=120., baseline=baseline)
  seed0 = next(l for l in text.splitlines() if l.startswith('   0  '))
  # 1e7 FLOPs x 6000 img/s = 60 GFLOP/s = 50% of 120; 4 of 80 s waiting.
  assert seed0.split()[-4:] == ['6,000', '60.0', '50%', '5.0%']
  assert 'mean 0.9850' in text and 'range 0.9830-0.9870' in text
  assert 'every seed >= 0.982 (met)' in text
  assert 'training <= 90 s on Zen 4 (NOT met' in text  # the worst is 100 s
  assert 'trains 2.38x faster' in text  # 190 / 80
  assert "at most half the baseline's time: NOT met" in text  # 100 > 95

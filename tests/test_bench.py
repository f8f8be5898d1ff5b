"""bench/throughput.py runs: the training-step rows, full and head-only.

On the zoo's 'testing' model (1 block, hidden 10) at 32x32, batch 2, one
timed call: only that the measurements run and report what they should, not
how fast.
"""

import re

import pytest

from bench import throughput

ARGV = ['--models', 'testing', '--dtypes', 'float32', '--batch', '2',
        '--image-size', '32', '--num-classes', '10', '--repeats', '1']
FIELDS = ('images_per_s', 'compile_s', 'peak_bytes', 'flops', 'xla_flops')


def _check_row(row):
  for field in FIELDS:
    assert row[field] is not None and row[field] > 0, (field, row)


def test_frozen_rows():
  args = throughput.parse_args(ARGV + ['--what', 'frozen'])
  rows = throughput.measure_frozen('testing', 'float32', args)
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
      images_per_s=ips, compile_s=1., peak_bytes=2**20, flops=1e6,
      xla_flops=1e6, trainable=trained, params=1000)
  monkeypatch.setattr(
      throughput, 'measure_frozen',
      lambda *_: {'all': row(10., 1000), 'head': row(25., 110)})
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

"""The tables `bench.throughput` prints, and what it judges its numbers by.

Every comparison is with what the same run measured: the original vit_jax
(`--original`), timm (`--timm`) and XLA's matmul peak (`--what peak`). Where
a run did not measure one of them, its columns say so and give no ratio;
speeds measured on another machine are never compared with. The targets are
this project's speed goals (docs/speed.md), multiples of the original's
float32 images/s on the same machine. Each `*_table` function prints one of
the tables of a run's end from the rows `bench.throughput_steps` measured:

  throughput_report.print_table(['model', 'img/s'], [['ViT-S_16', '7.8']])
"""

import sys
from typing import List, Sequence

import jax

from bench import throughput_metrics

# This project's targets (docs/speed.md), as multiples of the original's
# float32 images/s measured in the same run (batch 8, 224x224, 1000
# classes, CPU): at least the original for ViT-B/16 inference in float32,
# 2x it in bfloat16 (and above timm's bf16 autocast), 1.3x (float32) and 2x
# (bfloat16) the original's ViT-S/16 training step.
TARGET_X_ORIGINAL = {
    ('infer', 'ViT-B_16', 'float32'): 1.0,
    ('infer', 'ViT-B_16', 'bfloat16'): 2.0,
    ('train', 'ViT-S_16', 'float32'): 1.3,
    ('train', 'ViT-S_16', 'bfloat16'): 2.0,
}
TARGET_ABOVE_TIMM = {('infer', 'ViT-B_16', 'bfloat16')}
# Compile-only targets (docs/speed.md).
TARGET_REMAT_BATCH_RATIO = 2.0  # remat full vs none, same memory budget.
TARGET_SCAN_COMPILE_RATIO = 1 / 3  # ViT-L/16 train step, scan vs loop.


def log(*args):
  """Prints `args` and flushes stdout, so progress shows as it is made."""
  print(*args)
  sys.stdout.flush()


def fmt(x, spec='.1f', none='-'):
  """`x` formatted with `spec`, or `none` if it is None."""
  return none if x is None else format(x, spec)


def print_table(header: Sequence[str], rows: List[Sequence[str]]):
  """Prints a Markdown table, each column right-aligned to its widest."""
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  line = lambda cells: '| ' + ' | '.join(
      str(c).rjust(w) for c, w in zip(cells, widths)) + ' |'
  print(line(header))
  print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
  for row in rows:
    print(line(row))


def throughput_table(results, originals, peak, frozen):
  """The table of every measured row: images/s, FLOPs, MFU, compile, memory.

  Args:
    results: {(step, model, dtype): row} of ours.
    originals: {(step, model): row} of the original measured in this run.
    peak: {dtype: GFLOP/s} of the matmul peak ({} when not measured).
    frozen: the frozen section's rows ({} when it did not run).
  """
  log('\n## Throughput (images/s), model FLOPs utilisation, compile, memory')
  rows = []
  rows_of = list(results.items()) + [((what, name, 'original f32'), r)
                                     for (what, name), r in originals.items()]
  for (what, name, d), r in rows_of:
    gflop = None if r['flops'] is None else r['flops'] / 1e9
    if d == 'original f32':
      mfu = (None if gflop is None or 'float32' not in peak else gflop *
             r['images_per_s'] / peak['float32'])
    else:
      mfu = (None if gflop is None or d not in peak else gflop *
             r['images_per_s'] / peak[d])
    rows.append([
        what, name, d, f'{r["images_per_s"]:.1f}',
        fmt(gflop, '.2f'),
        fmt(div(r['xla_flops'], 1e9), '.2f'),
        fmt(None if mfu is None else 100 * mfu, '.0f'), f'{r["compile_s"]:.1f}',
        fmt(gib(r['peak_bytes']), '.2f')
    ])
  print_table([
      'step', 'model', 'dtype', 'img/s', 'GFLOP/img', 'XLA GFLOP/img', 'MFU %',
      'compile s', 'peak GiB'
  ], rows)
  print('GFLOP/img: analytic matmul FLOPs (train = 3x forward; head only = '
        'forward + the head\'s weight gradient); MFU uses it and the '
        'measured peak of the same dtype.')
  if frozen:
    print('train: this script\'s jitted step (as the original\'s numbers); '
          'train (all) / train (head only): train.make_update_fn, the '
          'training loop\'s pmapped step, trainable=None / \'head\'.')


def ceiling_table(ceilings, originals, peak, ceiling_shapes):
  """The matmul ceiling of the rows that have one, against the original.

  Args:
    ceilings: {(step, model, dtype): row} of rows with a ceiling.
    originals: {(step, model): row} of the original measured in this run.
    peak: {dtype: GFLOP/s} of the matmul peak ({} when not measured).
    ceiling_shapes: how many matmuls by shape to list per row (0: none).
  """
  log('\n## Matmul ceiling: the matmuls alone (bench.ceiling), calls '
      'interleaved with the full ones')
  rows = []
  for (what, name, d), r in ceilings.items():
    top = r['ceiling_images_per_s']
    orig = original_images_per_s(originals, what, name)
    target = TARGET_X_ORIGINAL.get((what, name, d))
    gflop = r['matmul_flops'] / 1e9
    rows.append([
        what, name, d, f'{r["images_per_s"]:.1f}', f'{top:.1f}',
        f'{100 * r["images_per_s"] / top:.0f}', f'{gflop:.2f}',
        f'{gflop * top:.0f}',
        fmt(div(100 * gflop * top, peak.get(d)), '.0f'),
        fmt(div(top, orig), '.2f'), '-' if target is None else f'>= {target:g}'
    ])
  print_table([
      'step', 'model', 'dtype', 'img/s', 'matmuls alone img/s', '% of ceiling',
      'matmul GFLOP/img', 'matmul GFLOP/s', '% of peak', 'ceiling x original',
      'target'
  ], rows)
  print('matmuls alone: every dot_general and convolution of the jitted '
        'function (forward and backward), nothing else: an estimate of the '
        'most the full call can reach with these matmuls (it can edge past '
        'it where its data stays in cache). '
        'matmul GFLOP/img: counted from the jaxpr. % of peak: against the '
        'n^3 matmul above. ceiling x original: the matmuls alone over the '
        'original\'s full call, measured in this run (- without '
        '--original): a target above it is out of reach on this machine '
        'with these matmuls.')
  for (what, name, d), r in ceilings.items():
    if r.get('matmul_shapes'):
      print_matmul_shapes(f'{what} {name} {d}', r['matmul_shapes'],
                          ceiling_shapes, peak.get(d))


def frozen_table(frozen):
  """Training only the head vs all parameters, from `measure_frozen`'s rows.

  Args:
    frozen: {(model, dtype): {'all': row, 'head': row}}.
  """
  log('\n## Training only the head (trainable=\'head\') vs all parameters')
  rows = []
  for (name, d), r in frozen.items():
    full, head = r['all'], r['head']
    rows.append([
        name, d, f'{head["trainable"]:,} / {head["params"]:,}',
        f'{full["images_per_s"]:.1f}', f'{head["images_per_s"]:.1f}',
        f'{head["images_per_s"] / full["images_per_s"]:.2f}',
        f'{full["compile_s"]:.1f}', f'{head["compile_s"]:.1f}',
        fmt(gib(full['peak_bytes']), '.2f'),
        fmt(gib(head['peak_bytes']), '.2f'),
        fmt(div(head['peak_bytes'], full['peak_bytes']), '.2f')
    ])
  print_table([
      'model', 'dtype', 'head params', 'train (all) img/s',
      'train (head only) img/s', 'x (head/all)', 'compile all s',
      'compile head s', 'peak all GiB', 'peak head GiB', 'peak head/all'
  ], rows)
  print('x (head/all): images/s of the head-only step over the full step, '
        'same batch and dtype, interleaved calls (on a loaded machine only '
        'this ratio is indicative).')


def targets_table(results, originals, timm, args):
  """Our images/s against the original's and timm's, and the targets.

  Args:
    results: {(step, model, dtype): row} of ours.
    originals: {(step, model): row} of the original measured in this run.
    timm: {(model, dtype): images/s} of timm measured in this run.
    args: the command line (the targets hold on CPU at batch 8, 224x224,
      1000 classes).
  """
  comparable = (
      jax.default_backend() == 'cpu' and args.batch == 8 and
      args.image_size == 224 and args.num_classes == 1000)
  log('\n## Against the original and the targets' +
      ('' if comparable else ' -- NOT comparable: other backend or sizes'))
  rows = []
  for (what, name, d), r in results.items():
    ips = r['images_per_s']
    orig = original_images_per_s(originals, what, name)
    timm_ips = timm.get((name, d)) if what == 'infer' else None
    target = TARGET_X_ORIGINAL.get((what, name, d))
    x_orig = div(ips, orig)
    met = '-'
    if target is not None and x_orig is not None:
      met = 'yes' if x_orig >= target else 'NO'
      if (what, name, d) in TARGET_ABOVE_TIMM and met == 'yes':
        met = ('- (no timm)'
               if timm_ips is None else 'yes' if ips > timm_ips else 'NO')
    rows.append([
        what, name, d, f'{ips:.1f}',
        fmt(orig),
        fmt(x_orig, '.2f'), '-' if target is None else f'>= {target:g}' +
        (' & > timm' if (what, name, d) in TARGET_ABOVE_TIMM else ''), met,
        fmt(timm_ips),
        fmt(div(ips, timm_ips), '.2f')
    ])
  print_table([
      'step', 'model', 'dtype', 'img/s', 'original f32 img/s', 'x original',
      'target', 'met', 'timm img/s', 'x timm'
  ], rows)
  print('original: the original vit_jax in float32, measured in this run '
        '(--original) on the same parameters. timm: measured in this run '
        'with --timm (inference). Nothing measured elsewhere is compared '
        'with: speeds differ between CPUs of the same name.')
  if not originals:
    print('The original was not measured in this run (--original DIR, a '
          'clone of https://github.com/google-research/vision_transformer): '
          'no ratio against it, no target judged.')


def print_matmul_shapes(title, timings, top, peak_gflops):
  """The `top` ceiling.ShapeTimings taking the most time, as a table."""
  total = sum(t.count * t.seconds for t in timings)
  shown = timings[:top]
  shown_s = sum(t.count * t.seconds for t in shown)
  print(f'\n### {title}: matmuls by shape, each timed alone ({len(shown)} of '
        f'{len(timings)} shapes, {100 * shown_s / total:.0f}% of their time)')
  print('(Each op timed alone, a few ms: such timings move by up to 2x between '
        'runs on a shared machine; the ceiling above, all in one call, less.)')
  print_table([
      'ms/step', '% of matmul time', 'count', 'ms each', 'GFLOP/s', '% of peak',
      'op'
  ], [[
      f'{1e3 * t.count * t.seconds:.1f}',
      f'{100 * t.count * t.seconds / total:.0f}', t.count,
      f'{1e3 * t.seconds:.2f}', f'{t.gflops_per_s:.0f}',
      fmt(div(100 * t.gflops_per_s, peak_gflops), '.0f'),
      t.describe()
  ] for t in shown])


def original_images_per_s(originals, what, name):
  """The original's images/s measured in this run, or None."""
  here = originals.get((what, name))
  return here['images_per_s'] if here else None


def gib(n):
  return None if n is None else n / throughput_metrics.GiB


def div(a, b):
  return None if a is None or not b else a / b


def size_text(n):
  """Bytes as GiB or MiB; '-' for None."""
  if n is None:
    return '-'
  gib = throughput_metrics.GiB
  return f'{n / gib:.2f} GiB' if n >= gib / 10 else f'{n / 2**20:.1f} MiB'


def rate_text(gflops):
  """GFLOP/s as text, in TFLOP/s from 1,000 on."""
  return (f'{gflops / 1e3:.1f} TFLOP/s'
          if gflops >= 1e3 else f'{gflops:.1f} GFLOP/s')


def percent_text(x):
  """A fraction as a whole percentage; '-' for None."""
  return '-' if x is None else f'{100 * x:.0f}%'

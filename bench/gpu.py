r"""The GPU benchmark: ViT-B/16 and L/16 speed on one GPU, in one command.

  python -m bench.gpu            # one H100 or H200: about 7 minutes
  python -m bench.gpu --tiny     # any CPU: the same code on the 'testing' model

In this order, each part started only while the time budget (`--budget-s`)
lasts, so that the run ends within 8 minutes:
  1. the matmul peak as XLA sees it, float32 (jax's default matmul precision,
     as the model's float32 matmuls) and bf16 in / f32 accumulate;
  2. per model, bfloat16 first, then float32: the training batch that fills
     the device, and at that batch the training step's and inference's
     images/s, model FLOPs utilisation (MFU) against the peak of 1., compile
     time and peak memory;
  3. per model, the bfloat16 training step at its batch with attention_impl
     'xla' and 'cudnn' (`jax.nn.dot_product_attention`) beside the
     reference; 'cudnn' is skipped, with the reason, off NVIDIA GPUs.
Then the command and device lines and one Markdown table for docs/speed.md.

The batch search compiles the training step (nothing runs) at --start-batch
and its double, then at the largest doubling that the last two predict to
fit: peak memory (XLA's buffer assignment) within --fill of the device's
memory (`memory_stats()['bytes_limit']`, or --memory-gib), and at most
--max-batch. One line per batch. A batch that still runs out of memory falls
back to the one before. The step, its timing and its FLOPs are
`bench.throughput`'s (`throughput_steps`, `throughput_metrics`).
"""

import argparse
import os
import sys
import time
import types

if __package__ in (None, ''):  # `python bench/gpu.py`
  sys.path.insert(0,
                  os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top

from bench import machine
from bench import throughput
from bench import throughput_metrics as metrics
from bench import throughput_report as report
from bench import throughput_steps as steps
from vit_jax import models

GiB = metrics.GiB
FULL = dict(
    models='ViT-B_16,ViT-L_16',
    image_size=224,
    num_classes=1000,
    start_batch=32,
    max_batch=1024,
    repeats=10,
    matmul_size=16384)
TINY = dict(
    models='testing',
    image_size=32,
    num_classes=10,
    start_batch=2,
    max_batch=2,
    repeats=2,
    matmul_size=256)
MFU_FLOPS = {'train': 3, 'infer': 1}  # x the forward pass's matmul FLOPs.


def parse_args(argv):
  p = argparse.ArgumentParser(
      prog='python -m bench.gpu',
      description=__doc__.split('\n\n')[0],
      epilog=__doc__[__doc__.index('In this order'):],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument(
      '--tiny', action='store_true', help=f'tiny sizes for a CPU: {TINY}')
  p.add_argument('--models', help=f'zoo names (default {FULL["models"]})')
  p.add_argument('--dtypes', default='bfloat16,float32')
  p.add_argument(
      '--attention',
      default='xla,cudnn',
      help='attention_impl values timed beside the reference')
  for name, help_ in (('image_size', 'image side'), ('num_classes',
                                                     'classes of the head'),
                      ('start_batch', 'first batch of the search'),
                      ('max_batch', 'largest batch tried'),
                      ('repeats', 'timed calls per number (the median)'),
                      ('matmul_size', 'n of the n^3 peak matmul')):
    p.add_argument(
        '--' + name.replace('_', '-'),
        type=int,
        help=f'{help_} (default {FULL[name]}; --tiny {TINY[name]})')
  p.add_argument(
      '--fill',
      type=float,
      default=0.9,
      help='share of the device memory a batch may take')
  p.add_argument(
      '--memory-gib',
      type=float,
      help='device memory to fill (default: memory_stats)')
  p.add_argument(
      '--budget-s',
      type=float,
      default=390.,
      help='no part starts after this many seconds')
  args = p.parse_args(argv)
  for name, value in (TINY if args.tiny else FULL).items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  args.models = [m for m in args.models.split(',') if m]
  for m in args.models:
    try:
      models.canonical_name(m)
    except ValueError as err:
      p.error(f'--models: {err}')
  args.dtypes = [d for d in args.dtypes.split(',') if d]
  args.attention = [a for a in args.attention.split(',') if a]
  for d in args.dtypes:
    if d not in steps.DTYPES:
      p.error(f'--dtypes: unknown {d!r}; use {tuple(steps.DTYPES)}')
  for a in args.attention:
    if a not in throughput.models_vit_impls():
      p.error(f'--attention: unknown {a!r}; use '
              f'{throughput.models_vit_impls()}')
  if args.start_batch < 1 or args.max_batch < args.start_batch:
    p.error('--start-batch must be at least 1 and at most --max-batch')
  return args


def _settings(args, **kw):
  """What `throughput_steps` reads of a command line, with `kw` set."""
  fields = dict(
      image_size=args.image_size,
      num_classes=args.num_classes,
      attention_impl='reference',
      token_only_last_block=False)
  return types.SimpleNamespace(**{**fields, **kw})


def _compile(name, dtype, args, batch, impl='reference'):
  """(compiled training step, compile seconds, peak bytes) at `batch`."""
  model = steps.build(name, dtype, _settings(args, attention_impl=impl))
  compiled, seconds = steps.compile_train_step(model, batch, args.image_size,
                                               args.num_classes)
  return compiled, seconds, metrics.peak_bytes(compiled)


def search_batch(name, dtype, args, limit, left):
  """The fitting tries of the batch search, smallest first (see above).

  Args:
    name, dtype: the model and compute dtype.
    args: the command line.
    limit: bytes a batch may take (None: no limit but --max-batch).
    left: () -> seconds left of the budget.

  Returns:
    [(batch, compiled, compile_s, peak_bytes)] of the batches that fit.
  """
  fits, batch, over = [], args.start_batch, None
  while batch:
    try:
      tried = _compile(name, dtype, args, batch)
    except Exception as err:  # pylint: disable=broad-except
      if not metrics.is_out_of_memory(err):
        raise
      report.log(f'    batch {batch:5d}: out of memory while compiling')
      break
    fit = limit is None or tried[2] <= limit
    report.log(f'    batch {batch:5d}: peak {report.size_text(tried[2])}' +
               ('' if limit is None else f' of {report.size_text(limit)}') +
               f', compiled in {tried[1]:.1f} s' +
               ('' if fit else ': does not fit'))
    if fit:
      fits.append((batch,) + tried)
    else:
      over = batch
    batch = _next_batch(fits, over, args.max_batch, limit)
    if batch and left() < 2 * tried[1]:
      report.log(f'    batch {batch:5d}: not tried, time budget spent')
      break
  return fits


def _next_batch(fits, over, max_batch, limit):
  """The next batch to compile (0: the search is over).

  Args:
    fits: the (batch, compiled, compile_s, peak_bytes) that fit so far.
    over: the smallest batch that did not fit, or None.
    max_batch: the largest batch to try.
    limit: bytes a batch may take, or None.
  """
  last = fits[-1][0] if fits else 0
  if over is not None:  # Halve towards the last batch that fits.
    return over // 2 if over // 2 > last else 0
  if last * 2 > max_batch:
    return 0
  if limit is None or len(fits) < 2:
    return last * 2
  (b1, *_, p1), (b2, *_, p2) = fits[-2:]
  predict = lambda batch: p2 + (p2 - p1) / (b2 - b1) * (batch - b2)
  nxt = last
  while nxt * 2 <= max_batch and predict(nxt * 2) <= limit:
    nxt *= 2
  if nxt == last:
    report.log(f'    batch {last * 2:5d}: predicted peak '
               f'{report.size_text(predict(last * 2))}: does not fit')
    return 0
  return nxt


_PARAMS = {}


def init_params(name, model, args):
  """`name`'s float32 parameters, initialised once per model and run (they
  do not depend on the compute dtype or the attention implementation)."""
  if name not in _PARAMS:
    images, _ = steps.batch_arrays(1, args.image_size, args.num_classes)
    _PARAMS[name] = jax.jit(
        lambda x: model.init(jax.random.key(0), x, train=False)['params'])(
            images)
  return _PARAMS[name]


def _train_call(compiled, params, batch, args):
  """A call of `compiled` (the training step) on a copy of `params`."""
  images, labels = steps.batch_arrays(batch, args.image_size, args.num_classes)
  params = jax.tree_util.tree_map(jax.numpy.copy, params)  # It is donated.
  state = [params, steps.make_optimizer().init(params)]
  rng = jax.random.key(1)

  def step():
    state[0], state[1], loss = compiled(state[0], state[1], images, labels, rng)
    return loss

  return step


def time_train(name, dtype, args, fits, impl='reference'):
  """Train images/s at the largest of `fits` that runs; its row, or None."""
  model = steps.build(name, dtype, _settings(args, attention_impl=impl))
  params = init_params(name, model, args)
  for batch, compiled, compile_s, peak in reversed(fits):
    try:
      seconds = metrics.median_seconds(
          _train_call(compiled, params, batch, args), args.repeats)
    except Exception as err:  # pylint: disable=broad-except
      if not metrics.is_out_of_memory(err):
        raise
      report.log(f'    batch {batch}: out of memory when run; one smaller')
      continue
    return dict(
        name=name,
        batch=batch,
        train=batch / seconds,
        train_compile_s=compile_s,
        train_peak=peak,
        model=model)
  return None


def time_infer(row, args):
  """Adds inference images/s, compile time and peak memory to `row`."""
  model, batch = row['model'], row['batch']
  call, infer = steps.prepare_infer(model, init_params(row['name'], model,
                                                       args),
                                    _settings(args, batch=batch))
  row.update(
      infer=batch / metrics.median_seconds(call, args.repeats),
      infer_compile_s=infer['compile_s'],
      infer_peak=infer['peak_bytes'])


def mfu(row, what, peak, args):
  """Model FLOPs utilisation of `row`'s `what` ('train', 'infer'), or None."""
  fwd = metrics.vit_forward_flops(row['model'], args.image_size)
  if row.get(what) is None or fwd is None or not peak:
    return None
  return row[what] * MFU_FLOPS[what] * fwd / (peak * 1e9)


def run_peak(args):
  """{dtype: GFLOP/s} of the n^3 matmul (`throughput_metrics.matmul_gflops`)."""
  report.log(f'\n## Matmul peak ({args.matmul_size}^3)')
  peak = {}
  for d in ('float32', 'bfloat16'):
    peak[d] = metrics.matmul_gflops(args.matmul_size, d, args.repeats)
    report.log(f'  {d}: {report.rate_text(peak[d])}')
  return peak


def run_model(name, dtype, args, limit, left):
  """The batch search, training and inference of one model and dtype."""
  report.log(f'\n## {name} {dtype}: batch search, then training and '
             'inference at the batch found')
  fits = search_batch(name, dtype, args, limit, left)
  row = time_train(name, dtype, args, fits) if fits else None
  if row is None:
    report.log('  no batch fits: lower --start-batch')
    return dict(note='no batch fits')
  time_infer(row, args)
  report.log(f'  batch {row["batch"]}: train {row["train"]:.1f} img/s, '
             f'infer {row["infer"]:.1f} img/s')
  return row


def run_attention(name, impl, batch, args):
  """The bfloat16 training step with `impl` at `batch`: its row."""
  if impl == 'cudnn' and jax.default_backend() != 'gpu':
    note = ('skipped, the cuDNN kernel runs on NVIDIA GPUs only (backend: '
            f'{jax.default_backend()})')
  else:
    try:
      fits = [(batch,) + _compile(name, 'bfloat16', args, batch, impl)]
      row = time_train(name, 'bfloat16', args, fits, impl)
      note = None if row else f'out of memory at batch {batch}'
    except Exception as err:  # pylint: disable=broad-except
      note = f'failed: {str(err).strip().splitlines()[0][:300]}'
  if note:
    report.log(f'  {name} attention_impl={impl}: {note}')
    return dict(note=note)
  report.log(f'  {name} attention_impl={impl} batch {batch}: '
             f'{row["train"]:.1f} img/s, compiled in '
             f'{row["train_compile_s"]:.1f} s')
  return row


def plan(args):
  """The parts after the peak, most wanted first: (kind, model, dtype)."""
  parts = [('model', m, d) for d in args.dtypes for m in args.models]
  if 'bfloat16' in args.dtypes:
    parts += [('attention', m, a)
              for m in args.models
              for a in args.attention
              if a != 'reference']
  return parts


def run_parts(args, limit, left):
  """The parts of `plan`, each started only if its estimated time is left.

  A model's part is estimated at its previous part's time, an attention
  part at the reference step's compile time and timed calls.
  """
  rows, took = {}, {}
  for kind, name, what in plan(args):
    ref = rows.get((name, 'bfloat16', 'reference'), {})
    if kind == 'model':
      key, need = (name, what, 'reference'), took.get(name, 0.)
    elif ref.get('batch'):
      key = (name, 'bfloat16', what)
      need = ref['train_compile_s'] + (args.repeats + 2) * (
          ref['batch'] / ref['train'])
    else:
      continue
    if left() <= max(need, 0.):
      rows[key] = dict(note=f'not run: {max(left(), 0):.0f} s of the time '
                       f'budget left, the part takes about {need:.0f} s')
      report.log(f'\n## {" ".join(key)}: {rows[key]["note"]}')
      continue
    t0 = time.perf_counter()
    if kind == 'model':
      rows[key] = run_model(name, what, args, limit, left)
      took[name] = time.perf_counter() - t0
    else:
      rows[key] = run_attention(name, what, ref['batch'], args)
  return rows


def main(argv=None):
  """Runs the benchmark (see above) and prints its table."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  start = time.perf_counter()
  left = lambda: args.budget_s - (time.perf_counter() - start)
  header = _header(argv)
  limit, _ = metrics.memory_stats()
  if args.memory_gib:
    limit = args.memory_gib * GiB
  limit = None if limit is None else int(args.fill * limit)
  peak = run_peak(args)
  rows = run_parts(args, limit, left)
  print('\n' + '\n'.join(header))
  print_table(rows, peak, args)
  _, device_peak = metrics.memory_stats()
  print(f'Matmul peak of this run ({args.matmul_size}^3): float32 '
        f'{report.rate_text(peak["float32"])}, bf16 in / f32 accumulate '
        f'{report.rate_text(peak["bfloat16"])}. Device memory: ' +
        ('-' if limit is None else f'{report.size_text(limit)} usable') +
        ('' if device_peak is None else
         f', {report.size_text(device_peak)} peak in use over the run') +
        f'. {time.perf_counter() - start:.0f} s of the '
        f'{args.budget_s:.0f} s budget.')


def _header(argv):
  lines = [
      'command: python -m bench.gpu ' + ' '.join(argv),
      f'jax {jax.__version__}, jaxlib {jax.lib.__version__}, backend '
      f'{jax.default_backend()}, default_matmul_precision '
      f'{jax.config.jax_default_matmul_precision}',
      'device: ' + machine.describe_machine()
  ]
  report.log('\n'.join(lines))
  return lines


def print_table(rows, peak, args):
  """The Markdown table: one row per model, dtype and attention."""
  cells, notes = [], []
  for (name, dtype, impl), row in rows.items():
    if 'note' in row:
      cells.append([name, dtype, impl] + ['-'] * 7)
      notes.append(f'{name} {dtype} attention_impl={impl}: {row["note"]}.')
      continue
    both = lambda a, b, spec: (f'{report.fmt(row.get(a), spec)} / '
                               f'{report.fmt(row.get(b), spec)}')
    percent = lambda what: report.percent_text(
        mfu(row, what, peak[dtype], args))
    cells.append([
        name, dtype, impl, row['batch'], f'{row["train"]:.1f}',
        percent('train'),
        report.fmt(row.get('infer')),
        percent('infer'),
        both('train_compile_s', 'infer_compile_s', '.1f'), ' / '.join(
            report.size_text(row.get(k)) for k in ('train_peak', 'infer_peak'))
    ])
  report.print_table([
      'model', 'dtype', 'attention', 'batch', 'train img/s', 'train MFU',
      'infer img/s', 'infer MFU', 'compile s (train / infer)',
      'peak memory (train / infer)'
  ], cells)
  print('\n'.join(notes))


if __name__ == '__main__':
  main()

r"""Speed of the Vision Transformer: throughput, MFU, compile time, memory.

Command (all sections; about 20 minutes on a 2-core CPU):

  python -m bench.throughput

The comparison that judges the targets, with the original timed in the same
run (a clone of https://github.com/google-research/vision_transformer, not
shipped here) and timm (torch and timm installed):

  python -m bench.throughput --token-only-last-block \
      --original ../vision_transformer --timm

Quick runs while iterating (one model, one dtype, one section):

  python -m bench.throughput --models ViT-S_16 --dtypes bfloat16 \
      --what train --repeats 3
  python -m bench.throughput --models ViT-Ti_16 --dtypes float32 \
      --what frozen --repeats 3

Sections (`--what`, comma-separated):
  peak     the matmul peak as XLA sees it: a square float32 matmul and the same
           with bfloat16 inputs and float32 accumulation (2048^3 on CPU,
           8192^3 on GPU). Model FLOPs utilisation (MFU) divides by these.
  infer    images/s of `model.apply(..., train=False)` under jit.
  train    images/s of one training step as the original fine-tunes: forward,
           backward, global-norm clip 1.0, SGD momentum 0.9 with a bfloat16
           momentum buffer (optax), parameters donated.
  ceiling  with infer and/or train: the same functions' matmuls alone
           (`bench.ceiling`: every dot_general and convolution of the
           jaxpr, backward ones included, at their shapes and dtypes, on
           random operands), timed interleaved with the full calls. The
           images/s a step would reach if everything between its matmuls
           (LayerNorm, GELU, softmax, casts, the optimizer) took no time:
           an estimate of the most that work on anything but the matmuls
           can give (the products read operands of their own, so a call
           whose data stays in cache can edge past it). `--ceiling-shapes
           N` also times each distinct matmul alone and lists the N that
           take the most time, with their rate.
           Skipped, with the reason, where the products' operands and
           outputs would take over half the device's memory (e.g. ViT-B/16
           training at a GPU batch of 128: lower --batch).
  frozen   frozen-backbone fine-tuning: images/s of the training loop's own
           step (`train.make_update_fn`, pmapped, one device; same optimizer
           and batch as `train`) training every parameter ('train (all)')
           and only the head ('train (head only)': `trainable_mask=
           trainable.trainable_mask(params, 'head')`, optimizer state of the
           head alone, as `config.trainable='head'`), their ratio, compile
           time and peak memory. The head-only step computes no backbone
           gradients: a forward pass plus the head's weight gradient.
  compile  compile time of the ViT-L/16 training step with and without
           `scan=True` (compile only, nothing runs).
  remat    the largest ViT-B/16 training batch whose compiled peak memory fits
           `--budget-gib`, per remat policy (compile only: binary search on
           `compiled.memory_analysis()`).

Every timed number is the median of `--repeats` calls after one warm-up call,
timed with `time.perf_counter` around `jax.block_until_ready`. Compile time is
trace + lower + compile of the jitted function. Peak memory is XLA's buffer
assignment of the compiled function: temp + arguments + outputs, buffers that
outputs alias (donated arguments) counted once. Model FLOPs are counted
analytically (the matmuls and attention einsums, 2 FLOPs per multiply-add;
a training step is 3x the forward pass); XLA's own count
(`cost_analysis()['flops']`, which also counts elementwise work) is printed
beside it.

The tables at the end compare against the original implementation and this
project's targets (docs/speed.md: multiples of the original's float32
images/s). With `--original DIR` (a clone of
https://github.com/google-research/vision_transformer) the original's model
runs in this process on the same parameters (its logits are checked against
ours first), its calls interleaved with ours. Only what the same run measured
is compared: without `--original` the tables say that the original was not
measured and give no ratio against it or verdict on a target. `--timm` adds
timm's inference (torch and timm installed).

What it prints: the command, jax and jaxlib versions, the device and CPU
line (`bench.machine`), XLA_FLAGS and the batch; then per section its
measurements, and at the end the tables "Throughput (images/s), model FLOPs
utilisation, compile, memory", "Matmul ceiling" (with `ceiling`), "Training
only the head" (with `frozen`) and "Against the original and the targets".
Measured results, with the commands that gave them: docs/speed.md.

This module parses the command line and runs the sections; the measuring is
in `bench.throughput_steps` (the functions timed) and
`bench.throughput_metrics` (time, memory, FLOPs), the comparison with the
original and timm in `bench.throughput_original`, the tables and reference
numbers in `bench.throughput_report`.
"""

import argparse
import os
import statistics
import sys

if __package__ in (None, ''):  # `python bench/throughput.py`
  sys.path.insert(0,
                  os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top

from bench import machine
from bench import throughput_metrics
from bench import throughput_original
from bench import throughput_report
from bench import throughput_steps
from vit_jax import models
from vit_jax.configs import choices

SECTIONS = ('peak', 'infer', 'train', 'ceiling', 'frozen', 'compile', 'remat')


def models_vit_impls():
  return choices.ATTENTION_IMPLS


def parse_args(argv):
  sections = __doc__[__doc__.index('Sections ('):__doc__
                     .index('Every timed number')]
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      epilog=__doc__[__doc__.index('Command ('):__doc__.index('Sections (')] +
      sections,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  _add_model_flags(p)
  _add_section_flags(p)
  args = p.parse_args(argv)
  _check_args(p, args)
  return args


def _add_model_flags(p):
  """The models, dtypes, batch and options of the timed sections."""
  p.add_argument(
      '--models',
      default='ViT-Ti_16,ViT-S_16,ViT-B_16',
      help='comma-separated zoo names for infer/train/frozen')
  p.add_argument(
      '--dtypes',
      default='float32,bfloat16',
      help='compute dtypes (parameters are always float32)')
  p.add_argument(
      '--batch',
      type=int,
      default=None,
      help='images per call (default 8 on CPU, 128 on GPU)')
  p.add_argument(
      '--repeats',
      type=int,
      default=9,
      help='timed calls per number; the median is reported')
  p.add_argument(
      '--what',
      default=','.join(SECTIONS),
      help=f'comma-separated sections of {SECTIONS} (see below); '
      '\'frozen\' alone: train (all) vs train (head only)')
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--num-classes', type=int, default=1000)
  p.add_argument(
      '--attention-impl', default='reference', choices=models_vit_impls())
  p.add_argument(
      '--token-only-last-block',
      action='store_true',
      help='VisionTransformer.token_only_last_block=True: the last '
      'block computes the class token only (same logits)')
  p.add_argument(
      '--scan', action='store_true', help='infer/train/frozen with scan=True')
  p.add_argument(
      '--remat-policy',
      default='none',
      help='remat policy of the train and frozen sections')


def _add_section_flags(p):
  """The original, timm and the options of the peak, ceiling, remat and
  compile sections."""
  p.add_argument(
      '--original',
      default=None,
      metavar='DIR',
      help='a clone of google-research/vision_transformer: its '
      'float32 model is timed too (infer, train), interleaved with '
      'ours on the same parameters, and the targets are judged '
      'against it')
  p.add_argument(
      '--ceiling-shapes',
      type=int,
      default=0,
      metavar='N',
      help='with the ceiling: also time each distinct matmul '
      'alone and print the N taking the most time per step '
      '(shape, count, GFLOP/s)')
  p.add_argument(
      '--timm',
      action='store_true',
      help='also time timm inference (needs torch and timm)')
  p.add_argument(
      '--matmul-size',
      type=int,
      default=None,
      help='n of the n^3 peak matmul (default 2048 CPU, 8192 GPU)')
  p.add_argument(
      '--budget-gib',
      type=float,
      default=4.0,
      help='memory budget of the remat section')
  p.add_argument('--remat-model', default='ViT-B_16')
  p.add_argument(
      '--remat-configs',
      default='loop:none,loop:full,scan:none,scan:full',
      help='BLOCKS:POLICY pairs of the remat section; BLOCKS is '
      'loop or scan')
  p.add_argument('--compile-model', default='ViT-L_16')
  p.add_argument(
      '--compile-repeats',
      type=int,
      default=3,
      help='compiles per variant in the compile section')


def _check_args(p, args):
  """Parses the lists of `args` in place; `p.error` on a bad value."""
  args.models = [models.canonical_name(m) for m in args.models.split(',') if m]
  args.dtypes = [d for d in args.dtypes.split(',') if d]
  for d in args.dtypes:
    if d not in throughput_steps.DTYPES:
      p.error(f'--dtypes: unknown {d!r}; use '
              f'{tuple(throughput_steps.DTYPES)}')
  args.what = [w for w in args.what.split(',') if w]
  for w in args.what:
    if w not in SECTIONS:
      p.error(f'--what: unknown section {w!r}; use {SECTIONS}')
  if 'ceiling' in args.what and not {'infer', 'train'} & set(args.what):
    p.error('--what: ceiling measures the infer and train sections\' '
            'functions; add infer and/or train (e.g. --what train,ceiling)')
  on_gpu = jax.default_backend() == 'gpu'
  if args.batch is None:
    args.batch = 128 if on_gpu else 8
  if args.matmul_size is None:
    args.matmul_size = 8192 if on_gpu else 2048


def main(argv=None):
  """Runs the sections of `--what` and prints the tables (see above)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  original = _print_header(argv, args)
  peak = run_peak(args) if 'peak' in args.what else {}
  results, originals = run_steps(args, original)
  timm = run_timm(args) if args.timm and 'infer' in args.what else {}
  frozen = run_frozen(args, results) if 'frozen' in args.what else {}
  if results:
    throughput_report.throughput_table(results, originals, peak, frozen)
  ceilings = {k: r for k, r in results.items() if r.get('ceiling_images_per_s')}
  if ceilings:
    throughput_report.ceiling_table(ceilings, originals, peak,
                                    args.ceiling_shapes)
  if frozen:
    throughput_report.frozen_table(frozen)
  if any(what in ('infer', 'train') for what, _, _ in results):
    throughput_report.targets_table(results, originals, timm, args)
  if 'compile' in args.what:
    run_compile(args)
  if 'remat' in args.what:
    run_remat(args)


def _print_header(argv, args):
  """Prints the command, versions, machine and sizes; loads `--original`."""
  program = (['-m', __spec__.name]
             if globals().get('__spec__') else sys.argv[:1])
  print('command:', ' '.join(['python'] + program + argv))
  print(f'jax {jax.__version__}, jaxlib {jax.lib.__version__}, '
        f'backend {jax.default_backend()}')
  print('device:', machine.describe_machine())
  print('XLA_FLAGS:', os.environ.get('XLA_FLAGS', '(unset)'),
        '| default_matmul_precision:', jax.config.jax_default_matmul_precision)
  print(f'batch {args.batch}, {args.image_size}x{args.image_size}, '
        f'{args.num_classes} classes, median of {args.repeats}, '
        f'attention_impl={args.attention_impl}, token_only_last_block='
        f'{args.token_only_last_block}, scan={args.scan}, '
        f'train remat_policy={args.remat_policy}')
  original = None
  if args.original and {'infer', 'train'} & set(args.what):
    original = throughput_original.load_original(args.original)
    print('original:', os.path.dirname(original.__file__))
  sys.stdout.flush()
  return original


def run_peak(args):
  """The peak section: {dtype: GFLOP/s} of an n^3 matmul, as a table."""
  throughput_report.log(
      f'\n## Matmul peak as XLA sees it ({args.matmul_size}^3)')
  peak, rows = {}, []
  for d in ('float32', 'bfloat16'):
    peak[d] = throughput_metrics.matmul_gflops(args.matmul_size, d,
                                               args.repeats)
    label = 'float32' if d == 'float32' else 'bf16 in, f32 accumulate'
    rows.append([label, f'{peak[d]:.0f}'])
  throughput_report.print_table(['matmul', 'GFLOP/s'], rows)
  return peak


def run_steps(args, original):
  """The infer and train sections, each model's dtypes interleaved.

  Args:
    args: the command line.
    original: the original's `models_vit` (`--original`), or None.

  Returns:
    ({(step, model, dtype): row} of ours, {(step, model): row} of the
    original), rows of `throughput_steps.measure`.
  """
  results, originals = {}, {}
  for what in ('infer', 'train'):
    if what not in args.what:
      continue
    throughput_report.log(
        f'\n## {"Inference" if what == "infer" else "Training step"}' +
        (' (ours and the original, calls interleaved)'
         if original else ' (dtypes interleaved)'))
    for name in args.models:
      rows = throughput_steps.measure(what, name, args, original)
      for key, r in rows.items():
        if key == 'original':
          originals[what, name] = r
        else:
          results[what, name, key] = r
        peak_gib = throughput_report.gib(r['peak_bytes'])
        throughput_report.log(
            f'  {name} {key}: {r["images_per_s"]:.1f} img/s, compile '
            f'{r["compile_s"]:.1f} s, peak '
            f'{throughput_report.fmt(peak_gib, ".2f")} GiB')
  return results, originals


def run_timm(args):
  """The timm section: {(model, dtype): images/s} of timm's inference."""
  timm = {}
  throughput_report.log('\n## timm inference (PyTorch, random weights)')
  for name in args.models:
    for d, ips in throughput_original.timm_inference(name, args).items():
      timm[name, d] = ips
      throughput_report.log(
          f'  {throughput_original.TIMM_NAMES[name]} {d}: {ips:.1f} img/s')
  return timm


def run_frozen(args, results):
  """The frozen section: {(model, dtype): measure_frozen's rows}.

  Its rows are also added to `results`, under the steps 'train (all)' and
  'train (head only)'.
  """
  frozen = {}
  throughput_report.log('\n## Frozen backbone: the training loop\'s step '
                        '(train.make_update_fn, one device), all parameters vs '
                        'trainable=\'head\', calls interleaved')
  for name in args.models:
    for d in args.dtypes:
      frozen[name, d] = throughput_steps.measure_frozen(name, d, args)
      for trained, r in frozen[name, d].items():
        label = throughput_steps.FROZEN_LABELS[trained]
        results[label, name, d] = r
        peak_gib = throughput_report.gib(r['peak_bytes'])
        throughput_report.log(
            f'  {name} {d} {label} ({r["trainable"]:,} of '
            f'{r["params"]:,} parameters): {r["images_per_s"]:.1f} img/s, '
            f'compile {r["compile_s"]:.1f} s, peak '
            f'{throughput_report.fmt(peak_gib, ".2f")} GiB')
  return frozen


def run_compile(args):
  """The compile section: the training step's compile time, scan vs loop."""
  throughput_report.log(
      f'\n## {args.compile_model} training-step compile time, scan vs loop '
      f'(batch {args.batch}, float32, compile only, median of '
      f'{args.compile_repeats}, alternating)')
  secs = {False: [], True: []}
  for _ in range(args.compile_repeats):
    for scan in (False, True):
      # A new module and step function each time: nothing is cached.
      model = models.get_model(
          args.compile_model, num_classes=args.num_classes, scan=scan)
      _, seconds = throughput_steps.compile_train_step(model, args.batch,
                                                       args.image_size,
                                                       args.num_classes)
      secs[scan].append(seconds)
      throughput_report.log(f'  scan={scan}: {seconds:.1f} s')
  loop_s, scan_s = (statistics.median(secs[k]) for k in (False, True))
  ratio = scan_s / loop_s
  target = throughput_report.TARGET_SCAN_COMPILE_RATIO
  throughput_report.print_table(
      ['scan=False s', 'scan=True s', 'ratio', 'target', 'met'], [[
          f'{loop_s:.1f}', f'{scan_s:.1f}', f'{ratio:.2f}', f'<= {target:.2f}',
          'yes' if ratio <= target else 'NO'
      ]])


def run_remat(args):
  """The remat section: the largest training batch within the budget."""
  gib = throughput_metrics.GiB
  budget = int(args.budget_gib * gib)
  throughput_report.log(
      f'\n## Largest {args.remat_model} training batch within '
      f'{args.budget_gib:g} GiB (compiled peak memory, float32, compile '
      'only)')
  found = {}
  for config in args.remat_configs.split(','):
    layout, policy = config.split(':')
    throughput_report.log(f'  {layout} remat_policy={policy}:')
    model = models.get_model(
        args.remat_model,
        num_classes=args.num_classes,
        remat_policy=policy,
        scan=layout == 'scan')
    found[layout, policy] = throughput_steps.largest_batch_within(
        model,
        budget,
        args.image_size,
        args.num_classes,
        log=throughput_report.log)
  base = found.get(('loop', 'none'), found.get(('scan', 'none'), {}))
  base = base.get('batch')
  target = throughput_report.TARGET_REMAT_BATCH_RATIO
  rows = []
  for (layout, policy), r in found.items():
    ratio = throughput_report.div(r['batch'], base)
    rows.append([
        layout, policy, r['batch'], f'{r["peak_bytes"] / gib:.2f}', r['probes'],
        throughput_report.fmt(ratio, '.2f'),
        '-' if policy != 'full' or ratio is None else
        ('yes' if ratio >= target else 'NO')
    ])
  throughput_report.print_table([
      'blocks', 'remat_policy', 'max batch', 'peak GiB', 'compiles',
      'x default', f'>= {target:g}x'
  ], rows)
  print('x default: against the default model (loop, no remat). On XLA:CPU '
        'remat saves memory only under scan: without it the scheduler runs '
        'the recomputation early and keeps its outputs as long as the '
        'forward\'s.')


if __name__ == '__main__':
  main()

"""Table 8 of the paper (Appendix D.4) in miniature: position embeddings.

  python -m bench.posemb_ablation                 # 9 variants x seeds 0-2
  python -m bench.posemb_ablation --seeds 0 --steps 100 --variants none,learn

Trains the main job's model (configs/embedded.py) on the embedded digits once
per position embedding (none, learned 1-D and 2-D at the input, in every layer
and shared by every layer, 1-D relative attention, fixed 2-D sin-cos) and
seed, for `--steps` steps instead of the main job's 2,000 (the schedule
shortened with it), in this process, one run after the other. Per run: the
test accuracy and the few-shot linear accuracy of the frozen representation
(`--shots`-shot, as the paper's Table 8 reports 5-shot ImageNet). Prints the
command, the machine and one Markdown table: mean and standard deviation over
the seeds, and every seed's figure. Results: docs/paper.md.
"""

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

from bench import machine

# (name, posemb, posemb_where); the rows of the paper's Table 8.
VARIANTS = (
    ('none', 'none', 'input'),
    ('learn', 'learn', 'input'),
    ('learn/every_layer', 'learn', 'every_layer'),
    ('learn/every_layer_shared', 'learn', 'every_layer_shared'),
    ('learn_2d', 'learn_2d', 'input'),
    ('learn_2d/every_layer', 'learn_2d', 'every_layer'),
    ('learn_2d/every_layer_shared', 'learn_2d', 'every_layer_shared'),
    ('relative', 'relative', 'input'),
    ('sincos2d', 'sincos2d', 'input'),
)


def run(posemb: str, where: str, seed: int, args, workdir: str):
  """(test accuracy, few-shot accuracy) of one variant and seed."""
  # Imported here: after the compilation cache is set up in `main`.
  from configs import embedded  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints import train_checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluation import fewshot  # pylint: disable=g-import-not-at-top

  config = embedded.get_config()
  config.seed = seed
  config.total_steps = args.steps
  config.warmup_steps = max(args.steps // 10, 1)
  config.log_every = config.eval_every = args.steps
  config.checkpoint_every = args.steps
  config.model.posemb = posemb
  config.model.posemb_where = where
  os.makedirs(workdir, exist_ok=True)
  # The run's own lines (data table, progress, closing) go to its workdir.
  with open(os.path.join(workdir, 'console.txt'), 'w') as log:
    with contextlib.redirect_stdout(log):
      summary = train.train_and_evaluate(config, workdir)
  ckpts = train_checkpoint.TrainCheckpoints(workdir)
  try:
    params = ckpts.restore_params()
  finally:
    ckpts.close()
  model = train.create_model(config, 10)
  few = fewshot.evaluate(
      model,
      params,
      'embedded_mnist',
      shots=(args.shots,),
      seeds=(seed,),
      image_size=config.pp.crop)
  return summary['accuracy'], float(few[args.shots])


def _cell(values):
  if len(values) == 1:
    return f'{values[0]:.4f}'
  return f'{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}'


def table(rows, shots: int) -> str:
  """The Markdown table of `rows`: {name: [(accuracy, few-shot), ...]}."""
  lines = [
      f'| position embedding | test accuracy | {shots}-shot linear | '
      'per seed (test / few-shot) |', '|---|---|---|---|'
  ]
  for name, results in rows.items():
    acc = [a for a, _ in results]
    few = [f for _, f in results]
    seeds = ', '.join(f'{a:.3f} / {f:.3f}' for a, f in results)
    lines.append(f'| {name} | {_cell(acc)} | {_cell(few)} | {seeds} |')
  return '\n'.join(lines)


def parse_args(argv):
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=__doc__[__doc__.index('Trains'):])
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--steps', type=int, default=250)
  p.add_argument('--shots', type=int, default=5)
  p.add_argument(
      '--variants',
      default=','.join(v[0] for v in VARIANTS),
      help='comma-separated names of ' + ', '.join(v[0] for v in VARIANTS))
  args = p.parse_args(argv)
  args.seeds = [int(s) for s in args.seeds.split(',') if s]
  known = {v[0]: v for v in VARIANTS}
  names = [v for v in args.variants.split(',') if v]
  for name in names:
    if name not in known:
      p.error(f'--variants: unknown {name!r}; use {sorted(known)}')
  args.variants = [known[n] for n in names]
  return args


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  root = tempfile.mkdtemp(prefix='posemb_ablation_')
  # Seeds of a variant compile the same programs: compile each once.
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir', os.path.join(root, 'xla'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  machine.print_header('bench.posemb_ablation', argv)
  t0 = time.time()
  rows = {}
  for name, posemb, where in args.variants:
    rows[name] = []
    for seed in args.seeds:
      workdir = os.path.join(root, f'{name.replace("/", "-")}-seed{seed}')
      acc, few = run(posemb, where, seed, args, workdir)
      rows[name].append((acc, few))
      print(
          f'{name} seed {seed}: test accuracy {acc:.4f}, {args.shots}-shot '
          f'{few:.4f} ({time.time() - t0:.0f}s so far)',
          flush=True)
  print(f'\n{args.steps} steps per run, seeds {args.seeds}, '
        f'{time.time() - t0:.0f}s in all\n')
  print(table(rows, args.shots))
  return 0


if __name__ == '__main__':
  sys.exit(main())

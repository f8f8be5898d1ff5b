"""The main job over several seeds: accuracy per seed, mean, range, time.

Command (what the README's headline figure comes from):

  python -m bench.main_job                      # seeds 0-4, configs/embedded.py
  python -m bench.main_job --seeds 0,1 --config configs/embedded.py \
      --workdir-root /tmp/main_job_seeds -- --config.total_steps=500

Each seed runs `python -m vit_jax.main --config=CONFIG --workdir=ROOT/seed<S>
--config.seed=S [extra overrides]` in a fresh process, one after the other
(never two at once: they would share the cores), in a fresh workdir. The
table gives each seed's final test accuracy and its training and total wall
time (from its summary.json); below it the mean, the range, the target check
and the machine. Arguments after `--` are passed to every run.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Sequence

from bench import machine

# The main job's bar (README): mean over seeds 0-4 and the worst seed.
TARGET_MEAN = 0.985
TARGET_MIN = 0.982
TARGET_TRAIN_S = 300.


def run_seed(seed: int, config: str, workdir: str,
             extra: Sequence[str]) -> Dict[str, float]:
  """Runs the main job for `seed`; returns its accuracy and times."""
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, '-m', 'vit_jax.main', f'--config={config}',
         f'--workdir={workdir}', f'--config.seed={seed}', *extra]
  t0 = time.time()
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, check=False)
  wall = time.time() - t0
  if proc.returncode:
    raise RuntimeError(f'seed {seed} failed ({proc.returncode}):\n'
                       f'{proc.stdout[-3000:]}')
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  return {'seed': seed, 'accuracy': summary['accuracy'],
          'train_s': summary['train_time_s'], 'wall_s': wall,
          'steps': summary['step']}


def report(rows: List[Dict[str, float]], command: str) -> str:
  """The table, the statistics and the target check, as text."""
  lines = [f'command: {command}', f'machine: {machine.cpu_description()}', '',
           'seed  accuracy  train     wall', '----  --------  --------  ------']
  for r in rows:
    lines.append(f'{r["seed"]:>4}  {r["accuracy"]:.4f}    '
                 f'{r["train_s"]:6.1f} s  {r["wall_s"]:5.0f} s')
  accs = [r['accuracy'] for r in rows]
  mean = statistics.mean(accs)
  sd = statistics.stdev(accs) if len(accs) > 1 else 0.
  worst_train = max(r['train_s'] for r in rows)
  lines += ['',
            f'mean {mean:.4f}  sd {sd:.4f}  range {min(accs):.4f}-'
            f'{max(accs):.4f} over {len(accs)} seeds',
            f'training time {min(r["train_s"] for r in rows):.0f}-'
            f'{worst_train:.0f} s per run; '
            f'{sum(r["wall_s"] for r in rows) / 60:.1f} min for all',
            f'target: mean >= {TARGET_MEAN} '
            f'({"met" if mean >= TARGET_MEAN else "NOT met"}), every seed >= '
            f'{TARGET_MIN} ({"met" if min(accs) >= TARGET_MIN else "NOT met"}),'
            f' training <= {TARGET_TRAIN_S:.0f} s '
            f'({"met" if worst_train <= TARGET_TRAIN_S else "NOT met"})']
  return '\n'.join(lines)


def parse_args(argv):
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n', maxsplit=1)[0],
      epilog=__doc__[__doc__.index('Command'):],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--seeds', default='0,1,2,3,4',
                 help='comma-separated seeds (default 0-4)')
  p.add_argument('--config', default='configs/embedded.py')
  p.add_argument('--workdir-root', default=None,
                 help='seed workdirs go to ROOT/seed<S> (default: a temporary '
                      'folder, removed at the end)')
  p.add_argument('extra', nargs='*',
                 help='overrides for every run, after --')
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(',')]
  root = args.workdir_root or tempfile.mkdtemp(prefix='main_job_seeds_')
  command = 'python -m bench.main_job ' + ' '.join(sys.argv[1:] if argv is None
                                                   else argv)
  rows = []
  try:
    for seed in seeds:
      rows.append(run_seed(seed, args.config,
                           os.path.join(root, f'seed{seed}'), args.extra))
      r = rows[-1]
      print(f'seed {seed}: accuracy {r["accuracy"]:.4f} after {r["steps"]} '
            f'steps, {r["train_s"]:.0f} s of training', flush=True)
  finally:
    if args.workdir_root is None:
      shutil.rmtree(root, ignore_errors=True)
  print()
  print(report(rows, command.strip()))
  return 0


if __name__ == '__main__':
  sys.exit(main())

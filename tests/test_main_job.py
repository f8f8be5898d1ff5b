"""The main job: the README's first command reaches the stated accuracy.

`python -m vit_jax.main --workdir=<dir>` (no --config: configs/embedded.py)
trains the small ViT on the embedded MNIST digits offline and must reach at
least 98% on the 1,000 held-out digits, leaving a checkpoint, TensorBoard
logs and summary.json.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_command_reaches_98_percent(tmp_path):
  workdir = str(tmp_path / 'vit_mnist')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('XLA_FLAGS', None)
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['config']['dataset'] == 'embedded_mnist'
  assert summary['step'] == summary['total_steps']
  assert summary['accuracy'] >= 0.98, summary['eval_history']
  assert f'Final test accuracy {summary["accuracy"]:.4f}' in result.stdout
  assert os.listdir(os.path.join(workdir, 'checkpoints')) != []
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))

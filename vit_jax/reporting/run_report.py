"""The closing lines of a finished run (workdir contents, next commands) and
atomic summary.json writes.
"""

import json
import os
from typing import Any, Dict

from vit_jax import input_pipeline
from vit_jax.checkpoints import train_checkpoint
from vit_jax.data import filesystem
from vit_jax.reporting import progress
from vit_jax.reporting import run_plots

SUMMARY_FILE = 'summary.json'


def write_json_atomically(path: str, data: Dict[str, Any]) -> None:
  """Writes `data` as JSON to `path` (`filesystem.write_text_atomically`)."""
  filesystem.write_text_atomically(path,
                                   json.dumps(data, indent=2, sort_keys=True))


def workdir_contents(workdir: str) -> str:
  """A few lines: the workdir and what a finished run left in it."""
  notes = {
      SUMMARY_FILE: 'accuracy, history, config',
      run_plots.CURVES_FILE: 'training loss and test accuracy',
      run_plots.CONFUSION_FILE: 'test confusion matrix',
      train_checkpoint.CHECKPOINT_SUBDIR: 'train state (resume, export)',
      progress.METRICS_FILE: 'metrics, one JSON line each',
      'log.txt': 'the full log (python -m vit_jax.main writes it)',
  }
  names = sorted(os.listdir(workdir))
  lines = [f'Workdir {workdir}:']
  for name in names:
    if name in notes:
      lines.append(f'  {name:<16} {notes[name]}')
  others = [n for n in names if n not in notes and not n.startswith('.')]
  events = [n for n in others if n.startswith('events.out.tfevents')]
  rest = [n for n in others if n not in events]
  if events:
    lines.append(f'  {"events.out.*":<16} TensorBoard events')
  if rest:
    lines.append(f'  also: {", ".join(rest)}')
  return '\n'.join(lines)


def next_commands(config, workdir: str, summary: Dict[str, Any]) -> str:
  """The commands a person runs next on this workdir."""
  lines = ['Next:']
  if summary['objective'] == 'classification':
    lines.append(f'  classify an image:  python -m vit_jax.predict '
                 f'--workdir={workdir} IMAGE.png')
  lines.append(f'  TensorBoard:        tensorboard --logdir={workdir}')
  lines.append(f'  export weights:     python -m vit_jax.checkpoints.export '
               f'--workdir={workdir} --output=model.npz')
  if config.dataset == input_pipeline.EMBEDDED_MNIST:
    lines.append('  fine-tune at 42x42: the commands in '
                 'configs/embedded_pretrain.py')
  return '\n'.join(lines)

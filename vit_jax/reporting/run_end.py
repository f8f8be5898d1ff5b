"""What process 0 does when a run has finished: its pictures, summary.json
(which marks the run finished) and the closing lines it prints."""

import json
import os
from typing import Any, Dict

from vit_jax.reporting import dataset_report
from vit_jax.reporting import progress
from vit_jax.reporting import run_plots
from vit_jax.reporting import run_report


def finish_run(config, workdir: str, summary: Dict[str, Any]) -> None:
  """Writes the plots and summary.json (with `summary['plots']` added) into
  `workdir`, then prints the result, the workdir's contents and what to run
  next."""
  class_names = None
  names_path = os.path.join(workdir, dataset_report.CLASS_NAMES_FILE)
  if os.path.exists(names_path):
    with open(names_path) as f:
      class_names = json.load(f)
  title = f'{config.get("model_name") or "model"} on {config.dataset}'
  summary['plots'] = run_plots.write_run_plots(
      workdir,
      last_step=summary['step'],
      confusion=summary.get('confusion'),
      class_names=class_names,
      title=title)
  run_report.write_json_atomically(
      os.path.join(workdir, run_report.SUMMARY_FILE), summary)
  what = (f'test accuracy {summary["accuracy"]:.4f}'
          if summary['objective'] == 'classification' else
          f'test {summary["objective"]} accuracy {summary["accuracy"]:.4f}')
  print(
      f'Final {what} after {summary["step"]} steps '
      f'({progress.format_duration(summary["train_time_s"])} of training, '
      f'{progress.format_duration(summary["total_time_s"])} in all).',
      flush=True)
  print(run_report.workdir_contents(workdir), flush=True)
  print(run_report.next_commands(config, workdir, summary), flush=True)

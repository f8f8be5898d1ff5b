"""What a user sees while training: a progress bar or lines, metrics, compiles.

Process 0 shows a tqdm bar on a terminal, else a plain line every
`log_every` steps and one per evaluation. The numbers also go to the absl
log, TensorBoard and `<workdir>/metrics.jsonl` (appended on resume).
"""

import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

from absl import logging
import jax
import tqdm

from vit_jax.data import tf_import

tf = tf_import.import_tensorflow()

METRICS_FILE = 'metrics.jsonl'


def format_duration(seconds: float) -> str:
  """12m05s, or 1h02m05s."""
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def read_metrics(workdir: str,
                 last_step: Optional[int] = None) -> List[Dict[str, Any]]:
  """The records of `metrics.jsonl`, latest kept per (step, keys).

  `last_step` drops later records (of an earlier, longer attempt).
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  records = {}
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a line cut short by a kill
        continue
      if last_step is None or record['step'] <= last_step:
        records[(record['step'], tuple(sorted(record)))] = record
  return sorted(records.values(), key=lambda r: r['step'])


class Progress:
  """Step timing, the progress display and the metric writers.

  Speed counts from the end of the first step (compilation) and leaves out
  `paused()` blocks, so images/s and the ETA describe training alone.

  Attributes:
    images_per_s: the latest measured training speed, or None.
    is_chief: whether this process shows progress and writes files.
  """

  def __init__(self,
               workdir: str,
               *,
               total_steps: int,
               batch: int,
               start_step: int = 0,
               bar: Optional[bool] = None):
    self.is_chief = jax.process_index() == 0
    self._events = (
        tf.summary.create_file_writer(workdir) if self.is_chief else None)
    self._metrics = (
        open(os.path.join(workdir, METRICS_FILE), 'a')
        if self.is_chief else None)
    self._total = total_steps
    self._batch = batch
    self._t_start = time.time()
    self._t_last = None  # time of the last measurement point
    self._step_last = None
    self._postfix = {}
    self.images_per_s = None
    if bar is None:
      bar = sys.stdout.isatty()
    self._bar = None
    if bar and self.is_chief:
      self._bar = tqdm.tqdm(
          total=total_steps,
          initial=start_step,
          unit='step',
          dynamic_ncols=True,
          file=sys.stdout,
          smoothing=0.1)

  def first_step_done(self, step: int) -> None:
    """Call once after the first step has finished (blocked on)."""
    self._t_last, self._step_last = time.time(), step

  def step_done(self) -> None:
    """Advances the bar by one step (no device synchronisation)."""
    if self._bar is not None:
      self._bar.update(1)

  def log_train(self, step: int, loss: float, lr: float) -> None:
    now = time.time()
    eta = None
    if self._step_last is not None and step > self._step_last:
      seconds_per_step = (now - self._t_last) / (step - self._step_last)
      self.images_per_s = self._batch / seconds_per_step
      eta = seconds_per_step * (self._total - step)
    self._t_last, self._step_last = now, step
    scalars = {'train_loss': loss, 'learning_rate': lr}
    if self.images_per_s:
      scalars['img_per_sec'] = self.images_per_s
    self._write(step, scalars)
    if not self.is_chief:
      return
    if self._bar is not None:
      self._postfix['loss'] = f'{loss:.4f}'
      if self.images_per_s:
        self._postfix['img/s'] = f'{self.images_per_s:,.0f}'
      self._bar.set_postfix(self._postfix, refresh=True)
      return
    speed = (f'  {self.images_per_s:,.0f} img/s  ETA {format_duration(eta)}'
             if eta is not None else '')
    print(
        f'step {step:>{len(str(self._total))}}/{self._total}'
        f'  loss {loss:.4f}  lr {lr:.3g}{speed}',
        flush=True)

  def log_eval(self, step: int, accuracy: float) -> None:
    self._write(step, {'accuracy_test': accuracy})
    if not self.is_chief:
      return
    if self._bar is not None:
      self._postfix['test_acc'] = f'{accuracy:.4f}'
      self._bar.set_postfix(self._postfix, refresh=True)
    else:
      print(f'step {step}: test accuracy {accuracy:.4f}', flush=True)

  def log_scalars(self, step: int, scalars) -> None:
    """Other evaluations (e.g. few-shot accuracies): shown and written."""
    self._write(step, dict(scalars))
    if self.is_chief:
      text = '  '.join(f'{k} {v:.4f}' for k, v in sorted(scalars.items()))
      self.print(f'step {step}: {text}')

  def print(self, text: str) -> None:
    """A line on the console that does not break the bar."""
    if self._bar is not None:
      self._bar.write(text, file=sys.stdout)
    else:
      print(text, flush=True)

  def _write(self, step: int, scalars: Dict[str, float]) -> None:
    logging.info(
        '[%d] %s', step,
        ', '.join(f'{k}={float(v):.6g}' for k, v in sorted(scalars.items())))
    if self._events is not None:
      with self._events.as_default(step=step):
        for name, value in scalars.items():
          tf.summary.scalar(name, value)
    if self._metrics is not None:
      self._metrics.write(json.dumps({'step': step, **scalars}) + '\n')
      self._metrics.flush()

  def skip(self, seconds: float) -> None:
    """Leaves `seconds` out of the speed measurement."""
    if self._t_last is not None:
      self._t_last += seconds

  def paused(self) -> '_Pause':
    """`with progress.paused():` time that is not training."""
    return _Pause(self)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._metrics is not None:
      self._metrics.close()
      self._metrics = None
    if self._events is not None:
      self._events.close()
      self._events = None


class _Pause:

  def __init__(self, progress: Progress):
    self._progress = progress

  def __enter__(self):
    self._t = time.time()

  def __exit__(self, *exc):
    self._progress.skip(time.time() - self._t)


class CompileCounter:
  """Counts XLA compilations inside `with counter:` blocks."""

  _EVENT = '/jax/core/compile/backend_compile_duration'
  _active = []  # the counters whose block the program is in
  _listening = False

  def __init__(self):
    self.count = 0
    if not CompileCounter._listening:
      jax.monitoring.register_event_duration_secs_listener(
          CompileCounter._listen)
      CompileCounter._listening = True

  @staticmethod
  def _listen(event, duration, **kwargs):
    del duration, kwargs
    if event == CompileCounter._EVENT:
      for counter in CompileCounter._active:
        counter.count += 1

  def __enter__(self):
    CompileCounter._active.append(self)

  def __exit__(self, *exc):
    CompileCounter._active.remove(self)

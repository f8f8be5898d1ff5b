"""What a user sees while training: progress lines, metrics, compile counts.

Process 0 prints one line every `log_every` steps (step, loss, learning rate,
images/s, ETA) and the test accuracy after each evaluation; TensorBoard event
files (clu metric writers) get the same numbers in the workdir.
"""

import time
from absl import logging
from clu import metric_writers
import jax


def format_duration(seconds: float) -> str:
  """12m05s, or 1h02m05s."""
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class Progress:
  """Step timing, the progress line and TensorBoard scalars.

  Speed is measured from the end of the first step (which includes
  compilation) and excludes time spent in `paused()` blocks (evaluation,
  checkpoints), so images/s and the ETA describe training alone.

  Attributes:
    images_per_s: the latest measured training speed, or None.
  """

  def __init__(self, workdir: str, *, total_steps: int, batch: int):
    self.is_chief = jax.process_index() == 0
    self._writer = metric_writers.create_default_writer(
        workdir, just_logging=not self.is_chief)
    self._total = total_steps
    self._batch = batch
    self._t_start = time.time()
    self._t_last = None  # time of the last measurement point
    self._step_last = None
    self.images_per_s = None

  def first_step_done(self, step: int) -> None:
    """Call once after the first step has finished (blocked on)."""
    logging.info('First step (compilation included) took %.1fs.',
                 time.time() - self._t_start)
    self._t_last, self._step_last = time.time(), step

  def log_train(self, step: int, loss: float, lr: float) -> None:
    now = time.time()
    eta = None
    if self._step_last is not None and step > self._step_last:
      seconds_per_step = (now - self._t_last) / (step - self._step_last)
      self.images_per_s = self._batch / seconds_per_step
      eta = seconds_per_step * (self._total - step)
    self._t_last, self._step_last = now, step
    if self.is_chief:
      speed = (f'  {self.images_per_s:,.0f} img/s  ETA {format_duration(eta)}'
               if eta is not None else '')
      print(f'step {step:>{len(str(self._total))}}/{self._total}'
            f'  loss {loss:.4f}  lr {lr:.3g}{speed}', flush=True)
    scalars = {'train_loss': loss, 'learning_rate': lr}
    if self.images_per_s:
      scalars['img_per_sec'] = self.images_per_s
    self._writer.write_scalars(step, scalars)

  def log_eval(self, step: int, accuracy: float) -> None:
    if self.is_chief:
      print(f'step {step}: test accuracy {accuracy:.4f}', flush=True)
    self._writer.write_scalars(step, {'accuracy_test': accuracy})

  def log_scalars(self, step: int, scalars) -> None:
    """Other evaluations (e.g. few-shot accuracies): printed and written."""
    if self.is_chief:
      text = '  '.join(f'{k} {v:.4f}' for k, v in sorted(scalars.items()))
      print(f'step {step}: {text}', flush=True)
    self._writer.write_scalars(step, dict(scalars))

  def skip(self, seconds: float) -> None:
    """Leaves `seconds` out of the speed measurement."""
    if self._t_last is not None:
      self._t_last += seconds

  def paused(self) -> '_Pause':
    """`with progress.paused():` time that is not training."""
    return _Pause(self)

  def close(self) -> None:
    self._writer.flush()
    self._writer.close()


class _Pause:

  def __init__(self, progress: Progress):
    self._progress = progress

  def __enter__(self):
    self._t = time.time()

  def __exit__(self, *exc):
    self._progress.skip(time.time() - self._t)


class CompileCounter:
  """Counts XLA compilations that happen inside `with counter:` blocks.

  The original's step compiled twice (its first inputs were sharded unlike
  the step's outputs); summary.json reports the count so tests can pin it.
  """

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

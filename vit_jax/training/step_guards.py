"""What the train loop keeps per step: dropout keys and a NaN/inf guard."""

from typing import Any, Callable

import jax
import numpy as np

from vit_jax.checkpoints import train_checkpoint


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or inf."""


class StepKeys:
  """Dropout keys `fold_in(PRNGKey(seed), step)` as host arrays.

  Computed in chunks by one compiled function; a resumed run gets the same key
  for the same step.
  """

  CHUNK = 1024

  def __init__(self, seed: int):
    base = jax.random.PRNGKey(seed)
    self._fold = jax.jit(jax.vmap(lambda step: jax.random.fold_in(base, step)))
    self._start = None
    self._keys = None

  def __call__(self, step: int) -> np.ndarray:
    if self._start is None or not 0 <= step - self._start < self.CHUNK:
      self._start = step
      self._keys = np.asarray(
          self._fold(np.arange(step, step + self.CHUNK, dtype=np.uint32)))
    return self._keys[step - self._start]


class LossWatch:
  """Losses not yet read; raises `NonFiniteLossError` at the first NaN/inf.

  Losses are read (waiting for their step) only when logging or saving, and a
  checkpoint is written only after every earlier loss was finite.
  """

  def __init__(self, ckpts: train_checkpoint.TrainCheckpoints,
               scalar: Callable[[Any], float]):
    self._ckpts = ckpts
    self._scalar = scalar
    self._pending = []

  def add(self, step: int, loss_on_devices) -> None:
    self._pending.append((step, loss_on_devices))

  def check(self) -> None:
    for step, loss_on_devices in self._pending:
      loss = self._scalar(loss_on_devices)
      if not np.isfinite(loss):
        last = self._ckpts.latest_step()
        kept = (f'the last good checkpoint (step {last}) is kept in '
                f'{self._ckpts.directory} and nothing later was saved'
                if last is not None else
                'no checkpoint was saved before it, so the same command '
                'starts again from step 0')
        raise NonFiniteLossError(
            f'The training loss is {loss} at step {step}. Training stopped; '
            f'{kept}. Lower --config.base_lr, raise --config.warmup_steps, or '
            'set --config.grad_norm_clip.')
    self._pending.clear()

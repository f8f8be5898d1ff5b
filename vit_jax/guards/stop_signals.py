"""Ctrl-C (SIGINT) and SIGTERM stop a run after its current step.

The train loop checks `stop.received` after every step, saves and stops;
the process exits with 128 + the signal. A second Ctrl-C exits at once
(orbax's temporary step folders keep saved steps intact). Every process of
a multi-process run must get the signal, since saving is collective.
"""

import os
import signal
import sys
import threading
from typing import Optional

from vit_jax.parallel import supervisor

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
NAMES = {signal.SIGINT: 'Ctrl-C', signal.SIGTERM: 'SIGTERM'}


def exit_code(name: str) -> int:
  """The exit status of a run stopped by `name` ('Ctrl-C', 'SIGTERM')."""
  return {NAMES[s]: code for s, code in EXIT_CODES.items()}[name]


class Stopped(BaseException):
  """A stop signal outside the train loop; not an `Exception`, so no handler
  takes it for an error.
  """

  def __init__(self, signum: int):
    super().__init__(NAMES[signum])
    self.signum = signum


def raise_when_stopped() -> None:
  """Makes Ctrl-C and SIGTERM raise `Stopped` until a StopSignals block."""

  def handle(signum, frame):
    del frame
    raise Stopped(signum)

  if threading.current_thread() is threading.main_thread():
    for sig in EXIT_CODES:
      signal.signal(sig, handle)


class StopSignals:
  """Turns SIGINT and SIGTERM into a request to stop after the step.

  Attributes:
    received: the first signal's number, or None.
    saving: the step being checkpointed (set by the train loop), or None.
  """

  def __init__(self, checkpoint_dir: Optional[str] = None):
    self.received = None
    self.saving = None
    self._workdir = (
        os.path.dirname(checkpoint_dir) if checkpoint_dir else None)
    self._previous = {}

  @property
  def name(self) -> Optional[str]:
    return NAMES.get(self.received)

  @property
  def exit_code(self) -> int:
    return EXIT_CODES.get(self.received, 0)

  def __enter__(self):
    # Signal handlers can only be installed from the main thread.
    if threading.current_thread() is threading.main_thread():
      for sig in EXIT_CODES:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.received is None:  # the loop reports it (no I/O in a handler)
      self.received = signum
      return
    if signum == signal.SIGINT:
      self._stop_now()

  def _stop_now(self) -> None:
    """The second Ctrl-C: one line, then exit 130 without waiting."""
    steps = supervisor.complete_steps(self._workdir) if self._workdir else []
    kept = (f'step {steps[-1]} on disk is intact'
            if steps else 'no checkpoint is on disk yet')
    doing = (f' while saving checkpoint step {self.saving}: stopped at '
             'once, without that step'
             if self.saving is not None else ': stopped at once')
    print(
        f'\nCtrl-C again{doing}; {kept}. Run the same command to resume.',
        file=sys.stderr,
        flush=True)
    supervisor.exit_now(EXIT_CODES[signal.SIGINT])

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)

"""Train-state checkpoints for resuming a run (orbax).

These hold everything a run needs to continue bit for bit: parameters and
optimizer state, keyed by the number of updates done. Data order and dropout
randomness are functions of (seed, step), so nothing else is stored. The
exchange format for trained models is the released `.npz` (`checkpoint.save`);
`vit_jax.interop.export` turns the latest train state into one.

orbax writes each step into a temporary folder and renames it when complete,
so a run killed mid-save (kill -9, preemption) leaves the previous checkpoint
intact; `save` also refuses a state with NaN/inf values.
"""

import contextlib
import functools
import os
import shutil
import signal
import sys
import threading
from typing import Any, Optional

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from vit_jax.training import weight_ema

# The folder under the workdir that holds the numbered steps.
CHECKPOINT_SUBDIR = 'checkpoints'
# Beside it: steps that could not be read, moved there and never deleted.
UNREADABLE_SUBDIR = 'checkpoints_unreadable'
# In the names of orbax's temporary folders (`<step>.orbax-checkpoint-tmp-*`).
_TMP_MARKER = '.orbax-checkpoint-tmp'


class NonFiniteStateError(FloatingPointError):
  """A train state with NaN or inf values, which is never checkpointed."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


def first_non_finite(tree: Any) -> Optional[str]:
  """Path of the first floating leaf holding NaN or inf, else None."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    leaf = np.asarray(leaf)
    if np.issubdtype(leaf.dtype, np.inexact) or leaf.dtype.name == 'bfloat16':
      if not np.all(np.isfinite(leaf.astype(np.float32))):
        return jax.tree_util.keystr(path)
  return None


def _path_name(path) -> str:
  """'params/head/kernel' for a key path, whatever its containers: the same
  for a NamedTuple field and the dict orbax saves it as."""
  names = (getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))
           for k in path)
  return '/'.join(map(str, names))


def _shape(x) -> tuple:
  return tuple(x.shape) if hasattr(x, 'shape') else np.shape(x)


def tree_mismatch(got: Any, want: Any) -> Optional[str]:
  """Describes the first difference in structure or shapes, else None."""
  got_flat = {_path_name(p): _shape(x)
              for p, x in jax.tree_util.tree_leaves_with_path(got)}
  want_flat = {_path_name(p): _shape(x)
               for p, x in jax.tree_util.tree_leaves_with_path(want)}
  for key in sorted(set(got_flat) | set(want_flat)):
    if key not in got_flat:
      return f'{key} missing from the checkpoint'
    if key not in want_flat:
      return f'{key} in the checkpoint but not in the model'
    if got_flat[key] != want_flat[key]:
      return (f'{key} has shape {got_flat[key]} in the checkpoint, '
              f'{want_flat[key]} in the model')
  return None


def _remove_unfinished_saves(directory: str) -> None:
  """Deletes the temporary folders of saves that a kill interrupted.

  orbax ignores them when listing steps; this only reclaims the space. Done
  here, synchronously, rather than by orbax's `cleanup_tmp_directories`,
  whose background thread can outlive a run that stops at once on bad input.
  """
  if not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if _TMP_MARKER in name:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _drop_closed_loop_errors(previous_hook, unraisable) -> None:
  if not (isinstance(unraisable.exc_value, RuntimeError) and
          str(unraisable.exc_value) == 'Event loop is closed'):
    previous_hook(unraisable)


@contextlib.contextmanager
def _quiet_aborted_reads():
  """Drops the "Event loop is closed" errors of an aborted read.

  When one file of a step cannot be read, orbax gives up on the step while
  the reads of the other files are still in flight; they complete later on
  an event loop orbax has closed and print one traceback each. The caller
  reports the unreadable step itself, so those are dropped, from the start of
  a read that fails for the rest of the process.
  """
  previous = sys.unraisablehook
  sys.unraisablehook = functools.partial(_drop_closed_loop_errors, previous)
  yield
  sys.unraisablehook = previous  # not reached when the restore failed


class TrainCheckpoints:
  """Numbered train states in `<workdir>/checkpoints/<step>`.

  All processes of a multi-process run must call `save` and `restore`
  together; orbax writes the files once.

  Attributes:
    directory: the checkpoint folder.
  """

  def __init__(self, workdir: str, *, max_to_keep: Optional[int] = 2):
    self.directory = checkpoint_dir(workdir)
    if jax.process_index() == 0:
      _remove_unfinished_saves(self.directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            # Synchronous: when `save` returns the step is on disk, so a
            # SIGTERM handler or a NaN check after it can rely on it.
            enable_async_checkpointing=False),
        item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self) -> Optional[int]:
    """The newest complete step, or None if there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list:
    """The complete steps on disk, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    """Writes `state` (a pytree of host arrays) as `step`.

    Args:
      step: updates done.
      state: e.g. {'params': ..., 'opt_state': ...} as numpy arrays.

    Raises:
      NonFiniteStateError: `state` holds NaN/inf; nothing is written and the
        previous checkpoints stay as they are.
    """
    bad = first_non_finite(state)
    if bad is not None:
      raise NonFiniteStateError(
          f'Refusing to checkpoint step {step}: {bad} holds NaN/inf. The last '
          f'good checkpoint (step {self.latest_step()}) is kept.')
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, template: Any) -> Any:
    """Reads `step` into the structure and dtypes of `template`."""
    with _quiet_aborted_reads():
      return self._manager.restore(
          step, args=ocp.args.StandardRestore(template))

  def saved_shapes(self, step: int) -> Any:
    """The tree of `jax.ShapeDtypeStruct`s saved as `step`, read from its
    metadata alone (no array data)."""
    with _quiet_aborted_reads():
      tree = self._manager.item_metadata(step)
    return jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)

  def move_aside(self, step: int) -> str:
    """Moves `step` out of the checkpoint folder, into
    `<workdir>/checkpoints_unreadable/`, and returns where it went.

    For a step that cannot be read: the run goes on from the step before,
    and the files stay for inspection (nothing is deleted).
    """
    root = os.path.join(os.path.dirname(self.directory), UNREADABLE_SUBDIR)
    dest = os.path.join(root, str(step))
    n = 1
    while os.path.exists(dest):
      dest, n = os.path.join(root, f'{step}.{n}'), n + 1
    if jax.process_index() == 0:
      os.makedirs(root, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'move_aside_{step}')
    self._manager.reload()
    return dest

  def restore_params(self, step: Optional[int] = None) -> Any:
    """The parameters of `step` (default: the latest) as numpy arrays: their
    average where the run kept one (`weight_ema.checkpoint_params`)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(
          f'No train checkpoint in {self.directory!r}; train first with '
          'python -m vit_jax.main --config=... --workdir=<that workdir>.')
    state = self._manager.restore(step, args=ocp.args.StandardRestore())
    return jax.tree_util.tree_map(np.asarray,
                                  weight_ema.checkpoint_params(state))

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class SigtermFlag:
  """`with SigtermFlag() as f:` f.received turns True on SIGTERM (preemption).

  The training loop checks it after every step, saves a checkpoint and
  stops; the same command then resumes. In a multi-process run every process
  must receive the signal (as cluster schedulers send it), since saving is a
  collective operation.
  """

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    # Signal handlers can only be installed from the main thread.
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint after the current step.')
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

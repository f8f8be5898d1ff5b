"""Train-state checkpoints for resuming a run (orbax).

These hold everything a run needs to continue bit for bit: parameters and
optimizer state, keyed by the number of updates done. Data order and dropout
randomness are functions of (seed, step), so nothing else is stored. The
exchange format for trained models is the released `.npz` (`checkpoint.save`);
`vit_jax.checkpoints.export` turns the latest train state into one, reading its
parameters (or their average) one leaf at a time (`iter_params`) and nothing
else of the optimizer state.

Saves are asynchronous: `save` returns once the state is copied off the
devices, and the files are written while training goes on. A sharded state
(global `jax.Array`s of `sharding.FsdpRunner`) is written shard by shard, each
process writing the shards it holds, and read back into whatever layout the
restore template names (another device count, process count, or pmap's
replicated numpy arrays). orbax writes each step into a temporary folder and
renames it when complete, so a run killed mid-save (kill -9, preemption)
leaves the previous checkpoint intact; `save` also refuses a state with
NaN/inf values, checked on the devices.
"""

import contextlib
import functools
import os
import shutil
import sys
from typing import (Any, Callable, Dict, Iterator, NamedTuple, Optional,
                    Sequence, Tuple)

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vit_jax.guards import disk_space
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


@jax.jit
def _finite_flags(leaves: list) -> jax.Array:
  """One bool per leaf: no NaN/inf in it. A single reduction on the devices
  that hold the leaves, whatever their sharding."""
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def first_non_finite(tree: Any) -> Optional[str]:
  """Path of the first floating leaf holding NaN or inf, else None.

  The leaves may be numpy arrays or `jax.Array`s of any sharding, also
  spread over several processes (all of which must call this together); the
  check runs where they are and only one bool per leaf comes back.
  """
  floating = [(path, leaf) for path, leaf
              in jax.tree_util.tree_leaves_with_path(tree)
              if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  if not floating:
    return None
  flags = _finite_flags([leaf for _, leaf in floating])
  if not flags.is_fully_addressable:  # a reduction's result is replicated
    flags = flags.addressable_shards[0].data
  bad = np.flatnonzero(~np.asarray(flags))
  return jax.tree_util.keystr(floating[bad[0]][0]) if bad.size else None


def _host_template(shapes: Any) -> Any:
  """Restore-template leaves that make orbax return numpy arrays, whatever
  layout the step was saved from: zero-strided arrays, so no memory."""
  return jax.tree_util.tree_map(
      lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), shapes)


def _path_keys(path) -> Tuple[str, ...]:
  """('params', 'head', 'kernel') for a key path, whatever its containers:
  the same for a NamedTuple field and the dict orbax saves it as."""
  return tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
               for k in path)


def _path_name(path) -> str:
  """'params/head/kernel' for a key path (`_path_keys` joined)."""
  return '/'.join(_path_keys(path))


class _SavedLeaf(NamedTuple):
  """Where a leaf lies in a saved state (its keys), and its shape and dtype."""
  keys: Tuple[str, ...]
  shape: jax.ShapeDtypeStruct


def _nest(keys: Sequence[str], leaf: Any) -> dict:
  """{keys[0]: {keys[1]: ... leaf}}: a restore item of one leaf."""
  for key in reversed(keys):
    leaf = {key: leaf}
  return leaf


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
  together; orbax writes the files once. A step being written counts as
  saved (`latest_step`, `all_steps`): it completes unless the process dies,
  and `close` waits for it.

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
            max_to_keep=max_to_keep, enable_async_checkpointing=True),
        item_handlers=ocp.StandardCheckpointHandler())
    self._reader = None  # For `iter_params`, made on first use.
    self._writing = None  # the step of the newest save started
    self._failed = False
    self.expected_bytes = 0  # the size of one step (`check_room`)

  def latest_step(self) -> Optional[int]:
    """The newest step saved (or being written), or None if there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list:
    """The steps saved (or being written), oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any,
           to_write: Optional[Callable[[Any], Any]] = None) -> None:
    """Starts writing `state` as `step` and returns before it is on disk.

    Waits for the previous save first, and copies `state` off the devices
    before returning, so the caller may overwrite or donate its arrays.

    Args:
      step: updates done.
      state: e.g. {'params': ..., 'opt_state': ...}: numpy arrays (the same
        on every process; process 0 writes them) or global `jax.Array`s
        (each process writes the shards it holds, never the whole state).
        Checked for NaN/inf where it is (`first_non_finite`).
      to_write: what is written instead of `state` itself, computed from
        it after the check (pmap: one replica as numpy arrays).

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
    if to_write is not None:
      state = to_write(state)
    with self._disk_errors():
      self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self._writing = step

  def wait_until_finished(self) -> None:
    """Returns when the step being written, if any, is on disk."""
    with self._disk_errors():
      self._manager.wait_until_finished()

  def check_save(self) -> None:
    """Raises at once if the save being written has failed (orbax writes in
    the background; the train loop calls this after every step)."""
    with self._disk_errors():
      self._manager.check_for_errors()

  def check_room(self, state: Any, start_step: int, config: Any) -> None:
    """Before a run's first save: raises `disk_space.DiskSpaceError` if the
    folder cannot take `state`."""
    self.expected_bytes = sum(int(x.nbytes)
                              for x in jax.tree_util.tree_leaves(state))
    every, total = config.checkpoint_every, config.total_steps
    step = min(total, every * (start_step // every + 1))
    if (jax.process_index() == 0 and '://' not in self.directory and
        start_step < total):
      disk_space.check_room(self.directory, self.expected_bytes,
                            self.complete_steps(), step)

  def complete_steps(self) -> list:
    """The steps whose folders are completely written, oldest first."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())

  @contextlib.contextmanager
  def _disk_errors(self):
    """A save that failed on the disk (full, quota, read-only) becomes
    `disk_space.DiskSpaceError`; its unfinished folder is removed."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      code = disk_space.disk_errno(e)
      if code is None or self._failed:
        raise
      self._failed = True
      if jax.process_index() == 0:
        _remove_unfinished_saves(self.directory)
      steps = [s for s in self.complete_steps() if s != self._writing]
      need = max(self.expected_bytes, disk_space.tree_bytes(os.path.join(
          self.directory, str(steps[-1]))) if steps else 0)
      raise disk_space.DiskSpaceError(code, disk_space.message(
          self.directory, step=self._writing, need=need, steps=steps,
          code=code)) from e

  def restore(self, step: int, template: Any) -> Any:
    """Reads `step` into the structure, dtypes and layout of `template`.

    Args:
      step: a saved step.
      template: numpy leaves read as numpy arrays (every process reads the
        whole state); `jax.ShapeDtypeStruct` leaves with a `sharding` read as
        `jax.Array`s of that sharding, each process reading only its shards,
        whatever layout the step was saved from.

    Returns:
      The state, with `template`'s structure.
    """
    self._manager.wait_until_finished()
    with _quiet_aborted_reads():
      return self._manager.restore(
          step, args=ocp.args.StandardRestore(template))

  def saved_shapes(self, step: int) -> Any:
    """The tree of `jax.ShapeDtypeStruct`s saved as `step`, read from its
    metadata alone (no array data)."""
    self._manager.wait_until_finished()
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

  def _step_or_latest(self, step: Optional[int]) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(
          f'No train checkpoint in {self.directory!r}; train first with '
          'python -m vit_jax.main --config=... --workdir=<that workdir>.')
    return step

  def restore_params(self, step: Optional[int] = None) -> Any:
    """The parameters of `step` (default: the latest) as numpy arrays: their
    average where the run kept one (`weight_ema.checkpoint_params`)."""
    step = self._step_or_latest(step)
    state = self.restore(step, _host_template(self.saved_shapes(step)))
    return jax.tree_util.tree_map(np.asarray,
                                  weight_ema.checkpoint_params(state))

  def _saved_params(self, step: int) -> Dict[str, _SavedLeaf]:
    """{'head/kernel': _SavedLeaf, ...}: where each of `restore_params`'s
    leaves lies in the saved state, from its metadata alone."""
    saved = jax.tree_util.tree_map_with_path(
        lambda path, s: _SavedLeaf(_path_keys(path), s),
        self.saved_shapes(step))
    return flax.traverse_util.flatten_dict(
        weight_ema.checkpoint_params(saved), sep='/')

  def param_shapes(self, step: Optional[int] = None
                   ) -> Dict[str, jax.ShapeDtypeStruct]:
    """{'head/kernel': shape, ...} of `restore_params(step)`, in the order
    `iter_params` yields them, read from the metadata alone."""
    return {name: leaf.shape for name, leaf
            in self._saved_params(self._step_or_latest(step)).items()}

  def iter_params(self, step: Optional[int] = None
                  ) -> Iterator[Tuple[str, np.ndarray]]:
    """Yields ('head/kernel', array) for each of `restore_params(step)`'s
    leaves, read from the files one at a time.

    Each read restores that one leaf (orbax's partial restore), whole and as
    a numpy array, whatever layout it was saved from; the optimizer state is
    never read, apart from the average of the weights that replaces the
    parameters where the run kept one. All processes of a multi-process run
    must iterate together (each read is collective); each reads every leaf.
    """
    step = self._step_or_latest(step)
    directory = os.path.join(self.directory, str(step),
                             ocp.checkpoint_manager.DEFAULT_ITEM_NAME)
    for name, leaf in self._saved_params(step).items():
      restored = self._read_leaves(
          directory, _nest(leaf.keys, _host_template(leaf.shape)))
      for key in leaf.keys:
        restored = restored[key]
      yield name, restored
      del restored  # Not held while the next leaf is read.

  def _read_leaves(self, directory: str, item: Any) -> Any:
    """Reads the leaves of `item`, a part of the saved tree, and no others."""
    if self._reader is None:
      self._reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    with _quiet_aborted_reads():
      return self._reader.restore(directory, args=ocp.args.PyTreeRestore(
          item=item,
          restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))

  def close(self) -> None:
    try:
      self._manager.wait_until_finished()
      self._manager.close()
    except Exception:  # pylint: disable=broad-except
      if not self._failed:  # a failed save was reported already
        raise
    if self._reader is not None:
      self._reader.close()


"""Train-state checkpoints for resuming a run (orbax).

A step holds parameters and optimizer state; data order and dropout are
functions of (seed, step), so that is all a run needs to continue bit for
bit. Saves are asynchronous and atomic (orbax renames a temporary folder when
complete); sharded states are written shard by shard and read back into any
layout. `vit_jax.checkpoints.export` turns a step into a released-style `.npz`.
"""

import contextlib
import functools
import os
import shutil
import sys
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
)

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
  """One bool per leaf: no NaN/inf in it (one reduction on the devices)."""
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def first_non_finite(tree: Any) -> Optional[str]:
  """Path of the first floating leaf holding NaN or inf, else None.

  Leaves may be numpy or sharded `jax.Array`s (then every process must call
  this); the check runs where they are.
  """
  floating = [(path, leaf)
              for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
              if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  if not floating:
    return None
  flags = _finite_flags([leaf for _, leaf in floating])
  if not flags.is_fully_addressable:  # a reduction's result is replicated
    flags = flags.addressable_shards[0].data
  bad = np.flatnonzero(~np.asarray(flags))
  return jax.tree_util.keystr(floating[bad[0]][0]) if bad.size else None


# iter_params reads leaves together up to this many bytes: a partial
# restore costs tens of milliseconds, whatever its size.
READ_GROUP_BYTES = 64 << 20


def _host_template(shapes: Any) -> Any:
  """Zero-strided numpy leaves: orbax then restores numpy arrays."""
  return jax.tree_util.tree_map(
      lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), shapes)


def _path_keys(path) -> Tuple[str, ...]:
  """('params', 'head', 'kernel') for a key path, whatever its containers."""
  return tuple(
      str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
      for k in path)


def _path_name(path) -> str:
  """'params/head/kernel' for a key path (`_path_keys` joined)."""
  return '/'.join(_path_keys(path))


class _SavedLeaf(NamedTuple):
  """Where a leaf lies in a saved state (its keys), and its shape and dtype."""
  keys: Tuple[str, ...]
  shape: jax.ShapeDtypeStruct


def _read_groups(leaves, budget: int):
  """Runs of consecutive (name, _SavedLeaf) of at most `budget` bytes each;
  a larger leaf is a run of its own."""
  group, size = [], 0
  for name, leaf in leaves:
    nbytes = int(np.prod(leaf.shape.shape)) * np.dtype(
        leaf.shape.dtype).itemsize
    if group and size + nbytes > budget:
      yield group
      group, size = [], 0
    group.append((name, leaf))
    size += nbytes
  if group:
    yield group


def _restore_item(leaves) -> dict:
  """The nested restore item of some saved leaves, and of no others."""
  item = {}
  for _, leaf in leaves:
    node = item
    for key in leaf.keys[:-1]:
      node = node.setdefault(key, {})
    node[leaf.keys[-1]] = _host_template(leaf.shape)
  return item


def _pop(tree: dict, keys: Sequence[str]) -> Any:
  """Removes and returns tree[keys[0]][keys[1]]...."""
  for key in keys[:-1]:
    tree = tree[key]
  return tree.pop(keys[-1])


def _shape(x) -> tuple:
  return tuple(x.shape) if hasattr(x, 'shape') else np.shape(x)


def tree_mismatch(got: Any, want: Any) -> Optional[str]:
  """Describes the first difference in structure or shapes, else None."""
  got_flat = {
      _path_name(p): _shape(x)
      for p, x in jax.tree_util.tree_leaves_with_path(got)
  }
  want_flat = {
      _path_name(p): _shape(x)
      for p, x in jax.tree_util.tree_leaves_with_path(want)
  }
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

  Done synchronously: orbax's own cleanup thread can outlive a run that
  stops at once.
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
  """Drops the "Event loop is closed" errors of an aborted orbax read.

  When one file of a step cannot be read, the other reads complete later on a
  closed loop and print tracebacks; the caller reports the step itself.
  """
  previous = sys.unraisablehook
  sys.unraisablehook = functools.partial(_drop_closed_loop_errors, previous)
  yield
  sys.unraisablehook = previous  # not reached when the restore failed


class TrainCheckpoints:
  """Numbered train states in `<workdir>/checkpoints/<step>`.

  All processes must call `save` and `restore` together. A step being written
  counts as saved; `close` waits for it.
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

  def save(self,
           step: int,
           state: Any,
           to_write: Optional[Callable[[Any], Any]] = None) -> None:
    """Starts writing `state` as `step` and returns before it is on disk.

    Waits for the previous save and copies `state` off the devices first.
    `state` holds numpy arrays (the same on every process) or global
    `jax.Array`s (each process writes its shards). `to_write`, if given, maps
    the checked state to what is written.

    Raises:
      NonFiniteStateError: `state` holds NaN/inf; nothing is written.
      disk_space.DiskSpaceError: one process, and the disk cannot take one
        more checkpoint; nothing is written.
    """
    bad = first_non_finite(state)
    if bad is not None:
      raise NonFiniteStateError(
          f'Refusing to checkpoint step {step}: {bad} holds NaN/inf. The last '
          f'good checkpoint (step {self.latest_step()}) is kept.')
    if step in self._manager.all_steps():
      return
    self._check_room_before_save(step)
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
    """Raises at once if the background save has failed."""
    with self._disk_errors():
      self._manager.check_for_errors()

  def check_room(self, state: Any, start_step: int, config: Any) -> None:
    """Raises `disk_space.DiskSpaceError` if the folder cannot take `state`."""
    self.expected_bytes = sum(
        int(x.nbytes) for x in jax.tree_util.tree_leaves(state))
    every, total = config.checkpoint_every, config.total_steps
    step = min(total, every * (start_step // every + 1))
    if (jax.process_index() == 0 and '://' not in self.directory and
        start_step < total):
      disk_space.check_room(self.directory, self.expected_bytes,
                            self.complete_steps(), step)

  def _check_room_before_save(self, step: int) -> None:
    """Stops a one-process run at `step` if the disk cannot take one more
    checkpoint (the size of the newest one on disk, or `expected_bytes`)."""
    if jax.process_count() > 1 or '://' in self.directory:
      return  # all processes must agree; the failed write is reported
    steps = self.complete_steps()
    newest = os.path.join(self.directory, str(steps[-1])) if steps else None
    need = max(self.expected_bytes,
               disk_space.tree_bytes(newest) if newest else 0)
    disk_space.check_room(self.directory, need, steps, step)

  def complete_steps(self) -> list:
    """The steps whose folders are completely written, oldest first."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())

  @contextlib.contextmanager
  def _disk_errors(self):
    """Turns a failed save (disk full, quota, read-only) into
    `disk_space.DiskSpaceError`, removing its unfinished folder."""
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
      need = max(
          self.expected_bytes,
          disk_space.tree_bytes(os.path.join(self.directory, str(steps[-1])))
          if steps else 0)
      raise disk_space.DiskSpaceError(
          code,
          disk_space.message(
              self.directory,
              step=self._writing,
              need=need,
              steps=steps,
              code=code)) from e

  def restore(self, step: int, template: Any) -> Any:
    """Reads `step` into the structure, dtypes and layout of `template`.

    Numpy leaves are read whole; `jax.ShapeDtypeStruct` leaves with a
    `sharding` come back as `jax.Array`s, each process reading its shards.
    """
    self._manager.wait_until_finished()
    with _quiet_aborted_reads():
      return self._manager.restore(
          step, args=ocp.args.StandardRestore(template))

  def saved_shapes(self, step: int) -> Any:
    """`jax.ShapeDtypeStruct`s of `step`, from its metadata alone."""
    self._manager.wait_until_finished()
    with _quiet_aborted_reads():
      tree = self._manager.item_metadata(step)
    return jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)

  def move_aside(self, step: int) -> str:
    """Moves an unreadable `step` to `<workdir>/checkpoints_unreadable/`;
    returns where it went."""
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
    """The parameters of `step` (default: latest) as numpy; their average
    where the run kept one (`weight_ema.checkpoint_params`)."""
    step = self._step_or_latest(step)
    state = self.restore(step, _host_template(self.saved_shapes(step)))
    return jax.tree_util.tree_map(np.asarray,
                                  weight_ema.checkpoint_params(state))

  def _saved_params(self, step: int) -> Dict[str, _SavedLeaf]:
    """{'head/kernel': _SavedLeaf}: where `restore_params`'s leaves lie."""
    saved = jax.tree_util.tree_map_with_path(
        lambda path, s: _SavedLeaf(_path_keys(path), s),
        self.saved_shapes(step))
    return flax.traverse_util.flatten_dict(
        weight_ema.checkpoint_params(saved), sep='/')

  def param_shapes(self,
                   step: Optional[int] = None
                  ) -> Dict[str, jax.ShapeDtypeStruct]:
    """{'head/kernel': shape} of `restore_params(step)`, from metadata."""
    return {
        name: leaf.shape for name, leaf in self._saved_params(
            self._step_or_latest(step)).items()
    }

  def iter_params(self,
                  step: Optional[int] = None
                 ) -> Iterator[Tuple[str, np.ndarray]]:
    """Yields ('head/kernel', numpy array) of `restore_params(step)`.

    Leaves are read in runs of at most `READ_GROUP_BYTES` (orbax partial
    restores; a larger leaf alone) and let go of once yielded; the optimizer
    state is not read. All processes must iterate together.
    """
    step = self._step_or_latest(step)
    directory = os.path.join(self.directory, str(step),
                             ocp.checkpoint_manager.DEFAULT_ITEM_NAME)
    for group in _read_groups(
        self._saved_params(step).items(), READ_GROUP_BYTES):
      restored = self._read_leaves(directory, _restore_item(group))
      for name, leaf in group:
        # Popped: not held by the group while the caller works on it.
        yield name, _pop(restored, leaf.keys)
      del restored  # Not held while the next group is read.

  def _read_leaves(self, directory: str, item: Any) -> Any:
    """Reads the leaves of `item`, a part of the saved tree, and no others."""
    if self._reader is None:
      self._reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    with _quiet_aborted_reads():
      return self._reader.restore(
          directory,
          args=ocp.args.PyTreeRestore(
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

"""A checkpoint that does not fit on its disk: one paragraph, at the save.

`check_room` runs before the first save; `explain` turns a save that failed
on the disk into `DiskSpaceError`, naming the folder, free space, checkpoint
size, newest intact step and the command to resume.
"""

import errno
import os
import shutil
from typing import Optional, Sequence

_ERRNOS = {
    errno.ENOSPC: 'the disk is full',
    errno.EDQUOT: 'the disk quota is used up',
    errno.EROFS: 'the file system is read-only',
    errno.EACCES: 'the folder cannot be written'
}
# How the same errors read in the messages of the C++ writers (tensorstore).
_WORDS = {
    'No space left': errno.ENOSPC,
    'quota': errno.EDQUOT,
    'Read-only file system': errno.EROFS,
    'Permission denied': errno.EACCES,
    'RESOURCE_EXHAUSTED: Error writing': errno.ENOSPC
}


class DiskSpaceError(OSError):
  """A checkpoint could not be written for lack of space or permission."""

  def __init__(self, code: int, text: str):
    super().__init__(text)
    self.code = code


def format_bytes(n: float) -> str:
  for unit in ('bytes', 'kB', 'MB', 'GB'):
    if n < 1000 or unit == 'GB':
      return f'{n:.0f} {unit}' if unit == 'bytes' else f'{n:.1f} {unit}'
    n /= 1000
  return ''


def free_bytes(path: str) -> int:
  """Bytes an unprivileged writer may still use on `path`'s file system."""
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def tree_bytes(path: str) -> int:
  """Bytes a folder takes on disk (allocated blocks)."""
  total = 0
  for root, _, names in os.walk(path):
    for name in names:
      try:
        total += os.lstat(os.path.join(root, name)).st_blocks * 512
      except OSError:
        pass
  return total


def disk_errno(error: BaseException) -> Optional[int]:
  """The errno of a disk problem in `error` or its causes, else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _ERRNOS:
      return error.errno
    for words, code in _WORDS.items():
      if words in str(error):
        return code
    error = error.__cause__ or error.__context__
  return None


def message(directory: str,
            *,
            step: int,
            need: int,
            steps: Sequence[int],
            code: int,
            command: str = 'the same command') -> str:
  """The paragraph of a checkpoint that does not fit or cannot be written."""
  newest = (f'The newest intact checkpoint is step {steps[-1]}' if steps else
            'No checkpoint was saved before it (a new start begins at step 0)')
  return (f'Checkpoint step {step} cannot be written to {directory}: '
          f'{_ERRNOS[code]} ({format_bytes(free_bytes(directory))} free; '
          f'one checkpoint of this run takes about {format_bytes(need)}). '
          f'{newest}. Free some space (or give the run a --workdir on a disk '
          f'with room, or write access), then run {command} to resume.')


def check_room(directory: str, need: int, steps: Sequence[int],
               step: int) -> None:
  """Raises DiskSpaceError if `directory` cannot take `need` bytes as `step`."""
  os.makedirs(directory, exist_ok=True)
  code = None
  if not os.access(directory, os.W_OK):
    code = errno.EROFS if _read_only(directory) else errno.EACCES
  elif free_bytes(directory) < need:
    code = errno.ENOSPC
  if code is not None:
    raise DiskSpaceError(
        code, message(directory, step=step, need=need, steps=steps, code=code))


def _read_only(path: str) -> bool:
  return bool(os.statvfs(path).f_flag & os.ST_RDONLY)

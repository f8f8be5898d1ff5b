"""One run per workdir: a lock file that names the run holding it.

`hold` keeps an exclusive `flock` on `<workdir>/.run.lock`, which records
host, PID, start time and command. The kernel drops the lock when its
process ends, so a file left by a dead run is taken over.
"""

import contextlib
import fcntl
import functools
import json
import os
import socket
import sys
import time
from typing import Iterator, Optional

from vit_jax.parallel import supervisor
from vit_jax.run_config import errors

LOCK_FILE = '.run.lock'


class WorkdirInUseError(errors.ConfigError):
  """Another run holds the workdir's lock."""


def _read(fd: int) -> Optional[dict]:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 1 << 16).decode('utf-8', 'replace')
  try:
    return json.loads(text) if text.strip() else None
  except ValueError:
    return {'text': text.strip()[:200]}


def describe(info: Optional[dict]) -> str:
  """'PID 12 on host h, started 2024-01-02 03:04:05 (python -m ...)'."""
  if not info:
    return 'a run that wrote no details'
  if 'pid' not in info:
    return f'a run that wrote {info.get("text")!r}'
  started = time.strftime('%Y-%m-%d %H:%M:%S',
                          time.localtime(info.get('started', 0)))
  return (f'PID {info["pid"]} on host {info.get("host")}, started {started} '
          f'({info.get("command", "")})')


def _open_locked(path: str, workdir: str) -> int:
  """A descriptor of `path` holding its flock; raises if another holds it."""
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      info = _read(fd)
      os.close(fd)
      pid = info.get('pid') if info else None
      stop = (f'stop it (Ctrl-C, or kill -TERM {pid}: it saves a checkpoint '
              'and the same command resumes)' if pid else 'stop it')
      raise WorkdirInUseError(
          f'--workdir={workdir} is in use by another run: {describe(info)}. '
          'Two runs in one workdir would overwrite each other\'s '
          f'checkpoints and summary.json. Wait for it to finish, {stop}, or '
          f'choose another --workdir. (The lock is {path}.)') from None
    try:  # the file a finishing run removed after we opened it: again
      if os.fstat(fd).st_ino == os.stat(path).st_ino:
        return fd
    except FileNotFoundError:
      pass
    os.close(fd)


@contextlib.contextmanager
def hold(workdir: str, command: str) -> Iterator[str]:
  """Holds `<workdir>/.run.lock` for the block; yields its path.

  Raises:
    WorkdirInUseError: a live run holds it.
  """
  path = os.path.join(workdir, LOCK_FILE)
  fd = _open_locked(path, workdir)
  release = functools.partial(_release, path, fd)
  supervisor.BEFORE_EXIT_NOW.append(release)
  try:
    previous = _read(fd)
    if previous:
      message = (f'Taking over the lock of a run that is gone: '
                 f'{describe(previous)} ended without releasing {path} '
                 '(kill -9, a crash or a reboot).')
      print(message, file=sys.stderr, flush=True)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(
        fd,
        json.dumps(
            dict(
                host=socket.gethostname(),
                pid=os.getpid(),
                started=time.time(),
                command=command)).encode())
    os.fsync(fd)
    yield path
  finally:
    supervisor.BEFORE_EXIT_NOW.remove(release)
    release()


def _release(path: str, fd: int) -> None:
  with contextlib.suppress(OSError):
    os.remove(path)
  os.close(fd)

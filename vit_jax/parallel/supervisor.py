"""Multi-process runs: one paragraph when a process dies or cannot be reached.

When a peer dies, JAX's distributed runtime aborts the survivors natively,
beyond Python's reach. So `vit_jax.main` runs each process as a worker child
(native stderr to the log file) and this supervisor, when the worker dies of
a signal or abort, prints which process was lost, the newest complete
checkpoint and the command to resume. A worker that sees a collective fail
says so itself and exits at once (`exit_now`).
"""

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional, Sequence

# In a worker's environment: the supervisor's console, as a file descriptor.
CONSOLE_FD_ENV = 'VIT_JAX_CONSOLE_FD'
# Exit status of a process that stopped because another one was lost.
LOST_PEER_EXIT = 3
# Exit statuses a worker sets after printing its own message.
# (130 and 143: stopped by Ctrl-C or SIGTERM, see stop_signals.py.)
_REPORTED_EXITS = (0, 1, 2, LOST_PEER_EXIT, 130, 143)
# What the runtime writes when a peer is gone or never came.
_PEER_ERROR = re.compile(
    r'gloo|heartbeat|coordination ?service|connection (reset|closed|refused)'
    r'|socket closed|unavailable|deadline[_ ]exceeded|barrier', re.IGNORECASE)
_LOST_TASK = (re.compile(r'Task (\d+) heartbeat timeout'),
              re.compile(r'stopped sending heartbeats\):\s*(\d+)'),
              re.compile(r'/task:(\d+)'))


def is_worker() -> bool:
  return CONSOLE_FD_ENV in os.environ


def is_peer_error(error: BaseException) -> bool:
  """Whether `error` is the runtime's report of a lost or missing peer."""
  return bool(_PEER_ERROR.search(f'{type(error).__name__} {error}'))


def resume_command(argv: Sequence[str]) -> str:
  return ' '.join(['python -m vit_jax.main'] +
                  [shlex.quote(a) for a in argv[1:]])


def complete_steps(workdir: str) -> List[int]:
  """Steps of the checkpoints on disk that were completely written."""
  from vit_jax.checkpoints import train_checkpoint  # pylint: disable=g-import-not-at-top
  directory = train_checkpoint.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  # orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>`
  # once complete.
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _lost_process(log_text: str, process_id: int,
                  num_processes: int) -> Optional[int]:
  for pattern in _LOST_TASK:
    ids = [int(i) for i in pattern.findall(log_text) if int(i) != process_id]
    if ids:
      return ids[-1]
  if num_processes == 2:
    return 1 - process_id
  return None


def lost_peer_message(*,
                      what: str,
                      process_id: int,
                      num_processes: int,
                      workdir: str,
                      argv: Sequence[str],
                      log_text: str = '') -> str:
  """The paragraph a surviving process prints.

  `what` says how this process learned of it (a short clause); `log_text`,
  the runtime's messages, is searched for the lost process's id.
  """
  lost = _lost_process(log_text, process_id, num_processes)
  who = (f'Process {lost} of the {num_processes}-process run was lost'
         if lost is not None else
         f'Another process of the {num_processes}-process run was lost')
  steps = complete_steps(workdir)
  ckpt = (f'The newest complete checkpoint on disk is step {steps[-1]} in '
          f'{os.path.join(workdir, "checkpoints")}; resuming continues from '
          'it.' if steps else 'No complete checkpoint is on disk yet, so a '
          'new start begins at step 0.')
  return (f'{who} ({what}); process {process_id} stopped. {ckpt} To resume, '
          'start every process again with the same command (each with its '
          f'own --process_id); for this one:\n  {resume_command(argv)}')


# Callables exit_now runs first: it skips `finally` blocks and atexit.
BEFORE_EXIT_NOW = []


def exit_now(code: int) -> None:
  """Ends this worker at once, skipping the runtime's shutdown barrier
  (which would wait for the lost peer, then abort)."""
  for release in list(BEFORE_EXIT_NOW):
    release()
  sys.stdout.flush()
  sys.stderr.flush()
  logging.shutdown()
  os._exit(code)  # pylint: disable=protected-access


def watch_parent() -> None:
  """Kills this worker when its supervisor dies, so peers see it lost."""
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)

  threading.Thread(target=watch, daemon=True, name='watch_parent').start()


def _describe_exit(code: int) -> str:
  if code < 0:
    return f'this process was ended by {signal.Signals(-code).name}'
  if code == 128 + signal.SIGABRT:
    return 'the distributed runtime aborted this process'
  return f'this process exited with status {code}'


def _log_tail(log_path: str, start: int) -> str:
  with open(log_path, 'rb') as f:
    f.seek(start)
    return f.read().decode('utf-8', 'replace')


def run_worker(argv: Sequence[str], *, log_path: str, process_id: int,
               num_processes: int, coordinator: str, workdir: str) -> int:
  """Runs `argv` as a worker; returns the exit status for this process."""
  console = os.dup(2)
  env = dict(os.environ, **{CONSOLE_FD_ENV: str(console)})
  start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
  with open(log_path, 'ab') as log:
    worker = subprocess.Popen([sys.executable, '-m', 'vit_jax.main', *argv[1:]],
                              env=env,
                              stderr=log,
                              pass_fds=(console,),
                              process_group=0)
  os.close(console)
  # SIGTERM (preemption) and Ctrl-C go to the worker, which saves a
  # checkpoint after its current step. It has a process group of its own, so
  # a Ctrl-C in the terminal reaches it once, from here.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda s, _: worker.send_signal(s))
  code = worker.wait()
  if code in _REPORTED_EXITS:
    return code
  log_text = _log_tail(log_path, start)
  if 'RegisterTask' in log_text:
    message = (
        f'Process {process_id} could not join the {num_processes}-process run '
        f'at the coordinator {coordinator} '
        'before the --init_timeout_s: not every process connected. Each '
        f'process needs its own --process_id in 0..{num_processes - 1} (two '
        'processes with the same id never both join), the same '
        '--num_processes and the same --coordinator_address, reachable from '
        'every host (process 0 listens on it).')
  else:
    message = lost_peer_message(
        what=_describe_exit(code),
        process_id=process_id,
        num_processes=num_processes,
        workdir=workdir,
        argv=argv,
        log_text=log_text)
  print(
      f'\nError: {message}\n(The runtime\'s messages are in {log_path}.)',
      file=sys.stderr,
      flush=True)
  return LOST_PEER_EXIT

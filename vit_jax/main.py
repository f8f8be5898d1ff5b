"""Command line: `python -m vit_jax.main --config=<config>[:arg] --workdir=W`.

`--config` is a config file (`configs/finetune.py:b16,cifar10`) or the name
of one of the experiment configs of `configs/` (`finetune:b16,cifar10`), which
the installed package ships (vit_jax/configs/experiments.py); an existing
file wins. Fields of the config are overridden with
`--config.<field>=<value>`, e.g. `--config.total_steps=100
--config.base_lr=0.01`. Without `--config` the offline main job runs
(`embedded`, configs/embedded.py).

Console and log file: the console shows what the run prints (the data
table, progress lines, results) and warnings. Every log line (INFO and up:
the config, metrics, library messages, the C++ libraries' stderr) goes to
`<workdir>/log.txt`, with the full traceback of any error; `--verbose` also
shows the library logging on the console. An error is one paragraph ending
with the `--traceback` hint; the exit status is 2 for a config value, key or
path or a multi-process flag (vit_jax/run_config/validation.py), 1 for other errors, 3
when a process of a multi-process run was lost. docs/troubleshooting.md lists
them.

Several hosts: start one process per host with the same command plus
`--coordinator_address=<host:port> --num_processes=<n> --process_id=<i>` (or
the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID). Each process feeds its own share of the global batch;
process 0 writes the logs and summary.json. Each process runs its training in
a worker child (vit_jax/parallel/supervisor.py): when a process dies or cannot be
reached, the others stop with one paragraph naming it, the newest complete
checkpoint and the command to resume.
"""

import contextlib
import faulthandler
import logging as std_logging
import os
import re
import sys
import threading
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vit_jax.configs import experiments
from vit_jax.data import filesystem
from vit_jax.guards import disk_space
from vit_jax.guards import stop_signals
from vit_jax.guards import workdir_lock
from vit_jax.parallel import supervisor
from vit_jax.run_config import errors
from vit_jax.run_config import original_configs
from vit_jax.run_config import validation

# In the workdir: the absl log (INFO and up) and the C++ libraries' stderr.
LOG_FILE = 'log.txt'
# The command line as given (absl strips the flags from main's argv).
_ARGV = list(sys.argv)
_TRACEBACK_HINT = '(--traceback shows where it happened.)'

# The main job's config, the default of --config.
DEFAULT_CONFIG = (
    experiments.path_of('embedded')
    if 'embedded' in experiments.names() else None)


def _config_argument(argv):
  """(index, value) of --config's value in `argv`, else (None, None)."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return i, arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return i + 1, argv[i + 1]
  return None, None


def _checked_argv(argv, default):
  """`argv` with the file of `--config` made explicit (a name resolved to
  its experiment config); exits with one paragraph (status 2) if the config
  is no file and no name, fails to load, or lacks a `--config.<key>`
  (ml_collections would raise a bare KeyError traceback)."""
  keys = [
      re.sub(r'^--?(no)?config\.', '',
             a.split('=', 1)[0])
      for a in argv
      if re.match(r'^--?(no)?config\.', a)
  ]
  index, given = _config_argument(argv)
  spec = given or default
  if not spec:
    return argv
  try:
    try:
      spec = experiments.resolve(spec)
    except FileNotFoundError as e:
      raise errors.ConfigError(str(e)) from e
    # The parser behind --config, here without the overrides.
    try:
      config = config_flags.config_flags.ConfigFileFlagParser('config').parse(
          spec)
    except Exception as e:  # pylint: disable=broad-except
      # ml_collections puts the config file's traceback in the message.
      raise errors.ConfigError(f'Config file {spec} failed to load: '
                               f'{str(e).strip().splitlines()[-1]}') from e
    validation.check_override_keys(config, keys, spec.split(':', 1)[0])
  except errors.ConfigError as e:
    if '--traceback' in argv:
      raise
    print(f'Error: {e}\n{_TRACEBACK_HINT}', file=sys.stderr)
    sys.exit(2)
  if index is None:
    return argv
  argv = list(argv)
  argv[index] = f'--config={spec}' if argv[index].startswith(
      '--config=') else spec
  return argv


if __name__ == '__main__':
  sys.argv[:] = _checked_argv(_ARGV, DEFAULT_CONFIG)
_CONFIG = config_flags.DEFINE_config_file(
    'config',
    DEFAULT_CONFIG,
    'Experiment config: a file FILE.py[:ARG] or the name of an experiment '
    'config of configs/ (NAME[:ARG]), e.g. finetune:b16,cifar10.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output folder: checkpoints, TensorBoard logs, '
    'summary.json. Re-running with the same folder resumes.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (multi-host runs).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Number of processes (multi-host runs).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'Index of this process (multi-host runs).')
_TRACEBACK = flags.DEFINE_bool('traceback', False,
                               'Show the full traceback of errors.')
_VERBOSE = flags.DEFINE_bool(
    'verbose', False, 'Also show the library logging (absl INFO lines, '
    'TensorFlow / XLA C++ messages) on the console, not only in '
    f'<workdir>/{LOG_FILE}.')
_INIT_TIMEOUT = flags.DEFINE_integer(
    'init_timeout_s', 300, 'Multi-process runs: seconds to wait for every '
    'process to join before giving up.')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout_s', 100, 'Multi-process runs: seconds without a sign '
    'of life after which a process counts as lost.')


def _distributed_args():
  """Multi-host arguments from flags or env; None for a single process."""
  address = _COORDINATOR.value or os.environ.get('JAX_COORDINATOR_ADDRESS')
  num = _NUM_PROCESSES.value
  pid = _PROCESS_ID.value
  if num is None and os.environ.get('JAX_NUM_PROCESSES'):
    num = int(os.environ['JAX_NUM_PROCESSES'])
  if pid is None and os.environ.get('JAX_PROCESS_ID'):
    pid = int(os.environ['JAX_PROCESS_ID'])
  given = [x is not None for x in (address, num, pid)]
  if not any(given):
    return None
  if not all(given):
    raise errors.ConfigError(
        'A multi-process run needs all of --coordinator_address, '
        '--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, '
        'JAX_NUM_PROCESSES, JAX_PROCESS_ID).')
  if num < 1 or not 0 <= pid < num:
    raise errors.ConfigError(
        f'--process_id={pid} with --num_processes={num}: the ids of a '
        f'{num}-process run are 0..{num - 1}, one per process.')
  return dict(coordinator_address=address, num_processes=num, process_id=pid)


def _user_errors():
  """Exceptions that carry a message meant for the user: no traceback."""
  # Imported here: JAX must not initialise before jax.distributed.initialize.
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints import train_checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.guards import memory_fit  # pylint: disable=g-import-not-at-top
  return (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError,
          checkpoint.CheckpointError, train_checkpoint.NonFiniteStateError,
          disk_space.DiskSpaceError, memory_fit.OutOfMemoryError)


class _QuietLibraries:
  """Drops INFO lines of orbax (dozens per checkpoint) from the absl log."""

  _PACKAGES = (f'{os.sep}orbax{os.sep}',)

  def filter(self, record):
    if any(p in record.pathname for p in self._PACKAGES):
      return record.levelno > logging.converter.STANDARD_INFO
    return True


class _OwnRecordsOnly:
  """Console filter without --verbose: log records of this project and
  Python warnings; library records (e.g. orbax's background threads failing
  when a peer process dies) stay in the log file."""

  _OWN = (f'{os.sep}vit_jax{os.sep}', f'{os.sep}configs{os.sep}')

  def filter(self, record):
    return (record.name == 'py.warnings' or
            any(p in record.pathname for p in self._OWN))


def _to_log(error):
  """The traceback of a background thread's error into the log file (fd 2),
  or nowhere if the log cannot be written (a full disk)."""
  with contextlib.suppress(OSError, ValueError):
    traceback.print_exception(error, file=sys.__stderr__)


def _console_and_log_file(log_path):
  """Log lines to `log_path`; the console keeps prints, warnings, errors.

  Unless --verbose, the C++ libraries' stderr (file descriptor 2) goes to the
  log file too, and Python's `sys.stderr` to a copy of the console. In a
  worker of a multi-process run, fd 2 already is the log file.
  """
  console_fd = os.environ.get(supervisor.CONSOLE_FD_ENV)
  if console_fd is None and not _VERBOSE.value and log_path:
    sys.stderr.flush()
    console_fd = os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    faulthandler.enable(file=os.fdopen(console_fd, 'w', closefd=False))
  if console_fd is not None:
    sys.stderr = os.fdopen(int(console_fd), 'w', buffering=1)
  if supervisor.is_worker() or not _VERBOSE.value:
    # Background threads that fail (a checkpoint write on a full disk, a
    # peer's death at a barrier): their tracebacks belong in the log.
    threading.excepthook = lambda args: _to_log(args.exc_value)
    sys.unraisablehook = lambda unraisable: _to_log(unraisable.exc_value)
  # A log file that cannot be written (a full disk) is no reason to stop.
  std_logging.raiseExceptions = False
  console = logging.get_absl_handler()
  console.python_handler.stream = sys.stderr
  console.addFilter(_QuietLibraries())
  if not _VERBOSE.value:
    console.setLevel(std_logging.WARNING)
    console.addFilter(_OwnRecordsOnly())
  std_logging.captureWarnings(True)
  if log_path:
    to_file = std_logging.FileHandler(log_path)
    to_file.setFormatter(logging.PythonFormatter())
    to_file.addFilter(_QuietLibraries())
    std_logging.getLogger().addHandler(to_file)


def _explained(error):
  """`error`, or what it means in the config's terms (out of memory)."""
  if 'jax' not in sys.modules or _CONFIG.value is None:
    return error
  from vit_jax.guards import memory_fit  # pylint: disable=g-import-not-at-top
  return memory_fit.explain(error, _CONFIG.value) or error


def _report(error, log_path, distributed):
  """Prints `error` as one paragraph and exits; the traceback goes to the log
  file (with --traceback, to the console as well)."""
  where = f' The full traceback is in {log_path}.' if log_path else ''
  if log_path:
    with open(log_path, 'a') as f:
      f.write('Error:\n' + ''.join(traceback.format_exception(error)))
  if _TRACEBACK.value:
    raise error
  if distributed and supervisor.is_peer_error(error):
    print(
        '\nError: ' + supervisor.lost_peer_message(
            what=f'{type(error).__name__}: {str(error).splitlines()[0]}',
            process_id=distributed['process_id'],
            num_processes=distributed['num_processes'],
            workdir=_WORKDIR.value,
            argv=_ARGV),
        file=sys.stderr)
    supervisor.exit_now(supervisor.LOST_PEER_EXIT)
  error = _explained(error)
  if isinstance(error, errors.ConfigError):
    code, text = 2, str(error)
  elif isinstance(error, _user_errors()):
    code, text = 1, str(error)
  else:
    code, text = 1, (f'{type(error).__name__}: {error}\nThis looks like a bug '
                     'in vit_jax; please report it with the log file.')
  if isinstance(error, disk_space.DiskSpaceError):
    text += f'\n  {supervisor.resume_command(_ARGV)}'
  print(
      f'\nError: {text}\n{_TRACEBACK_HINT}{where}', file=sys.stderr, flush=True)
  if distributed and supervisor.is_worker():
    supervisor.exit_now(code)
  sys.exit(code)


def _interrupted_outside_the_loop(log_path, signum):
  """Ctrl-C or SIGTERM before the first step or after the last: one
  paragraph, exit 130 or 143."""
  name = stop_signals.NAMES[signum]
  if log_path:
    with open(log_path, 'a') as f:
      f.write(f'Interrupted by {name}:\n' + traceback.format_exc())
  steps = supervisor.complete_steps(_WORKDIR.value)
  newest = (f'the newest checkpoint on disk is step {steps[-1]}'
            if steps else 'no checkpoint is on disk yet')
  print(
      f'\nInterrupted by {name} outside a train step; {newest}. To '
      f'resume, run the same command:\n  {supervisor.resume_command(_ARGV)}',
      file=sys.stderr,
      flush=True)
  supervisor.exit_now(stop_signals.EXIT_CODES[signum])


def _train(distributed):
  """Checks the config, starts JAX (and its distributed runtime) and trains
  the config."""
  config = _CONFIG.value
  # Before JAX and TensorFlow load: a bad value fails in a fraction of a
  # second. (train_and_evaluate translates the original vit_jax's configs
  # too.)
  checked = None
  if original_configs.trainer(config) == 'train':
    checked = original_configs.to_project_config(config)
    validation.check_values(checked)
  import jax  # pylint: disable=g-import-not-at-top
  if distributed:
    jax.distributed.initialize(
        **distributed,
        initialization_timeout=_INIT_TIMEOUT.value,
        heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
    if jax.process_count() != distributed['num_processes']:
      raise errors.ConfigError(
          f'This process was started with --num_processes='
          f'{distributed["num_processes"]}, but the run it joined at '
          f'{distributed["coordinator_address"]} has {jax.process_count()} '
          'processes (process 0 decides). Give every process the same '
          '--num_processes.')
  if checked is not None:  # before TensorFlow loads (vit_jax.train)
    validation.check_devices(
        checked,
        device_count=jax.local_device_count(),
        process_count=jax.process_count())
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  logging.info('Command: %s', ' '.join(_ARGV))
  logging.info('Config:\n%s', config)
  logging.info('JAX: %d process(es), %d local / %d global devices (%s).',
               jax.process_count(), jax.local_device_count(),
               jax.device_count(),
               jax.devices()[0].platform)
  summary = train.train_and_evaluate(config, _WORKDIR.value)
  if summary.get('stopped_by'):
    print(
        f'To resume, run the same command:\n  '
        f'{supervisor.resume_command(_ARGV)}',
        flush=True)
    return stop_signals.exit_code(summary['stopped_by'])
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if _WORKDIR.value is None:
    raise app.UsageError('--workdir is required (where checkpoints, logs and '
                         'summary.json go).')
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. --config=embedded')
  log_path = distributed = None
  stop_signals.raise_when_stopped()
  try:
    distributed = _distributed_args()
    workdir = validation.check_workdir(_WORKDIR.value)
    with contextlib.ExitStack() as lock:
      if not filesystem.has_scheme(workdir):
        if not supervisor.is_worker() and not (distributed or {}).get(
            'process_id'):  # one lock per run: process 0's
          lock.enter_context(
              workdir_lock.hold(workdir, supervisor.resume_command(_ARGV)))
        log_path = os.path.join(workdir, LOG_FILE)
      if distributed and not supervisor.is_worker():
        sys.exit(
            supervisor.run_worker(
                _ARGV,
                log_path=log_path or os.devnull,
                process_id=distributed['process_id'],
                num_processes=distributed['num_processes'],
                coordinator=distributed['coordinator_address'],
                workdir=workdir))
      _console_and_log_file(log_path)
      if distributed:
        supervisor.watch_parent()
      code = _train(distributed)
  except stop_signals.Stopped as e:
    _interrupted_outside_the_loop(log_path, e.signum)
  except Exception as e:  # pylint: disable=broad-except
    _report(e, log_path, distributed)
  sys.exit(code)


if __name__ == '__main__':
  app.run(main)

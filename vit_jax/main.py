"""Command line: `python -m vit_jax.main --config=<file.py>[:arg] --workdir=W`.

Fields of the config are overridden with `--config.<field>=<value>`, e.g.
`--config.total_steps=100 --config.base_lr=0.01`. Without `--config` the
offline main job runs (configs/embedded.py).

Several hosts: start one process per host with the same command plus
`--coordinator_address=<host:port> --num_processes=<n> --process_id=<i>` (or
the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID). Each process feeds its own share of the global batch;
process 0 writes the logs and summary.json.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

# Config files import `configs.common`; make the repository root importable
# whatever the working directory.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

from ml_collections import config_flags  # pylint: disable=g-import-not-at-top


def _default_config():
  """configs/embedded.py of the `configs` package: beside vit_jax in a
  checkout, in site-packages when installed from a wheel."""
  try:
    import configs  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return os.path.join(os.path.dirname(os.path.abspath(configs.__file__)),
                      'embedded.py')


DEFAULT_CONFIG = _default_config()

_CONFIG = config_flags.DEFINE_config_file(
    'config',
    DEFAULT_CONFIG if DEFAULT_CONFIG and os.path.exists(DEFAULT_CONFIG)
    else None,
    'Experiment config file, e.g. configs/finetune.py:b16,cifar10.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output folder: checkpoints, TensorBoard logs, '
    'summary.json. Re-running with the same folder resumes.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0 (multi-host runs).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Number of processes (multi-host runs).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'Index of this process (multi-host runs).')
_TRACEBACK = flags.DEFINE_bool(
    'traceback', False, 'Show the full traceback of errors.')


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
    raise app.UsageError(
        'A multi-process run needs all of --coordinator_address, '
        '--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, '
        'JAX_NUM_PROCESSES, JAX_PROCESS_ID).')
  return dict(coordinator_address=address, num_processes=num, process_id=pid)


def _user_errors():
  """Exceptions that carry a message meant for the user: no traceback."""
  # Imported here: JAX must not initialise before jax.distributed.initialize.
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax import train_checkpoint  # pylint: disable=g-import-not-at-top
  errors = (ValueError, FileNotFoundError, NotADirectoryError,
            FloatingPointError, checkpoint.CheckpointError,
            train_checkpoint.NonFiniteStateError)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    errors += (tfds.core.registered.DatasetNotFoundError,)
  except (ImportError, AttributeError):
    pass
  return errors


class _QuietLibraries:
  """Drops INFO lines of orbax (dozens per checkpoint) from the absl log."""

  _PACKAGES = (f'{os.sep}orbax{os.sep}',)

  def filter(self, record):
    if any(p in record.pathname for p in self._PACKAGES):
      return record.levelno > logging.converter.STANDARD_INFO
    return True


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if _WORKDIR.value is None:
    raise app.UsageError('--workdir is required (where checkpoints, logs and '
                         'summary.json go).')
  if _CONFIG.value is None:
    raise app.UsageError(
        '--config is required, e.g. --config=configs/embedded.py')
  distributed = _distributed_args()
  import jax  # pylint: disable=g-import-not-at-top
  if distributed:
    jax.distributed.initialize(**distributed)
  from vit_jax import train  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  logging.info('Config:\n%s', config)
  logging.info('JAX: %d process(es), %d local / %d global devices (%s).',
               jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except _user_errors() as e:
    if _TRACEBACK.value:
      raise
    logging.error('%s: %s', type(e).__name__, e)
    print(f'\nError: {e}\n(--traceback shows where it happened.)',
          file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)

"""Exports a trained model to the released `.npz` format.

  python -m vit_jax.checkpoints.export --workdir=<training workdir> \
      --output=model.npz

Writes the newest (or `--step`) train-state checkpoint's parameters under
released names, loadable by `checkpoint.load_pretrained`, the original
vit_jax and timm. Parameters stream in runs of up to 64 MiB
(`train_checkpoint.READ_GROUP_BYTES`); the optimizer state is never read.
`--verbosity=0` shows orbax's INFO lines.
"""

import collections
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax

from vit_jax import checkpoint
from vit_jax.checkpoints import leafwise
from vit_jax.checkpoints import npz
from vit_jax.checkpoints import train_checkpoint

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir.')
_OUTPUT = flags.DEFINE_string('output', None, 'The .npz file to write.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: newest).')
_NAMES = flags.DEFINE_enum('names', 'released', npz.NAME_SCHEMES,
                           'Parameter naming scheme of the file.')


def export(workdir: str,
           output: str,
           *,
           step=None,
           names: str = 'released') -> int:
  """Writes `workdir`'s checkpoint `step` to `output`; returns the step."""
  ckpts = train_checkpoint.TrainCheckpoints(workdir)
  try:
    step = ckpts.latest_step() if step is None else step
    layout = leafwise.plan(ckpts.param_shapes(step), names)
    arrays = leafwise.convert(ckpts.iter_params(step), layout)
    if jax.process_index() == 0:
      npz.write_npz_atomically(os.fspath(output), arrays)
    else:  # Reads along: each read is collective.
      collections.deque(arrays, maxlen=0)
  finally:
    ckpts.close()
  return step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not _WORKDIR.value or not _OUTPUT.value:
    raise app.UsageError('--workdir and --output are required.')
  if not flags.FLAGS['verbosity'].present:
    # orbax logs several INFO lines per read, and export reads every leaf.
    logging.set_verbosity(logging.WARNING)
  try:
    step = export(
        _WORKDIR.value, _OUTPUT.value, step=_STEP.value, names=_NAMES.value)
  except (FileNotFoundError, checkpoint.CheckpointError) as e:
    print(f'Error: {e}', file=sys.stderr)
    sys.exit(1)
  print(f'Exported step {step} of {_WORKDIR.value} to {_OUTPUT.value}.')


if __name__ == '__main__':
  app.run(main)

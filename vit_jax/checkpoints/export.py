"""Exports a trained model to the released `.npz` format.

  python -m vit_jax.checkpoints.export --workdir=<training workdir> \
      --output=model.npz

Reads the parameters of the newest train-state checkpoint (orbax, in
`<workdir>/checkpoints`; `--step` picks another) and writes the file
`checkpoint.save` would write of them: released (pre-linen) names, loadable
by this project's `checkpoint.load_pretrained`, the original vit_jax and
timm. A fine-tuning config then names the file with
`--config.pretrained_path=model.npz`.

The parameters stream from the checkpoint into the file one at a time
(`TrainCheckpoints.iter_params`, `vit_jax.checkpoints.leafwise`): only one
of them is in memory at once, and the optimizer state is never read, whatever
the run's layout (FSDP shards included). In a multi-process run every process
reads along and process 0 writes the file. orbax's INFO lines (several per
parameter read) are shown with `--verbosity=0`.
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


def export(workdir: str, output: str, *, step=None,
           names: str = 'released') -> int:
  """Writes the parameters of `workdir`'s checkpoint `step` to `output`.

  Returns:
    The step that was exported.
  """
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
    step = export(_WORKDIR.value, _OUTPUT.value, step=_STEP.value,
                  names=_NAMES.value)
  except (FileNotFoundError, checkpoint.CheckpointError) as e:
    print(f'Error: {e}', file=sys.stderr)
    sys.exit(1)
  print(f'Exported step {step} of {_WORKDIR.value} to {_OUTPUT.value}.')


if __name__ == '__main__':
  app.run(main)

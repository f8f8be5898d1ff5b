"""Exports a trained model to the released `.npz` format.

  python -m vit_jax.interop.export --workdir=<training workdir> \
      --output=model.npz

Reads the parameters of the newest train-state checkpoint (orbax, in
`<workdir>/checkpoints`; `--step` picks another) and writes them with
`checkpoint.save`: released (pre-linen) names, loadable by this project's
`checkpoint.load_pretrained`, the original vit_jax and timm. A fine-tuning
config then names the file with `--config.pretrained_path=model.npz`.
"""

import sys

from absl import app
from absl import flags

from vit_jax import checkpoint
from vit_jax.params import npz
from vit_jax.training import train_checkpoint

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
  step = ckpts.latest_step() if step is None else step
  params = ckpts.restore_params(step)
  checkpoint.save(params, output, names=names)
  ckpts.close()
  return step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not _WORKDIR.value or not _OUTPUT.value:
    raise app.UsageError('--workdir and --output are required.')
  try:
    step = export(_WORKDIR.value, _OUTPUT.value, step=_STEP.value,
                  names=_NAMES.value)
  except (FileNotFoundError, checkpoint.CheckpointError) as e:
    print(f'Error: {e}', file=sys.stderr)
    sys.exit(1)
  print(f'Exported step {step} of {_WORKDIR.value} to {_OUTPUT.value}.')


if __name__ == '__main__':
  app.run(main)

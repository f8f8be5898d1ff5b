r"""Fine-tunes an AugReg checkpoint (Steiner et al., "How to train your ViT?").

  python -m vit_jax.main --workdir=/tmp/vit \
      --config=vit_jax/configs/augreg.py:R_Ti_16 \
      --config.dataset=oxford_iiit_pet \
      --config.pp.train='train[:90%]' \
      --config.base_lr=0.01

`R_Ti_16` (a key of `models.AUGREG_CONFIGS`) picks, among the ImageNet-21k
pre-trainings of that model listed in `{pretrained_dir}/index.csv`, the one
with the best final upstream validation accuracy; the stem of a file
(`R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0`) selects that
file. `pretrained_dir` defaults to the public gs://vit_models/augreg; a local
copy of `index.csv` and the `.npz` files works the same. `--config.dataset`
must be given.
"""

import ml_collections

from vit_jax.configs import common
from vit_jax.configs import models


def get_config(model_or_filename):
  """The fine-tuning config of AugReg model (or file) `model_or_filename`."""
  model = model_or_filename.split('-')[0]
  if model not in models.AUGREG_CONFIGS:
    raise ValueError(
        f'Unknown AugReg model {model!r} (from {model_or_filename!r}); the '
        f'known ones: {", ".join(sorted(models.AUGREG_CONFIGS))}.')
  config = common.get_config()
  config.pretrained_dir = 'gs://vit_models/augreg'
  config.model_or_filename = model_or_filename
  config.model = models.AUGREG_CONFIGS[model].copy_and_resolve_references()
  # AugReg's regularisation is for pre-training only.
  config.model.transformer.dropout_rate = 0

  # Often overridden on the command line.
  config.base_lr = 0.03
  config.total_steps = 500
  config.warmup_steps = 100
  config.pp = ml_collections.ConfigDict({
      'train': 'train',
      'test': 'test',
      'resize': 448,
      'crop': 384
  })

  config.dataset = ''  # Must be set: --config.dataset=<TFDS name or folder>.
  return config

r"""Fine-tunes Mixer-B/16 on CIFAR-10 (the original's config).

  python -m vit_jax.main --workdir=/tmp/mixer \
      --config=vit_jax/configs/mixer_base16_cifar10.py \
      --config.pretrained_dir=/path/to/mixer_imagenet21k

The checkpoint is `{pretrained_dir}/Mixer-B_16.npz`, the released file of
gs://mixer_models/imagenet21k. Resolution 224, 10,000 steps of SGD with
momentum (common.py's defaults).
"""

import ml_collections

from vit_jax.configs import common
from vit_jax.configs import models


def get_config():
  """The Mixer-B/16 CIFAR-10 fine-tuning config."""
  config = common.get_config()
  config.model_type = 'Mixer'
  config.model = models.get_mixer_b16_config()
  config.dataset = 'cifar10'
  config.total_steps = 10_000
  config.pp = ml_collections.ConfigDict({
      'train': 'train[:98%]',
      'test': 'test',
      'crop': 224
  })
  return config

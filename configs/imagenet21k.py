"""Pre-training on ImageNet-21k (paper Table 3).

Command (model by short name, default b16):

  python -m vit_jax.main --config=configs/imagenet21k.py:b16 \\
      --workdir=/tmp/b16_i21k --config.dataset=/data/imagenet21k

ImageNet-21k is not in TFDS: point --config.dataset at an image folder
(`<dir>/train/<synset>/*.JPEG`, `<dir>/test/<synset>/*.JPEG`) or at a TFDS
builder you registered and prepared. Then export the result and fine-tune it:

  python -m vit_jax.checkpoints.export --workdir=/tmp/b16_i21k --output=/tmp/ViT-B_16.npz
  python -m vit_jax.main --config=configs/finetune.py:b16,cifar10 \\
      --workdir=/tmp/b16_cifar10 --config.pretrained_path=/tmp/ViT-B_16.npz

The recipe (Table 3): Adam beta1 0.9, beta2 0.999, batch 4096, learning rate
1e-3 with 10k warmup steps and linear decay to 1e-5, weight decay 0.03
(decoupled, applied with the learning rate), dropout 0.1, 90 epochs (30 for
ViT-L/H; Table 3 gives ViT-L 30 or 90), resolution 224, gradient clip 1.0, a
tanh representation layer (`pre_logits`) of the hidden size, and the head bias
initialised to -10 with a per-class sigmoid loss, so that the 21,843
sigmoid outputs start near 0.

Expected result: NOT run here (it needs weeks of accelerator time). THE
PAPER'S numbers for the model this produces, fine-tuned at 384 (Table 5):
ViT-B/16 83.97% on ImageNet, 98.95% on CIFAR-10, 91.67% on CIFAR-100.
"""

from vit_jax.configs import experiments
from vit_jax.configs import schema

finetune = experiments.sibling(__file__, 'finetune')

NUM_TRAIN_IMAGES = 14_197_122  # The full ImageNet-21k (fall 2011) release.
NUM_CLASSES = 21_843


def get_config(model: str = 'b16'):
  """Returns the ImageNet-21k pre-training config of `model`."""
  name = finetune.model_name(model)
  config = schema.pretrain_config(name)
  with config.model.unlocked():
    config.model.head_bias_init = -10.
  config.dataset = 'imagenet21k'
  config.test_split = 'test'
  epochs = 30 if name.startswith(('ViT-L', 'ViT-H')) else 90
  config.total_steps = epochs * NUM_TRAIN_IMAGES // config.batch
  config.base_lr = 1e-3
  config.weight_decay = 0.03
  config.decay_type = 'linear'
  config.linear_end = 1e-5
  config.loss = 'sigmoid_xent'
  return config

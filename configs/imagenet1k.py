"""Pre-training on ImageNet-1k only (paper Table 3).

Command (model by short name, default b16; ImageNet prepared in TFDS):

  python -m vit_jax.main --config=configs/imagenet1k.py:b16 \\
      --workdir=/tmp/b16_i1k --config.tfds_data_dir=/data/tfds

The recipe (Table 3): Adam beta1 0.9, beta2 0.999, batch 4096, learning rate
3e-3 with 10k warmup steps and cosine decay, weight decay 0.3 (decoupled,
applied with the learning rate), dropout 0.1, gradient clip 1.0, 300 epochs,
resolution 224, a tanh representation layer (`pre_logits`) of the hidden
size, softmax cross-entropy. Evaluated on `validation`; 1% of train could be
held out with --config.train_split='train[:99%]'.

Expected result: NOT run here. THE PAPER'S number (Table 5): ViT-B/16
pre-trained on ImageNet only and fine-tuned at 384 reaches 77.91% top-1 on
ImageNet; on ImageNet alone ViTs trail ResNets of similar cost (Fig. 3).
"""

from vit_jax.configs import experiments
from vit_jax.configs import schema

finetune = experiments.sibling(__file__, 'finetune')

NUM_TRAIN_IMAGES = 1_281_167


def get_config(model: str = 'b16'):
  """Returns the ImageNet-1k pre-training config of `model`."""
  config = schema.pretrain_config(finetune.model_name(model))
  config.dataset = 'imagenet2012'
  config.test_split = 'validation'
  config.total_steps = 300 * NUM_TRAIN_IMAGES // config.batch
  config.base_lr = 3e-3
  config.weight_decay = 0.3
  config.decay_type = 'cosine'
  config.loss = 'softmax_xent'
  return config

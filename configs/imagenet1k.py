"""Pre-training on ImageNet-1k only (paper Table 3; SPEC section 6).

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

from configs import common
from configs import finetune

NUM_TRAIN_IMAGES = 1_281_167


def get_config(model: str = 'b16'):
  """Returns the ImageNet-1k pre-training config of `model`."""
  name = finetune.model_name(model)
  config = common.get_config()
  config.model_name = name
  config.model = common.zoo_model(name, representation_size=True,
                                  dropout=0.1)

  config.dataset = 'imagenet2012'
  config.train_split = 'train'
  config.test_split = 'validation'
  config.pp.crop = 224
  config.pp.augment = 'inception_crop'
  config.batch = 4096
  config.batch_eval = 4096
  config.shuffle_buffer = 250_000

  config.total_steps = 300 * NUM_TRAIN_IMAGES // config.batch
  config.optimizer = 'adamw'
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.base_lr = 3e-3
  config.weight_decay = 0.3
  config.warmup_steps = 10_000
  config.decay_type = 'cosine'
  config.grad_norm_clip = 1.0
  config.optim_dtype = None
  config.accum_steps = 1
  config.loss = 'softmax_xent'

  config.log_every = 50
  config.eval_every = 5_000
  config.checkpoint_every = 1_000
  return config

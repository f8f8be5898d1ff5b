"""The flower-photos workflow of the PyTorch tutorials: a frozen ViT-B/16 + a head.

Five flower classes (daisy, dandelion, roses, sunflowers, tulips; 3,670
photos), split 80/20, the ImageNet-21k ViT-B/16 with its backbone frozen,
only the new classification head trained, 10 epochs. The data is either TFDS
`tf_flowers` or the same photos as a folder (`flower_photos/<class>/*.jpg`,
the archive the tutorials download), or any folder of that shape:

  # TFDS (prepare it once on a machine with network: `tfds build tf_flowers`)
  python -m vit_jax.main --config=configs/flowers.py:tf_flowers \\
      --workdir=/tmp/flowers --config.pretrained_dir=/path/to/imagenet21k

  # A folder <dir>/<class>/*.jpg, split per class 80/20 with split_seed 0
  python -m vit_jax.main --config=configs/flowers.py:/data/flower_photos \\
      --workdir=/tmp/flowers --config.pretrained_dir=/path/to/imagenet21k

`<pretrained_dir>/ViT-B_16.npz` is the ImageNet-21k release
(gs://vit_models/imagenet21k/ViT-B_16.npz; `--config.pretrained_path=<file>`
names a file directly). Its representation layer (`pre_logits`, 768 -> 768,
tanh) is kept, so the head reads the features the checkpoint was pre-trained
to give, and it stays frozen with the rest (`trainable='head'`): 3,845 of
the 86,393,093 parameters train (the head, 768 x 5 + 5).
`--config.trainable=head+pre_logits` also trains the representation layer;
`--config.model.representation_size=None` drops it (the head then reads the
class token after `encoder_norm`, like Hugging Face's ViTForImageClassification).

The run prints the per-class train/val counts first (also written to the
workdir: class_names.json, split.json, split_counts.png; for TFDS only the
split sizes), which parameters train, the validation accuracy after every
epoch, and `Final test accuracy ...` at the end. A folder's split is
`vit_jax/data/folder_split.py`'s: per class, seeded by `split_seed` alone, so it is
the same on every machine and run (`--config.split_seed=1` draws another;
`--config.val_fraction=0.1` holds out less). TFDS has only a 'train' split
here: 'train[:80%]' (2,936 images) trains, 'train[80%:]' (734) validates,
TFDS's deterministic slicing. A folder that already has `<dir>/train` and
`<dir>/test` is used as it is.

Recipe: 224x224, plain resize (no random crops: the frozen features do the
work; `--config.pp.augment=inception_crop` to try the paper's crops), batch
64, 10 epochs (459 steps for the 2,935/2,936 training photos; for another
folder the steps are counted from it when the config is built, and for
another batch, val_fraction or dataset set `--config.total_steps` to
ceil(10 x train images / batch)), validation every epoch. Adam, learning
rate 1e-3 (the tutorials' choice), 1/10 epoch warmup, cosine decay, gradient
clip 1, no weight decay. Adam rather than the paper's SGD momentum
(configs/finetune.py, tuned for moving the whole network): its step per
weight does not depend on the scale of the frozen features (tanh outputs
here, LayerNorm outputs without pre_logits), so the same rate suits either
head; the head has 3,845 weights, so its float32 moments cost nothing.

Expected result: about 98.5% validation accuracy, THE TUTORIALS' figure for
this workflow; NOT run here (no checkpoint and no flower photos offline).
tests/test_flowers_workflow.py runs this config end to end through the
command line on generated images with a tiny "pre-trained" model.

The tutorials' own recipe, from timm's weights file (`configs/flowers.py:tutorial`
for TFDS, `configs/flowers.py:tutorial:/data/flower_photos` for a folder):

  python -m vit_jax.main --config=configs/flowers.py:tutorial:/data/flower_photos \\
      --workdir=/tmp/flowers_tutorial \\
      --config.pretrained_path=jx_vit_base_patch16_224_in21k-e5005f0a.pth

reads timm's ImageNet-21k ViT-B/16 state dict (`.pth`, loaded without
executing code, or the same weights as `.safetensors`; the default path is
that file in the current directory), builds the model as the tutorials'
`has_logits=False` (no representation layer: its `pre_logits.fc` is dropped)
with timm's exact GELU, and trains the head only: 3,845 of 85,802,501
parameters. Training images: `RandomResizedCrop(224)` (area 8-100%, aspect
3/4-4/3) + `RandomHorizontalFlip()`; evaluation: short side to 256, centre
crop 224 (vit_jax/data/torch_transforms.py); both in [-1, 1]. Optimizer,
batch and epochs as above. Expected: about 98.5% validation accuracy after 10
epochs, the tutorials' figure; not run here (no weights, no photos offline).

Hardware (estimated, not measured): one GPU or TPU host. The backbone only
runs forward (no gradients, no optimizer state for it), so memory is the
86M float32 parameters (350 MB) plus the activations of one forward pass of
a 256-image evaluation batch, a few GB (lower --config.batch_eval if it does
not fit). The work is about 29,400 training and 7,300 validation forward
passes of ViT-B/16 at 224x224, 17.6 G multiply-adds each: minutes on a
GPU, hours on a CPU. The host's CPU cores decode and resize the JPEGs.
"""

import math
import os

from vit_jax.configs import schema

MODEL = 'ViT-B_16'
TFDS_NAME = 'tf_flowers'
# TFDS tf_flowers has a single 'train' split of 3,670 images.
TFDS_SPLITS = ('train[:80%]', 'train[80%:]')
TFDS_TRAIN_IMAGES = 2_936  # 'train[:80%]'
EPOCHS = 10
BATCH = 64
VAL_FRACTION = 0.2
SPLIT_SEED = 0
TUTORIAL = 'tutorial'
TIMM_FILE = 'jx_vit_base_patch16_224_in21k-e5005f0a.pth'


def _looks_like_folder(arg: str) -> bool:
  return os.path.isdir(os.path.expanduser(arg)) or arg.startswith(
      ('/', '.', '~')) or os.sep in arg


def _folder_train_images(folder: str) -> int:
  """Training images of `folder` (its 80% part), counted as training will."""
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.get_dataset_info(
      folder, 'train', val_fraction=VAL_FRACTION,
      split_seed=SPLIT_SEED)['num_examples']


def get_config(data: str = TFDS_NAME):
  """Returns the flowers config; `data` is 'tf_flowers' or an image folder,
  either after 'tutorial:' for the tutorials' recipe (`tutorial` alone:
  tf_flowers)."""
  if data == TUTORIAL or data.startswith(TUTORIAL + ':'):
    return _tutorial(get_config(data[len(TUTORIAL) + 1:] or TFDS_NAME))
  config = schema.get_config()
  if data == TFDS_NAME:
    config.dataset = TFDS_NAME
    config.train_split, config.test_split = TFDS_SPLITS
    train_images = TFDS_TRAIN_IMAGES
  elif data and _looks_like_folder(data):
    config.dataset = data
    config.train_split = 'train'
    config.test_split = 'test'  # a single tree's held-out part ('val')
    config.val_fraction = VAL_FRACTION
    config.split_seed = SPLIT_SEED
    # A missing folder fails at the start of training, with the layouts
    # it accepts; until then assume the flower photos' 80%.
    train_images = (
        _folder_train_images(data)
        if os.path.isdir(os.path.expanduser(data)) else TFDS_TRAIN_IMAGES)
  else:
    raise ValueError(
        f'configs/flowers.py takes "tf_flowers" or an image folder '
        f'(<dir>/<class>/*.jpg), e.g. configs/flowers.py:/data/flower_photos; '
        f'got {data!r}, which is neither.')

  config.model_name = MODEL
  # The ImageNet-21k checkpoints have pre_logits (768, tanh): kept, frozen.
  config.model = schema.zoo_model(MODEL, representation_size=True)
  config.pretrained_dir = '.'  # ./ViT-B_16.npz, as configs/finetune.py
  config.trainable = 'head'

  config.pp.crop = 224
  config.pp.augment = 'none'
  config.batch = BATCH
  config.batch_eval = 256
  config.accum_steps = 1

  steps_per_epoch = math.ceil(train_images / BATCH)
  config.total_steps = math.ceil(EPOCHS * train_images / BATCH)
  config.optimizer = 'adam'
  config.base_lr = 1e-3
  config.optim_dtype = None  # float32 moments: the head is 3,845 numbers
  config.weight_decay = 0.0
  config.warmup_steps = max(1, steps_per_epoch // 10)
  config.decay_type = 'cosine'
  config.grad_norm_clip = 1.0

  config.log_every = 10
  config.eval_every = steps_per_epoch  # validation accuracy every epoch
  config.checkpoint_every = 5 * steps_per_epoch
  return config


def _tutorial(config):
  """The tutorials' recipe on `config`'s data (module docstring)."""
  config.model = schema.zoo_model(MODEL, representation_size=None)
  with config.model.unlocked():
    config.model.approximate_gelu = False  # timm's nn.GELU: the exact one
  config.pretrained_dir = None
  config.pretrained_path = TIMM_FILE
  config.pp.augment = 'random_resized_crop'
  config.pp.flip = True
  config.pp.eval_resize = 256
  return config

"""The base config every experiment config starts from.

Holds every field `vit_jax.train.train_and_evaluate` and
`vit_jax.input_pipeline.get_datasets` read, with the original's fine-tuning
defaults (paper Appendix B.1.1). The config is locked: a misspelled
`--config.<field>=...` override fails instead of being ignored. Fields whose
default is None are typed placeholders, so the command line can set them
(`--config.pretrained_path=model.npz`). Other config
files change fields; they never add any.

Not a runnable experiment by itself (no model); the experiment configs of
`configs/` (embedded.py, finetune.py, imagenet21k.py, ...) start from it.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config():
  """Returns the locked base config."""
  config = ml_collections.ConfigDict()
  _set_data_fields(config)
  _set_model_fields(config)
  _set_optimizer_fields(config)
  _set_run_fields(config)
  return config.lock()


def _set_data_fields(config):
  """Data fields (vit_jax/input_pipeline.py)."""
  # 'embedded_mnist' (offline, 5,000 digits), a TFDS name, or an image folder
  # laid out as <dir>/train/<class>/* and <dir>/test/<class>/*.
  config.dataset = 'embedded_mnist'
  # TFDS data directory (None: TFDS's default).
  config.tfds_data_dir = placeholder(str)
  # Hand-downloaded files (e.g. ImageNet).
  config.tfds_manual_dir = placeholder(str)
  config.tfds_download = False  # Never download unless asked to.
  config.train_split = 'train'  # e.g. 'train[:98%]' for a held-out sweep.
  config.test_split = 'test'  # Evaluated every eval_every steps.
  # A folder with one <dir>/<class>/* tree (no train/test folders) is split
  # per class, seeded: val_fraction of each class is the 'test' split
  # (None: 0.2 and seed 0; vit_jax/data/folder_split.py). The split, class names
  # and per-class counts are written to the workdir (split.json,
  # class_names.json, split_counts.png).
  config.val_fraction = placeholder(float)
  config.split_seed = placeholder(int)
  config.pp = ml_collections.ConfigDict()
  config.pp.crop = 384  # Resolution: train crops and test images (pixels).
  # 'inception_crop' (+ flip, the paper's), 'shift' or 'affine' (digits),
  # 'random_resized_crop' (torchvision's) or 'none'
  # (vit_jax.input_pipeline.Augment, vit_jax/data/torch_transforms.py).
  config.pp.augment = 'inception_crop'
  config.pp.shift_pad = 2  # Max translation of 'shift' and 'affine', pixels.
  config.pp.rotate = 0.0  # Max rotation of 'affine', degrees.
  config.pp.zoom = 0.0  # Max relative zoom of 'affine' (scale 1 +- zoom).
  config.pp.flip = False  # Random horizontal flip after the augmentation.
  # Evaluation: short side to this, then the centre crop (torchvision's
  # Resize + CenterCrop); None: a plain resize to pp.crop (the original's).
  config.pp.eval_resize = placeholder(int)
  config.batch = 512  # Global train batch, over all devices and hosts.
  config.batch_eval = 512  # Global eval batch.
  config.shuffle_buffer = 50_000  # Examples in the shuffle buffer (TFDS).
  config.prefetch = 2  # Batches put on the devices ahead of time (0: none).
  config.seed = 0  # Parameter init, data order, augmentation and dropout.


def _set_model_fields(config):
  """Model, training objective and pre-trained checkpoint fields."""
  # ---- Model (vit_jax/models_vit.py).
  # Zoo name; also <pretrained_dir>/<name>.npz.
  config.model_name = placeholder(str)
  config.model = None  # ConfigDict of VisionTransformer fields.

  # 'classification' (supervised; the paper), or 'mpp': masked patch
  # prediction pre-training (Sec. 4.6; vit_jax/models_mpp.py), fields below.
  config.objective = 'classification'
  config.mpp = ml_collections.ConfigDict()
  config.mpp.mask_ratio = 0.5  # Patch embeddings chosen for prediction.
  config.mpp.mask_prob = 0.8  # Of those: replaced by the [mask] embedding,
  config.mpp.random_prob = 0.1  # by another patch; the rest are kept.
  config.mpp.color_bits = 3  # Target: 3-bit mean colour (512 classes).

  # ---- Pre-trained checkpoint (fine-tuning; vit_jax/checkpoint.py).
  # Folder of released .npz files, or None.
  config.pretrained_dir = placeholder(str)
  # A specific .npz; wins over pretrained_dir.
  config.pretrained_path = placeholder(str)


def _set_optimizer_fields(config):
  """Optimization fields (vit_jax/training/optim.py, vit_jax/utils.py)."""
  config.optimizer = 'sgd_momentum'  # 'sgd_momentum', 'adam' or 'adamw'.
  config.total_steps = 10_000  # Updates in the run.
  config.base_lr = 0.03  # Peak learning rate.
  config.decay_type = 'cosine'  # 'cosine' or 'linear' (to linear_end).
  config.warmup_steps = 500  # Linear warmup from 0.
  config.linear_end = 1e-5  # Final learning rate of decay_type='linear'.
  config.grad_norm_clip = 1.0  # Global-norm clip before the optimizer (0: off).
  config.momentum = 0.9  # SGD momentum.
  config.optim_dtype = 'bfloat16'  # SGD momentum / Adam first moment dtype.
  config.adam_b1 = 0.9  # Adam beta1 (paper Table 3).
  config.adam_b2 = 0.999  # Adam beta2.
  config.weight_decay = 0.0  # Decoupled (times lr) decay; 'adamw' only.
  config.accum_steps = 8  # Micro-batches per device batch (saves memory).
  config.loss = 'softmax_xent'  # Or 'sigmoid_xent' (multi-label, 21k).
  # Targets (1 - s) * one_hot + s / classes (Szegedy et al., 2016); 0: off.
  config.label_smoothing = 0.0
  # Evaluate, predict and export an exponential moving average of the weights
  # with this decay (vit_jax/training/weight_ema.py), e.g. 0.999; 0: off.
  config.ema_decay = 0.0
  # Parameters that train (vit_jax/training/trainable.py): None/'all', 'head',
  # 'head+pre_logits', or a regex on '/'-joined paths. The rest stay frozen
  # bit for bit and get neither gradients nor optimizer state.
  config.trainable = placeholder(str)
  # 'pmap' (the original: the train state replicated on every device) or
  # 'fsdp' (jit over the data x fsdp mesh below, parameters and optimizer
  # state sharded; vit_jax/parallel/sharding.py): for models too big for one
  # device.
  config.parallelism = 'pmap'
  # 'fsdp' only: leaves with fewer elements stay replicated (2**16 float32 =
  # 256 KiB; every weight matrix of ViT-B and larger is above it).
  config.fsdp_min_shard_size = 2**16
  # 'fsdp' only: the 2-D device mesh (vit_jax/parallel/device_mesh.py). The
  # batch is split over all data x fsdp devices, parameters and optimizer
  # state along fsdp only (each of the data rows holds a sharded copy);
  # data x fsdp must be the device count of all processes, -1 takes the
  # devices the other axis leaves. The default, 1 x all, shards the state
  # over every device; data=-1, fsdp=1 is data parallelism with replicated
  # state (pmap's math under jit); e.g. data=2, fsdp=-1 on 8 devices: 2 x 4.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = 1
  config.mesh.fsdp = -1


def _set_run_fields(config):
  """Logging, evaluation (test accuracy, few-shot) and checkpoint fields."""
  config.log_every = 10  # Progress line and train metrics, in steps.
  config.eval_every = 100  # Test accuracy, in steps (and at the end).
  config.checkpoint_every = 1_000  # Train-state checkpoint (and at the end).
  # Few-shot linear evaluation of the pre-logits features during training
  # (the paper's metric; vit_jax/evaluation/fewshot.py). every_steps 0: off.
  # None fields take the defaults of fewshot.make_fewshot_evaluator (the
  # training dataset, its 'train'/'test' splits, image size pp.crop).
  config.fewshot = ml_collections.ConfigDict()
  config.fewshot.every_steps = 0
  config.fewshot.dataset = placeholder(str)
  config.fewshot.train_split = 'train'
  config.fewshot.test_split = 'test'
  config.fewshot.shots = (1, 5, 10, 25)
  config.fewshot.seeds = (0, 1, 2)
  config.fewshot.l2_reg = 2.0**10
  config.fewshot.image_size = placeholder(int)
  # Caps the images kept in memory.
  config.fewshot.max_per_class = placeholder(int)
  config.fewshot.max_test_examples = placeholder(int)
  config.fewshot.batch_size = placeholder(int)  # None: batch_eval.


# VisionTransformer fields for speed and memory, not in the zoo configs (the
# original's shape): set here so that `--config.model.<field>=...` works.
SPEED_FIELDS = {
    'dtype': 'float32',  # 'bfloat16': bf16 matmuls, f32 params/accumulation.
    'attention_impl': 'reference',  # 'xla' / 'cudnn': dot_product_attention.
    'scan': False,  # nn.scan over the encoder blocks (checkpoints unchanged).
    'remat_policy': 'none',  # 'full', 'save_dots', 'save_all_dots'.
    # True: the last block computes the class token only (same logits).
    'token_only_last_block': False,
}


def zoo_model(name: str,
              *,
              representation_size=False,
              dropout=None) -> ml_collections.ConfigDict:
  """An unlocked copy of zoo model `name`'s config, with SPEED_FIELDS (ViTs).

  Args:
    name: a key of vit_jax.configs.project_models.ALL_MODEL_CONFIGS.
    representation_size: False keeps the zoo's; True sets it to the hidden
      size (the paper's pre-training); None removes it (ViTs only).
    dropout: if given, the transformer's dropout rate.
  """
  from vit_jax.configs import project_models  # pylint: disable=g-import-not-at-top
  model = project_models.ALL_MODEL_CONFIGS[name].copy_and_resolve_references()
  vit = 'transformer' in model  # not the MLP-Mixer or a BiT ResNet
  with model.unlocked():
    if vit:
      for field, value in SPEED_FIELDS.items():
        model[field] = value
    elif 'resnet' in model:  # a BiT ResNet: only the computation dtype
      model.dtype = SPEED_FIELDS['dtype']
    if vit and representation_size is True:
      model.representation_size = model.hidden_size
    elif vit and representation_size is None:
      model.representation_size = None
  if dropout is not None and model.get('transformer') is not None:
    model.transformer.dropout_rate = dropout
  return model


def pretrain_config(name: str) -> ml_collections.ConfigDict:
  """What the paper's pre-training configs share (Table 3, Appendix B.1).

  Zoo model `name` with a tanh representation layer of the hidden size and
  dropout 0.1; 224 px inception crops; batch 4,096; Adam(W) with beta1 0.9,
  beta2 0.999, float32 moments, 10k warmup steps, gradient clip 1. The
  callers (imagenet21k.py, imagenet1k.py) set the data, steps, learning
  rate, weight decay, decay and loss.
  """
  config = get_config()
  config.model_name = name
  config.model = zoo_model(name, representation_size=True, dropout=0.1)
  config.train_split = 'train'
  config.pp.crop = 224
  config.pp.augment = 'inception_crop'
  config.batch = 4096
  config.batch_eval = 4096
  config.shuffle_buffer = 250_000
  config.optimizer = 'adamw'
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.warmup_steps = 10_000
  config.grad_norm_clip = 1.0
  config.optim_dtype = None  # Adam moments in float32.
  config.accum_steps = 1
  config.log_every = 50
  config.eval_every = 5_000
  config.checkpoint_every = 1_000
  return config

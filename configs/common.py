"""The base config every experiment config starts from.

Holds every field `vit_jax.train.train_and_evaluate` and
`vit_jax.input_pipeline.get_datasets` read, with the original's fine-tuning
defaults (SPEC section 6). The config is locked: a misspelled
`--config.<field>=...` override fails instead of being ignored. Other config
files change fields; they never add any.

Not a runnable experiment by itself (no model); see embedded.py, finetune.py,
imagenet21k.py, imagenet1k.py.
"""

import ml_collections


def get_config():
  """Returns the locked base config."""
  config = ml_collections.ConfigDict()

  # ---- Data (vit_jax/input_pipeline.py).
  # 'embedded_mnist' (offline, 5,000 digits), a TFDS name, or an image folder
  # laid out as <dir>/train/<class>/* and <dir>/test/<class>/*.
  config.dataset = 'embedded_mnist'
  config.tfds_data_dir = None  # TFDS data directory (None: TFDS's default).
  config.tfds_manual_dir = None  # Hand-downloaded files (e.g. ImageNet).
  config.tfds_download = False  # Never download unless asked to.
  config.train_split = 'train'  # e.g. 'train[:98%]' for a held-out sweep.
  config.test_split = 'test'  # Evaluated every eval_every steps.
  config.pp = ml_collections.ConfigDict()
  config.pp.crop = 384  # Resolution: train crops and test images (pixels).
  # 'inception_crop' (+ flip, the paper's), 'shift' (digits), or 'none'.
  config.pp.augment = 'inception_crop'
  config.pp.shift_pad = 2  # Max translation of augment='shift', pixels.
  config.batch = 512  # Global train batch, over all devices and hosts.
  config.batch_eval = 512  # Global eval batch.
  config.shuffle_buffer = 50_000  # Examples in the shuffle buffer (TFDS).
  config.prefetch = 2  # Batches put on the devices ahead of time (0: none).
  config.seed = 0  # Parameter init, data order, augmentation and dropout.

  # ---- Model (vit_jax/models_vit.py).
  config.model_name = None  # Zoo name; also <pretrained_dir>/<name>.npz.
  config.model = None  # ConfigDict of VisionTransformer fields.

  # ---- Pre-trained checkpoint (fine-tuning; vit_jax/checkpoint.py).
  config.pretrained_dir = None  # Folder of released .npz files, or None.
  config.pretrained_path = None  # A specific .npz; wins over pretrained_dir.

  # ---- Optimization (vit_jax/optim.py, vit_jax/utils.py).
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

  # ---- Logging, evaluation, checkpoints.
  config.log_every = 10  # Progress line and train metrics, in steps.
  config.eval_every = 100  # Test accuracy, in steps (and at the end).
  config.checkpoint_every = 1_000  # Train-state checkpoint (and at the end).

  return config.lock()

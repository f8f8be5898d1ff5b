r"""Measures inference speed (`vit_jax.inference_time`; the original's config).

  python -m vit_jax.main --workdir=/tmp/speed \
      --config=vit_jax/configs/inference_time.py \
      --config.batch=64 --config.num_classes=1000 --config.image_size=224

Runs `initial_steps` inferences of zoo model `model_name` on a constant batch
without timing them, then times `steps`, and writes images/s per device
(min, max, mean, std) to TensorBoard events in the workdir.
"""

import ml_collections


def get_config():
  """The inference timing config (not locked, as the original's)."""
  config = ml_collections.ConfigDict()
  config.model_name = 'ViT-B_32'  # A key of vit_jax.configs.models.
  config.log_dir = '.'
  config.steps = 30  # Timed inferences.
  config.initial_steps = 10  # Untimed inferences before them.
  # These three must be set (> 0).
  config.batch = 0
  config.num_classes = 0
  config.image_size = 0  # Height = width.
  # The trainer train.train_and_evaluate runs (original_configs.trainer).
  config.train = 'inference_time'
  return config

"""Fake pre-trained checkpoints for tests (the original's `test_utils`)."""

import os

import jax
import jax.numpy as jnp

from vit_jax import checkpoint
from vit_jax import models
from vit_jax.data import filesystem


def create_checkpoint(model_config, path, *, image_size=16):
  """Writes a freshly initialised zoo ViT or Mixer `model_config` to `path`.

  `image_size`: the Mixer's must be the fine-tuning resolution (its
  token-mixing MLPs cannot be resampled).
  """
  model = models.from_config(model_config, num_classes=1)
  params = model.init(
      jax.random.PRNGKey(0),
      jnp.ones([1, image_size, image_size, 3], jnp.float32),
      train=False)['params']
  directory = os.path.dirname(os.fspath(path))
  if directory:
    filesystem.makedirs(directory)
  checkpoint.save(params, path)

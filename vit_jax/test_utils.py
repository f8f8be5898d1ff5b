"""Fake pre-trained checkpoints for tests (the original's `test_utils`)."""

import os

import jax
import jax.numpy as jnp

from vit_jax import checkpoint
from vit_jax.data import filesystem
from vit_jax import models


def create_checkpoint(model_config, path, *, image_size=16):
  """Writes a freshly initialised `model_config` model to `path` (`.npz`).

  Args:
    model_config: a zoo ConfigDict (`vit_jax.configs.models`), ViT or Mixer.
    path: the file; its directory is created.
    image_size: the side of the images the model is initialised for (a
      Mixer's token-mixing MLPs, unlike a ViT's position embedding, cannot
      be resampled, so give it the fine-tuning resolution).
  """
  model = models.from_config(model_config, num_classes=1)
  params = model.init(jax.random.PRNGKey(0),
                      jnp.ones([1, image_size, image_size, 3], jnp.float32),
                      train=False)['params']
  directory = os.path.dirname(os.fspath(path))
  if directory:
    filesystem.makedirs(directory)
  checkpoint.save(params, path)

"""The official fixtures (tests/data/official): their models, inputs and outputs.

Outputs were produced by Google's original vit_jax (see data/official/README.md).
"""

import os

import ml_collections
import numpy as np

from vit_jax import models

DATA = os.path.join(os.path.dirname(__file__), 'data', 'official')
NAMES = ('testing', 'tiny_vit_token', 'tiny_hybrid_r2x2')
# (name, released_names) of every parameter file: `testing` ships linen names only.
PARAM_FILES = (('testing', False), ('tiny_vit_token', False),
               ('tiny_vit_token', True), ('tiny_hybrid_r2x2',
                                          False), ('tiny_hybrid_r2x2', True))
ATOL = 1e-5  # The original itself, with and without jit, differs by 1.3e-6.


def model_config(name: str) -> ml_collections.ConfigDict:
  """The VisionTransformer fields (with num_classes) of fixture `name`."""
  if name == 'testing':
    config = models.MODEL_CONFIGS['testing'].copy_and_resolve_references()
    config.unlock()
  else:
    config = ml_collections.ConfigDict(
        dict(
            model_name=name,
            patches=ml_collections.ConfigDict({'size': (16, 16)}),
            hidden_size=32,
            transformer=ml_collections.ConfigDict(
                dict(
                    num_layers=2,
                    num_heads=2,
                    mlp_dim=64,
                    dropout_rate=0.0,
                    attention_dropout_rate=0.0)),
            classifier='token',
            representation_size=16,
        ))
    if name == 'tiny_hybrid_r2x2':
      config.patches.size = (1, 1)
      config.representation_size = None
      config.resnet = ml_collections.ConfigDict(
          dict(num_layers=(2, 2), width_factor=0.5))
  config.num_classes = 10
  return config


def model(name: str, **kw) -> models.VisionTransformer:
  return models.from_config(model_config(name), **kw)


def path(filename: str) -> str:
  return os.path.join(DATA, filename)


def params_path(name: str, released_names: bool = False) -> str:
  suffix = '_params_prelinen_names.npz' if released_names else '_params.npz'
  return path(name + suffix)


def inputs() -> np.ndarray:
  return np.load(path('inputs_64.npy'))


def logits(name: str) -> np.ndarray:
  return np.load(path(f'{name}_logits.npy'))


def pre_logits(name: str) -> np.ndarray:
  return np.load(path(f'{name}_pre_logits.npy'))


def apply_with_pre_logits(model_, params, images):
  """(logits, output of the module named pre_logits), as the fixtures store them."""
  logits_, state = model_.apply(
      {'params': params},
      images,
      train=False,
      capture_intermediates=lambda m, _: m.name == 'pre_logits',
      mutable=['intermediates'])
  return logits_, state['intermediates']['pre_logits']['__call__'][0]

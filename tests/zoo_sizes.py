"""Exact parameter counts of every zoo model, and its traced shapes.

`PARAM_COUNTS` pins every name of both registries `models.get_model` reads,
the original's `vit_jax.configs.models.MODEL_CONFIGS` and this project's
`vit_jax.configs.project_models.PROJECT_MODEL_CONFIGS`, at 1000 classes and
224x224 images: tests/test_models.py checks the ViTs and fails for a
registered name without a count here, tests/test_mixer.py checks the Mixers,
tests/test_bit.py the BiT ResNets. The counts of the original's names are
also pinned by its models test
(https://github.com/google-research/vision_transformer, vit_jax/models_test.py);
the paper's Table 1 rounds them (86M, 307M, 632M).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models

PARAM_COUNTS = {
    # Unit-test models (hidden size 10, one block).
    'testing': 21_390,
    'testing-unpooled': 21_370,  # no class token
    'ViT-Ti_16': 5_717_416,
    'ViT-S_16': 22_050_664,
    'ViT-S_32': 22_878_952,
    'ViT-B_8': 86_576_872,
    'ViT-B_16': 86_567_656,
    'ViT-B_32': 88_224_232,
    'ViT-L_16': 304_326_632,
    'ViT-L_32': 306_535_400,
    'ViT-H_14': 632_045_800,
    # AugReg's: the plain model less the class token and its position row.
    'ViT-S_16-gap-norep': 22_049_896,
    'ViT-S_32-gap-norep': 22_878_184,
    'ViT-B_16-gap-norep': 86_566_120,
    'ViT-B_32-gap-norep': 88_222_696,
    'R+ViT-Ti_16': 6_337_704,
    'R26+ViT-S_32': 36_431_912,
    'R26+ViT-B_32': 101_383_976,
    'R50+ViT-B_16': 98_659_112,
    'R50+ViT-L_32': 328_994_856,
    # MLP-Mixer (Tolstikhin et al., 2021).
    'Mixer-B_16': 59_880_472,
    'Mixer-B_32': 60_293_428,
    'Mixer-L_16': 208_196_168,
    # This project's registry (vit_jax/configs/project_models.py).
    # Zhai et al. (2022) give 1011M without the head.
    'ViT-g_14': 1_012_611_432,
    'ViT-Ti_16-gap-norep': 5_717_032,
    'ViT-L_16-gap-norep': 304_324_584,
    # BiT ResNets in the hybrids' post-activation layout: BiT's released
    # pre-activation R50x1 has 25,549,352 (11,776 fewer GroupNorm weights).
    'BiT-testing': 376_840,
    'BiT-R50x1': 25_561_128,
    'BiT-R50x3': 217_354_408,
    'BiT-R101x1': 44_553_256,
    'BiT-R101x3': 387_970_216,
    'BiT-R152x2': 236_358_760,
    'BiT-R152x4': 936_580_328,
}


@functools.lru_cache(maxsize=None)
def param_shapes(name, num_classes=1000, image_size=224):
  """The 'params' tree of zoo model `name` as shapes, traced once per process.

  `jax.eval_shape` traces `init` without computing it, so even ViT-g/14
  costs only the tracing. The tree is shared between callers: read it only.
  """
  model = models.get_model(name, num_classes=num_classes)
  images = jnp.zeros((1, image_size, image_size, 3))
  variables = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), images, train=False))
  return variables['params']


def count(tree):
  """The number of parameters in a tree of arrays or shapes."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))

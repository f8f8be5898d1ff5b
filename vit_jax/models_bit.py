"""BiT ResNet classifier: the paper's ResNet baselines (Sec. 4.2, Table 2).

Kolesnikov et al., "Big Transfer (BiT)" (https://arxiv.org/abs/1912.11370):
a ResNet-v2 with weight-standardised convolutions and GroupNorm, global
average pooling and a zero-initialised dense head. Built from the hybrids'
stem (`models_resnet.resnet_stem`, the original vit_jax's units and names),
so the units are post-activation and the root has a GroupNorm. The released
BiT `.npz` files are NOT read: their units are pre-activation (GroupNorm
before each conv, none after the root) and their names differ
(`root_block/conv_root`, `block1/unit01/gn1`, `conv_head`).
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from vit_jax import models_resnet

Dtype = Any


class BitResNet(nn.Module):
  """ResNet of `resnet.num_layers` stages and `resnet.width_factor`.

  `model.apply({'params': p}, images, train=False)`, images NHWC of any size;
  `train` is accepted for the train loop and changes nothing (no dropout).
  `num_classes` 0/None returns the pooled features (`4 * 64 * 2**(S-1) *
  width_factor` of them). Logits are float32.
  """

  num_classes: Optional[int]
  resnet: Any
  head_bias_init: float = 0.
  model_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs, *, train: bool = False):
    del train
    x = models_resnet.resnet_stem(
        inputs,
        width_factor=self.resnet.width_factor,
        num_layers=tuple(self.resnet.num_layers),
        dtype=self.dtype)
    # BiT's final norm and ReLU before the pool.
    x = nn.relu(nn.GroupNorm(name='gn_pre_head', dtype=self.dtype)(x))
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # head in float32
    if self.num_classes:
      x = nn.Dense(
          features=self.num_classes,
          name='head',
          kernel_init=nn.initializers.zeros,
          bias_init=nn.initializers.constant(self.head_bias_init))(
              x)
    return x

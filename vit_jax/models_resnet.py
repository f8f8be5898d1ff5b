"""The ResNet stem of the hybrid models (paper, Section 3.1).

BiT-style ResNet-v2: weight-standardised convolutions and GroupNorm, with the
parameter names of Google's released hybrid checkpoints.
"""

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


def weight_standardize(w, axis, eps):
  """Standardises `w` over `axis`: (w - mean) / (std + eps), population std."""
  w = w - jnp.mean(w, axis=axis)
  w = w / (jnp.std(w, axis=axis) + eps)
  return w


class StdConv(nn.Conv):
  """Convolution with its kernel standardised at each use (BiT)."""

  def param(self, name, *args, **kwargs):
    param = super().param(name, *args, **kwargs)
    if name == 'kernel':
      param = weight_standardize(param, axis=[0, 1, 2], eps=1e-5)
    return param


class ResidualUnit(nn.Module):
  """Bottleneck: 1x1 -> 3x3 (strided) -> 1x1, `4 * features` channels out."""
  features: int
  strides: Tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s, name: StdConv(  # pylint: disable=g-long-lambda
        features=f,
        kernel_size=k,
        strides=s,
        use_bias=False,
        dtype=self.dtype,
        name=name)
    norm = lambda name, **kw: nn.GroupNorm(name=name, dtype=self.dtype, **kw)

    needs_projection = (
        x.shape[-1] != self.features * 4 or tuple(self.strides) != (1, 1))
    residual = x
    if needs_projection:
      residual = conv(self.features * 4, (1, 1), self.strides, 'conv_proj')(
          residual)
      residual = norm('gn_proj')(residual)

    y = conv(self.features, (1, 1), (1, 1), 'conv1')(x)
    y = nn.relu(norm('gn1')(y))
    y = conv(self.features, (3, 3), self.strides, 'conv2')(y)
    y = nn.relu(norm('gn2')(y))
    y = conv(self.features * 4, (1, 1), (1, 1), 'conv3')(y)
    # Zero-initialised last norm: each unit starts as the identity (Goyal+ 2017).
    y = norm('gn3', scale_init=nn.initializers.zeros)(y)
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """A stage of `block_size` units; only the first one strides."""
  block_size: int
  nout: int
  first_stride: Tuple[int, int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = ResidualUnit(
        self.nout, strides=self.first_stride, dtype=self.dtype, name='unit1')(
            x)
    for i in range(1, self.block_size):
      x = ResidualUnit(
          self.nout, strides=(1, 1), dtype=self.dtype, name=f'unit{i + 1}')(
              x)
    return x


def resnet_stem(x, *, width_factor: float, num_layers: Sequence[int],
                dtype: Dtype):
  """Applies the hybrid ResNet stem inside the caller's compact module.

  Its submodules get the released checkpoints' top-level names.
  """
  width = int(64 * width_factor)
  x = StdConv(
      features=width,
      kernel_size=(7, 7),
      strides=(2, 2),
      use_bias=False,
      dtype=dtype,
      name='conv_root')(
          x)
  x = nn.GroupNorm(name='gn_root', dtype=dtype)(x)
  x = nn.relu(x)
  x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='SAME')
  for i, block_size in enumerate(num_layers):
    x = ResNetStage(
        block_size=block_size,
        nout=width * 2**i,
        first_stride=(1, 1) if i == 0 else (2, 2),
        dtype=dtype,
        name=f'block{i + 1}')(
            x)
  return x

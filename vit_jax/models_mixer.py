"""MLP-Mixer (Tolstikhin et al., "MLP-Mixer: An all-MLP Architecture for
Vision", NeurIPS 2021), as the original `vit_jax` has it.

Module and parameter names are the original's (`stem`, `MixerBlock_{i}/
{LayerNorm_0, token_mixing, LayerNorm_1, channel_mixing}/Dense_{0,1}`,
`pre_head_layer_norm`, `head`), so its released `.npz` files (gs://
mixer_models/) load with `checkpoint.load` and are written back unchanged by
`checkpoint.save`. Numerics are the original's: flax LayerNorm defaults
(eps 1e-6), tanh-approximated GELU, global average pooling before a head whose
kernel starts at zero.
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> Dense back to the input width.

  Attributes:
    mlp_dim: hidden width of the MLP.
  """
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(nn.Dense(self.mlp_dim)(x))
    return nn.Dense(x.shape[-1])(y)


class MixerBlock(nn.Module):
  """Token mixing (an MLP across patches) then channel mixing, pre-LayerNorm.

  Attributes:
    tokens_mlp_dim: hidden width of the token-mixing MLP.
    channels_mlp_dim: hidden width of the channel-mixing MLP.
  """
  tokens_mlp_dim: int
  channels_mlp_dim: int

  @nn.compact
  def __call__(self, x_BxTxC):
    y_BxCxT = jnp.swapaxes(nn.LayerNorm()(x_BxTxC), 1, 2)
    y_BxCxT = MlpBlock(self.tokens_mlp_dim, name='token_mixing')(y_BxCxT)
    x_BxTxC = x_BxTxC + jnp.swapaxes(y_BxCxT, 1, 2)
    y_BxTxC = nn.LayerNorm()(x_BxTxC)
    return x_BxTxC + MlpBlock(self.channels_mlp_dim,
                              name='channel_mixing')(y_BxTxC)


class MlpMixer(nn.Module):
  """The Mixer classifier.

  Called like `VisionTransformer`: `model.apply({'params': p}, images,
  train=False)` with NHWC images in [-1, 1] (the model has no dropout, so
  `train` changes nothing).

  Attributes:
    patches: ConfigDict with `size` = (ph, pw); the stem's kernel and stride.
    num_classes: size of the head; 0/None for no head (pooled features out).
    num_blocks: number of MixerBlocks.
    hidden_dim: channels per patch C.
    tokens_mlp_dim: hidden width of every token-mixing MLP.
    channels_mlp_dim: hidden width of every channel-mixing MLP.
    model_name: zoo name, informational.
  """
  patches: Any
  num_classes: Optional[int]
  num_blocks: int
  hidden_dim: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  model_name: Optional[str] = None

  @nn.compact
  def __call__(self, inputs, *, train):
    del train  # No dropout in the Mixer.
    patch = tuple(self.patches.size)
    x = nn.Conv(self.hidden_dim, patch, strides=patch, name='stem')(inputs)
    batch, rows, cols, channels = x.shape
    x_BxTxC = jnp.reshape(x, (batch, rows * cols, channels))
    for _ in range(self.num_blocks):
      x_BxTxC = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim)(x_BxTxC)
    x_BxTxC = nn.LayerNorm(name='pre_head_layer_norm')(x_BxTxC)
    x_BxC = jnp.mean(x_BxTxC, axis=1)
    if self.num_classes:
      x_BxC = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                       name='head')(x_BxC)
    return x_BxC

"""MLP-Mixer (Tolstikhin et al., 2021), as the original `vit_jax` has it.

Module names and numerics are the original's, so the released `.npz` files
(gs://mixer_models/) load with `checkpoint.load` and save back unchanged.
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> Dense back to the input width."""
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(nn.Dense(self.mlp_dim)(x))
    return nn.Dense(x.shape[-1])(y)


class MixerBlock(nn.Module):
  """Token mixing (an MLP across patches) then channel mixing, pre-LayerNorm."""
  tokens_mlp_dim: int
  channels_mlp_dim: int

  @nn.compact
  def __call__(self, x_BxTxC):
    y_BxCxT = jnp.swapaxes(nn.LayerNorm()(x_BxTxC), 1, 2)
    y_BxCxT = MlpBlock(self.tokens_mlp_dim, name='token_mixing')(y_BxCxT)
    x_BxTxC = x_BxTxC + jnp.swapaxes(y_BxCxT, 1, 2)
    y_BxTxC = nn.LayerNorm()(x_BxTxC)
    return x_BxTxC + MlpBlock(
        self.channels_mlp_dim, name='channel_mixing')(
            y_BxTxC)


class MlpMixer(nn.Module):
  """The Mixer classifier, called like `VisionTransformer` (no dropout).

  Attributes:
    patches: ConfigDict with `size` = (ph, pw); the stem's kernel and stride.
    num_classes: size of the head; 0/None for no head (pooled features out).
    num_blocks: number of MixerBlocks.
    hidden_dim: channels per patch.
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
      x_BxC = nn.Dense(
          self.num_classes, kernel_init=nn.initializers.zeros, name='head')(
              x_BxC)
    return x_BxC

"""Position embeddings besides the learned 1-D table (paper, Appendix D.4).

`Encoder(posemb=...)`: 'learn_2d' is `AddPositionEmbs2D`, 'sincos2d'
`AddSinCosPositionEmbs`, 'relative' `relative_attention`.

`posemb_where` places the learned tables ('learn', 'learn_2d'), the
columns of the paper's Table 8, with these parameter names under
`Transformer/`:
  'input': `posembed_input/...` added to the encoder's input (the default);
  'every_layer': `encoderblock_{i}/posembed/...`, a table per block, added
    at the start of the block;
  'every_layer_shared': `posembed_shared/...`, one table added at the start
    of every block.
`...` is `pos_embedding` ('learn'), or `pos_embedding_row`,
`pos_embedding_col` and `pos_embedding_cls` ('learn_2d'). Only 'input' has
dropout after the embedding, as the original.
"""

from typing import Any, Callable, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., Any]


class AddPositionEmbs(nn.Module):
  """Adds a learned (1, tokens, hidden) position embedding to the tokens."""
  posemb_init: Initializer
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs):
    pos_emb_shape = (1, inputs.shape[1], inputs.shape[2])
    pe = self.param('pos_embedding', self.posemb_init, pos_emb_shape,
                    self.param_dtype)
    return inputs + pe


def posemb_module(posemb: str, *, grid, num_prefix_tokens: int,
                  name: str) -> nn.Module:
  """The module adding the table of `posemb` ('learn', 'learn_2d' or
  'sincos2d'); `grid` (rows, cols) is needed by the last two."""
  posemb_init = nn.initializers.normal(stddev=0.02)  # BERT's.
  if posemb == 'learn':
    return AddPositionEmbs(posemb_init=posemb_init, name=name)
  return grid_embedding(
      posemb,
      grid=tuple(grid),
      num_prefix_tokens=num_prefix_tokens,
      posemb_init=posemb_init,
      name=name)


class AddPositionEmbs2D(nn.Module):
  """Learned 2-D position embedding of the paper's ablation (Appendix D.4).

  A token gets the concatenation of a row and a column table (D/2 each); the
  class token has a learned row of its own.

  Attributes:
    grid: (rows, cols) of the patch grid.
    num_prefix_tokens: tokens before the grid (1 for the class token, else 0).
    posemb_init: initializer of the tables.
    param_dtype: dtype of the tables.
  """
  grid: Tuple[int, int]
  num_prefix_tokens: int
  posemb_init: Initializer
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs):
    _, n, d = inputs.shape
    if d % 2:
      raise ValueError('learn_2d position embedding needs an even hidden '
                       f'size; got {d}.')
    gh, gw = self.grid
    row = self.param('pos_embedding_row', self.posemb_init, (gh, d // 2),
                     self.param_dtype)
    col = self.param('pos_embedding_col', self.posemb_init, (gw, d // 2),
                     self.param_dtype)
    pe_hxwxd = jnp.concatenate([
        jnp.broadcast_to(row[:, None, :], (gh, gw, d // 2)),
        jnp.broadcast_to(col[None, :, :], (gh, gw, d // 2)),
    ],
                               axis=-1)
    pe = pe_hxwxd.reshape(gh * gw, d)
    if self.num_prefix_tokens:
      cls_pe = self.param('pos_embedding_cls', self.posemb_init,
                          (self.num_prefix_tokens, d), self.param_dtype)
      pe = jnp.concatenate([cls_pe, pe], axis=0)
    if pe.shape[0] != n:
      raise ValueError(f'learn_2d position embedding for grid {self.grid} and '
                       f'{self.num_prefix_tokens} prefix tokens has '
                       f'{pe.shape[0]} rows; the input has {n} tokens.')
    return inputs + pe[None]


def posemb_sincos_2d(gh: int, gw: int, dim: int, temperature: float = 10_000.):
  """Fixed 2-D sin-cos table (gh*gw, dim): [sin(x), cos(x), sin(y), cos(y)]."""
  if dim % 4:
    raise ValueError('sincos2d position embedding needs a hidden size '
                     f'divisible by 4; got {dim}.')
  y, x = np.mgrid[:gh, :gw]
  omega = 1. / temperature**(np.arange(dim // 4) / (dim // 4))
  y = np.einsum('m,d->md', y.reshape(-1), omega)
  x = np.einsum('m,d->md', x.reshape(-1), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe.astype(np.float32)


class AddSinCosPositionEmbs(nn.Module):
  """Adds the fixed 2-D sin-cos embedding; prefix tokens get zeros."""
  grid: Tuple[int, int]
  num_prefix_tokens: int

  @nn.compact
  def __call__(self, inputs):
    _, n, d = inputs.shape
    pe = posemb_sincos_2d(*self.grid, d)
    pe = np.concatenate([np.zeros((self.num_prefix_tokens, d), pe.dtype), pe])
    if pe.shape[0] != n:
      raise ValueError(f'sincos2d position embedding for grid {self.grid} has '
                       f'{pe.shape[0]} rows; the input has {n} tokens.')
    return inputs + jnp.asarray(pe, inputs.dtype)[None]


def grid_embedding(posemb: str, *, grid: Tuple[int,
                                               int], num_prefix_tokens: int,
                   posemb_init: Initializer, name: str) -> nn.Module:
  """The module of `posemb` 'learn_2d' or 'sincos2d'."""
  if posemb == 'learn_2d':
    return AddPositionEmbs2D(
        grid=grid,
        num_prefix_tokens=num_prefix_tokens,
        posemb_init=posemb_init,
        name=name)
  if posemb == 'sincos2d':
    return AddSinCosPositionEmbs(
        grid=grid, num_prefix_tokens=num_prefix_tokens, name=name)
  raise ValueError(f'{posemb!r} is not a position embedding of the patch '
                   "grid; use 'learn_2d' or 'sincos2d'.")

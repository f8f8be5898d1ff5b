"""Resampling position embeddings to a new token grid.

Fine-tuning at a higher resolution keeps the patch size, so "we perform 2D
interpolation of the pre-trained position embeddings, according to their
location in the original image" (paper Sec. 3.2). `resample_grid` does it
as the original (`scipy.ndimage.zoom(order=1)`) or bicubically.
"""

import math
from typing import Optional, Sequence, Tuple

import numpy as np

from vit_jax.checkpoints.trees import CheckpointError

Grid = Tuple[int, int]

# 'bilinear_aligned' is the original's scipy.ndimage.zoom(order=1);
# 'bilinear' is accepted as its short name.
RESAMPLE_METHODS = ('bilinear_aligned', 'bicubic')
_METHOD_ALIASES = {'bilinear': 'bilinear_aligned'}


def _bilinear_aligned_weights(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] corner-aligned linear weights, as
  `scipy.ndimage.zoom(order=1)`."""
  weights = np.zeros((n_out, n_in))
  if n_in == 1 or n_out == 1:
    weights[:, 0] = 1.
    return weights
  position = np.arange(n_out) * ((n_in - 1) / (n_out - 1))
  left = np.clip(np.floor(position).astype(int), 0, n_in - 2)
  frac = position - left
  rows = np.arange(n_out)
  weights[rows, left] = 1. - frac
  weights[rows, left + 1] += frac
  return weights


def _keys_cubic(x: np.ndarray) -> np.ndarray:
  """Keys' cubic convolution kernel with a = -0.5 (Keys 1981)."""
  x = np.abs(x)
  near = (1.5 * x - 2.5) * x * x + 1.
  far = ((-0.5 * x + 2.5) * x - 4.) * x + 2.
  return np.where(x < 1., near, np.where(x < 2., far, 0.))


def _bicubic_weights(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] bicubic weights, as `jax.image.resize(method='cubic')`.

  Half-pixel centres; when shrinking, the kernel is stretched (antialiased);
  taps outside the input are dropped and rows renormalised.
  """
  scale = n_in / n_out
  support = max(scale, 1.)
  centre = (np.arange(n_out) + 0.5) * scale - 0.5
  weights = _keys_cubic((centre[:, None] - np.arange(n_in)[None, :]) / support)
  return weights / weights.sum(axis=1, keepdims=True)


def resample_grid(grid_HxWxD: np.ndarray,
                  new_hw: Grid,
                  method: str = 'bilinear_aligned') -> np.ndarray:
  """Resamples embeddings [H, W, D] to [new_h, new_w, D] in float64.

  `method` is 'bilinear_aligned' (the original's) or 'bicubic'. Returns
  the input's dtype.
  """
  method = _METHOD_ALIASES.get(method, method)
  if method not in RESAMPLE_METHODS:
    raise ValueError(f'Unknown resampling method {method!r}; use one of '
                     f'{RESAMPLE_METHODS + tuple(_METHOD_ALIASES)}.')
  weights_fn = (
      _bilinear_aligned_weights
      if method == 'bilinear_aligned' else _bicubic_weights)
  h, w, _ = grid_HxWxD.shape
  new_h, new_w = new_hw
  rows_hxH = weights_fn(h, new_h)
  cols_wxW = weights_fn(w, new_w)
  out = np.einsum('hH,HWd,wW->hwd', rows_hxH,
                  np.asarray(grid_HxWxD, np.float64), cols_wxW)
  return out.astype(grid_HxWxD.dtype)


def grid_of(num_tokens: int, grid: Optional[Sequence[int]], what: str) -> Grid:
  """`grid` checked against `num_tokens`, or the square grid of that many."""
  if grid is not None:
    gh, gw = (int(g) for g in grid)
    if gh <= 0 or gw <= 0 or gh * gw != num_tokens:
      raise CheckpointError(
          f'The {what} grid {gh}x{gw} has {gh * gw} tokens, but the position '
          f'embedding has {num_tokens} grid tokens.')
    return gh, gw
  g = math.isqrt(max(num_tokens, 0))
  if num_tokens <= 0 or g * g != num_tokens:
    raise CheckpointError(
        f'The {what} position embedding has {num_tokens} grid tokens, which '
        'is not a square grid; give the grid explicitly (grid=/old_grid= of '
        'interpolate_posembed, image_size=/pretrained_image_size= of '
        'load_pretrained, --image-size/--source-image-size of the command '
        'line).')
  return g, g


def image_grid(image_size, stride: Grid, what: str) -> Grid:
  """Tokens per (row, column) of an image size; `what` names it in errors."""
  if isinstance(image_size, int):
    image_size = (image_size, image_size)
  h, w = (int(s) for s in image_size)
  sh, sw = stride
  if h <= 0 or w <= 0 or h % sh or w % sw:
    raise CheckpointError(
        f'The {what} image size {h}x{w} is not a positive multiple of the '
        f'{sh}x{sw} pixels per token of the model.')
  return h // sh, w // sw


def _linear_taps(x: np.ndarray, lo: int, hi: int):
  """Integer neighbours of `x` in [lo, hi] and their linear weights."""
  left = np.clip(np.floor(x), lo, max(hi - 1, lo)).astype(int)
  right = np.minimum(left + 1, hi)
  frac = np.where(right > left, x - left, 0.)
  return left, right, 1. - frac, frac


def relative_weights(old_grid: Grid, new_grid: Grid) -> np.ndarray:
  """[2N'-1, 2N-1] weights taking a 1-D relative table to another grid.

  Row o + N - 1 of a table is the raster offset o = p_q - p_k on a grid
  (h, w), read as the displacement (dr, dc) = (round(o / w), o - dr w) that
  most pairs with that offset have (dr within the rows). A new offset's
  displacement is scaled to the old grid corner-aligned (as
  'bilinear_aligned' moves the absolute embeddings, paper Sec. 3.2) and read
  bilinearly from the old rows of the four nearest integer displacements.
  The same grid gives the identity.
  """
  (h, w), (new_h, new_w) = old_grid, new_grid
  n, new_n = h * w, new_h * new_w
  offset = np.arange(-(new_n - 1), new_n)
  dr = np.clip(np.round(offset / new_w), -(new_h - 1), new_h - 1)
  dc = offset - dr * new_w
  r = dr * ((h - 1) / (new_h - 1) if new_h > 1 else 0.)
  c = dc * ((w - 1) / (new_w - 1) if new_w > 1 else 0.)
  r0, r1, wr0, wr1 = _linear_taps(r, -(h - 1), h - 1)
  c0, c1, wc0, wc1 = _linear_taps(c, -(w - 1), w - 1)
  weights = np.zeros((2 * new_n - 1, 2 * n - 1))
  rows = np.arange(2 * new_n - 1)
  for ri, wr in ((r0, wr0), (r1, wr1)):
    for ci, wc in ((c0, wc0), (c1, wc1)):
      np.add.at(weights, (rows, ri * w + ci + n - 1), wr * wc)
  return weights


def resample_relative(table: np.ndarray, old_grid: Grid,
                      new_grid: Grid) -> np.ndarray:
  """A relative table [2N-1, ...] for another grid (`relative_weights`)."""
  table = np.asarray(table)
  out = np.einsum('nm,m...->n...', relative_weights(old_grid, new_grid),
                  table.astype(np.float64))
  return out.astype(table.dtype)

"""The paper's inspection figures (Sec. 4.5, Fig. 6 and 7, Appendix D.7-D.8).

Each function returns the numbers behind a figure and, given `path`, writes a
PNG (matplotlib's Agg canvas, not pyplot, so notebooks keep their backend).
Images are float32 [B, H, W, 3] in [-1, 1], as the model takes them.
"""

import os
from typing import Any, List, Optional, Sequence, Tuple

import jax
import numpy as np

from vit_jax import models

Params = Any

# ---------------------------------------------------------------- helpers


def _mosaic(tiles: np.ndarray,
            cols: int,
            pad: int = 1,
            fill: float = 1.0) -> np.ndarray:
  """Tiles [n, h, w(, c)] -> one image, `cols` tiles per row, padded."""
  n, h, w = tiles.shape[:3]
  rows = -(-n // cols)
  out = np.full(
      (rows * (h + pad) - pad, cols * (w + pad) - pad, *tiles.shape[3:]), fill,
      np.float32)
  for i, tile in enumerate(tiles):
    r, c = divmod(i, cols)
    out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = tile
  return out


def _save(fig, path):
  directory = os.path.dirname(os.fspath(path))
  if directory:
    os.makedirs(directory, exist_ok=True)
  fig.savefig(path, dpi=100, bbox_inches='tight')


def _new_figure(size):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  return Figure(figsize=size)


def _to_display(images):
  """[-1, 1] -> [0, 1] for imshow."""
  return np.clip((np.asarray(images, np.float32) + 1) / 2, 0, 1)


# ------------------------------------------------- patch-embedding filters


def embedding_filters_pca(params: Params,
                          n: int = 28,
                          path: Optional[str] = None) -> np.ndarray:
  """Principal components of the linear patch-embedding filters (Fig. 7 left).

  The D filters of `embedding/kernel` are centred points in R^(ph*pw*3);
  each component's sign makes its largest-magnitude entry positive.

  Returns:
    float32 [n, ph, pw, 3], orthonormal, by decreasing variance.
  """
  kernel = np.asarray(params['embedding']['kernel'], np.float64)
  ph, pw, c, d = kernel.shape
  if c != 3:
    raise ValueError(
        f'embedding/kernel has {c} input channels, not RGB: in a hybrid model '
        'the patch embedding acts on ResNet features, so its filters are not '
        'images. This figure is for plain ViTs.')
  filters_DxP = kernel.reshape(ph * pw * c, d).T
  if not 1 <= n <= min(filters_DxP.shape):
    raise ValueError(f'n={n} components requested; at most '
                     f'{min(filters_DxP.shape)} exist for a kernel of shape '
                     f'{kernel.shape}.')
  centred = filters_DxP - filters_DxP.mean(axis=0, keepdims=True)
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  comps = vt[:n]
  signs = np.sign(comps[np.arange(n), np.argmax(np.abs(comps), axis=1)])
  comps = (comps * signs[:, None]).reshape(n, ph, pw, c).astype(np.float32)
  if path is not None:
    lo = comps.min(axis=(1, 2, 3), keepdims=True)
    hi = comps.max(axis=(1, 2, 3), keepdims=True)
    tiles = (comps - lo) / np.maximum(hi - lo, 1e-12)
    cols = min(7, n)
    fig = _new_figure((cols * 1.0, (-(-n // cols)) * 1.0 + 0.4))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(
        _mosaic(tiles, cols, pad=max(1, ph // 8)), interpolation='nearest')
    ax.set_title(f'RGB embedding filters (first {n} principal components)')
    ax.axis('off')
    _save(fig, path)
  return comps


# --------------------------------------------------- position embeddings


def _position_table(params: Params) -> np.ndarray:
  """The position embedding rows of the tokens, [N(+1), D]."""
  posemb = params.get('Transformer', {}).get('posembed_input', {})
  if 'pos_embedding' in posemb:
    return np.asarray(posemb['pos_embedding'], np.float64)[0]
  if 'pos_embedding_row' in posemb:  # learned 2-D (Appendix D.4)
    row = np.asarray(posemb['pos_embedding_row'], np.float64)
    col = np.asarray(posemb['pos_embedding_col'], np.float64)
    gh, gw = len(row), len(col)
    table = np.concatenate([
        np.broadcast_to(row[:, None], (gh, gw, row.shape[1])),
        np.broadcast_to(col[None, :], (gh, gw, col.shape[1]))
    ],
                           axis=-1).reshape(gh * gw, -1)
    if 'pos_embedding_cls' in posemb:
      table = np.concatenate([np.asarray(posemb['pos_embedding_cls']), table])
    return table
  raise ValueError('No learned position embedding in params '
                   '(Transformer/posembed_input/pos_embedding): a model with '
                   "posemb='sincos2d' or 'none' has nothing to show here.")


def position_embedding_similarity(params: Params,
                                  grid: Optional[Tuple[int, int]] = None,
                                  path: Optional[str] = None) -> np.ndarray:
  """Cosine similarity of each patch's position embedding to all others.

  The class token's row is left out; `grid` defaults to square. The PNG is
  laid out as Fig. 7 (centre).

  Returns:
    float32 [gh, gw, gh, gw]; `out[i, j, k, l]` = cos(pe[i, j], pe[k, l]).
  """
  table = _position_table(params)
  prefix = 1 if 'cls' in params else 0
  n = table.shape[0] - prefix
  if grid is None:
    g = int(round(np.sqrt(n)))
    if g * g != n:
      raise ValueError(f'The position embedding has {n} patch rows, not a '
                       'square grid; pass grid=(rows, cols).')
    grid = (g, g)
  gh, gw = grid
  if gh * gw != n:
    raise ValueError(f'grid={tuple(grid)} has {gh * gw} patches but the '
                     f'position embedding has {n} patch rows'
                     f'{" (after the class token)" if prefix else ""}.')
  pe = table[prefix:]
  unit = pe / np.maximum(np.linalg.norm(pe, axis=1, keepdims=True), 1e-12)
  sim = (unit @ unit.T).reshape(gh, gw, gh, gw).astype(np.float32)
  if path is not None:
    tiles = sim.reshape(gh * gw, gh, gw)
    pad = max(1, min(gh, gw) // 7)
    image = _mosaic(tiles, gw, pad=pad, fill=np.nan)
    fig = _new_figure((6, 6 * image.shape[0] / image.shape[1] + 0.3))
    ax = fig.add_subplot(1, 1, 1)
    shown = ax.imshow(
        image, cmap='viridis', vmin=-1, vmax=1, interpolation='nearest')
    ax.set_title('Position embedding similarity')
    ax.set_xlabel('Input patch column')
    ax.set_ylabel('Input patch row')
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(shown, ax=ax, label='Cosine similarity', shrink=0.8)
    _save(fig, path)
  return sim


# ------------------------------------------------------------- attention


def _grid_and_prefix(model, images) -> Tuple[Tuple[int, int], int]:
  sh, sw = model.stride
  return ((images.shape[1] // sh, images.shape[2] // sw),
          int(model.has_class_token))


_JITTED = {}  # id(model) -> (model, jitted fn); modules are unhashable


def _attention_fn(model):
  cached = _JITTED.get(id(model))
  if cached is None or cached[0] is not model:
    fn = jax.jit(lambda p, x: models.attention_weights(model, p, x))
    if len(_JITTED) > 8:
      _JITTED.clear()
    cached = _JITTED[id(model)] = (model, fn)
  return cached[1]


def _attention_in_batches(model, params, images, batch_size):
  """Yields (per-layer attention [b, heads, L, L] as numpy, b)."""
  images = np.asarray(images, np.float32)
  attention = _attention_fn(model)
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    weights = attention(params, batch)
    yield [np.asarray(w, np.float64) for w in weights], len(batch)


def patch_distances(grid: Tuple[int, int],
                    pixels_per_patch: Tuple[int, int]) -> np.ndarray:
  """Pixel distances between patch centres, [gh*gw, gh*gw], row-major grid."""
  gh, gw = grid
  rows, cols = np.divmod(np.arange(gh * gw), gw)
  dy = (rows[:, None] - rows[None, :]) * pixels_per_patch[0]
  dx = (cols[:, None] - cols[None, :]) * pixels_per_patch[1]
  return np.sqrt(dy.astype(np.float64)**2 + dx**2)


def attention_distance(attn_BxHxLxL: np.ndarray,
                       grid: Tuple[int, int],
                       pixels_per_patch: Tuple[int, int],
                       num_prefix_tokens: int = 1) -> np.ndarray:
  """Mean attention distance per head of one layer, float64 [heads].

  Prefix tokens are dropped and each query's weights over the patches
  renormalised, so it is a distance in pixels, averaged over query patches
  and images.
  """
  p = num_prefix_tokens
  attn = np.asarray(attn_BxHxLxL, np.float64)[:, :, p:, p:]
  if attn.shape[-1] != grid[0] * grid[1]:
    raise ValueError(f'Attention over {attn.shape[-1]} patch tokens does not '
                     f'match the grid {tuple(grid)}.')
  attn = attn / np.maximum(attn.sum(axis=-1, keepdims=True), 1e-30)
  dist_per_query = np.einsum('bhqk,qk->bhq', attn,
                             patch_distances(grid, pixels_per_patch))
  return dist_per_query.mean(axis=(0, 2))


def mean_attention_distance(model,
                            params: Params,
                            images: np.ndarray,
                            path: Optional[str] = None,
                            batch_size: int = 32) -> np.ndarray:
  """Mean attention distance per layer and head (Fig. 7 right, D.7).

  Returns float32 [layers, heads] in input pixels (a hybrid's token covers
  `model.stride` pixels); the PNG plots it against depth.
  """
  grid, prefix = _grid_and_prefix(model, images)
  total, count = None, 0
  for weights, b in _attention_in_batches(model, params, images, batch_size):
    per_layer = np.stack(
        [attention_distance(w, grid, model.stride, prefix) for w in weights])
    total = per_layer * b if total is None else total + per_layer * b
    count += b
  if total is None:
    raise ValueError('mean_attention_distance needs at least one image.')
  distances = (total / count).astype(np.float32)
  if path is not None:
    layers, heads = distances.shape
    fig = _new_figure((5, 4))
    ax = fig.add_subplot(1, 1, 1)
    for h in range(heads):
      ax.scatter(
          np.arange(1, layers + 1),
          distances[:, h],
          s=12,
          label=f'Head {h + 1}')
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel('Network depth (layer)')
    ax.set_ylabel('Mean attention distance (pixels)')
    ax.set_title(model.model_name or 'ViT')
    ax.set_ylim(0, None)
    if heads <= 16:
      ax.legend(fontsize='x-small', ncol=2)
    _save(fig, path)
  return distances


def rollout(attentions: Sequence[np.ndarray]) -> np.ndarray:
  """Attention rollout through the layers (Abnar & Zuidema, 2020).

  Per layer: mean over heads, plus the identity for the residual, rows
  renormalised; then the product over layers. Takes per-layer [B, heads, L,
  L] from input to output; returns float64 [B, L, L], rows summing to one.
  """
  joint = None
  for attn in attentions:
    a = np.asarray(attn, np.float64).mean(axis=1)
    a = a + np.eye(a.shape[-1])
    a = a / a.sum(axis=-1, keepdims=True)
    joint = a if joint is None else a @ joint
  if joint is None:
    raise ValueError('rollout needs the attention of at least one layer.')
  return joint


def rollout_to_grid(joint_BxLxL: np.ndarray, grid: Tuple[int, int],
                    num_prefix_tokens: int) -> np.ndarray:
  """The output token's rollout over the patches, [B, gh, gw]: the class
  token's row, or without one (GAP) the mean of all rows."""
  p = num_prefix_tokens
  rows = joint_BxLxL[:, 0] if p else joint_BxLxL.mean(axis=1)
  return rows[:, p:].reshape(-1, *grid)


def attention_rollout(model,
                      params: Params,
                      images: np.ndarray,
                      path: Optional[str] = None,
                      batch_size: int = 32) -> np.ndarray:
  """Attention rollout maps on the input (Fig. 6, Appendix D.8).

  Returns float32 [B, H, W] in [0, 1]: the rollout over patches, bilinearly
  upsampled and divided by its maximum. The PNG shows the first 8 images
  and each image times its map.
  """
  grid, prefix = _grid_and_prefix(model, images)
  grids: List[np.ndarray] = []
  for weights, _ in _attention_in_batches(model, params, images, batch_size):
    grids.append(rollout_to_grid(rollout(weights), grid, prefix))
  g = np.concatenate(grids)
  g = g / np.maximum(g.max(axis=(1, 2), keepdims=True), 1e-30)
  b, h, w = images.shape[:3]
  maps = np.asarray(
      jax.image.resize(g.astype(np.float32), (b, h, w), 'bilinear'))
  # Half-pixel bilinear upsampling never lands on a patch centre exactly.
  maps = np.clip(maps / np.maximum(maps.max(axis=(1, 2), keepdims=True), 1e-30),
                 0, 1)
  if path is not None:
    shown = min(b, 8)
    fig = _new_figure((4, 2 * shown))
    display = _to_display(images[:shown])
    for i in range(shown):
      for j, (picture, title) in enumerate(
          ((display[i], 'Input'), (display[i] * maps[i][..., None],
                                   'Attention rollout'))):
        ax = fig.add_subplot(shown, 2, 2 * i + j + 1)
        ax.imshow(picture)
        ax.axis('off')
        if i == 0:
          ax.set_title(title)
    _save(fig, path)
  return maps

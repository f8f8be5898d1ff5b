"""Checks of a model's input images, with the sizes and the fix in the error.

Where the original cropped silently or failed inside XLA (size not a
multiple of the patch, channel or token count), `check_images` raises.
"""

import math
from typing import Any, Mapping, Optional, Tuple


def check_images(inputs, *, patch_size: Tuple[int, int], stride: Tuple[int,
                                                                       int],
                 hybrid: bool, params: Optional[Mapping[str, Any]],
                 num_prefix_tokens: int, has_encoder: bool) -> None:
  """Raises ValueError when `inputs` [B, H, W, C] cannot go through the model.

  Args:
    stride: pixels per token along (height, width) (ResNet stem included).
    hybrid: whether a ResNet stem comes before the patch embedding.
    params: the parameters, or None while initialising (rank and size only).
    num_prefix_tokens: tokens in front of the grid (1 with a class token).
    has_encoder: whether there is a position embedding to match.
  """
  if inputs.ndim != 4:
    raise ValueError(
        f'VisionTransformer expects images [batch, height, width, channels]; '
        f'got an array of shape {tuple(inputs.shape)} (rank {inputs.ndim}). '
        'Add a batch axis for a single image (x[None]).')
  _, h, w, c = inputs.shape
  sh, sw = stride
  if h % sh or w % sw:
    what = (f'the patch size {patch_size[0]}x{patch_size[1]}'
            if not hybrid else f'{sh}x{sw} (ResNet stem stride x patch size '
            f'{patch_size[0]}x{patch_size[1]})')
    raise ValueError(
        f'Image size {h}x{w} is not a multiple of {what}. Resize or crop '
        f'the images to a multiple, e.g. {max(h // sh, 1) * sh}x'
        f'{max(w // sw, 1) * sw} or {-(-h // sh) * sh}x{-(-w // sw) * sw}.')
  if params is None:
    return
  _check_channels(params, c, 'conv_root' if hybrid else 'embedding')
  pe = params.get('Transformer', {}).get('posembed_input',
                                         {}).get('pos_embedding')
  if pe is not None and has_encoder:
    _check_tokens(pe.shape[1], (h, w), stride, num_prefix_tokens)


def _check_channels(params, channels: int, first: str) -> None:
  if first not in params:
    return
  shape = tuple(params[first]['kernel'].shape)
  expected = shape[2]
  if expected != channels:
    raise ValueError(
        f'Images have {channels} channels but the model expects {expected} '
        f'({first}/kernel has shape {shape}). ' +
        ('Convert grayscale to RGB (repeat the channel) and drop alpha.'
         if expected == 3 else f'Feed {expected}-channel images.'))


def _check_tokens(rows: int, size, stride, num_prefix_tokens: int) -> None:
  """The learned 1-D position embedding has one row per token."""
  (h, w), (sh, sw) = size, stride
  gh, gw = h // sh, w // sw
  n = gh * gw + num_prefix_tokens
  if rows == n:
    return
  g = math.isqrt(rows - num_prefix_tokens)
  hint = ''
  if g * g == rows - num_prefix_tokens:
    hint = f' (a {g}x{g} grid, i.e. {g * sh}x{g * sw} images)'
  raise ValueError(
      f'Images of {h}x{w} give a {gh}x{gw} grid of tokens = {n} tokens'
      f'{" with the class token" if num_prefix_tokens else ""}, but the '
      f'position embedding has {rows} rows{hint}. Feed images of the '
      'size the model was trained at, or resize the position embedding '
      'with vit_jax.checkpoint.load_pretrained / interpolate_posembed.')

"""Checkpoints in the released `.npz` format (SPEC sections 4, 5 and 8).

A checkpoint is a plain `np.savez` file, one array per parameter, keyed by the
module path joined with '/'. Two naming schemes exist: flax linen's (one
counter per class inside a parent: `LayerNorm_0`, `LayerNorm_1`,
`MultiHeadDotProductAttention_0`, `MlpBlock_0`) and the pre-linen one of the
files Google released (one counter per parent: `LayerNorm_0`,
`MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`). `load` accepts
both, and a few neighbouring layouts, and returns linen names; `save` writes
the released names by default, so that the original's loader and timm's
`_load_weights` read our files.

Layouts `load` recognises (`canonicalize`):
  * linen and released (pre-linen) names; GroupNorm scale/bias stored as
    (1, 1, 1, C) (released hybrids) are squeezed to (C,).
  * old flax optimizer checkpoints: every parameter under `opt/target/`
    (the optimizer state beside it is ignored); a tree under a single
    `params/` root (a train state's parameters).
  * big_vision's ViT: `pos_embedding` (1, N, D) at the top level, and, when
    its model was scanned, `Transformer/encoderblock/...` with a leading layer
    axis (split into `encoderblock_{i}`; see `vit_jax.layouts`). big_vision
    adds the position embedding BEFORE it prepends the class token, so its
    table has no class-token row; this model prepends first and then adds
    (SPEC section 1). The same function in our order is a ZERO position
    embedding row for the class token, which `load` inserts when the file has
    a `cls` parameter.

Fine-tuning (`load_pretrained`, SPEC section 5) follows the original: a fresh
head, `pre_logits` dropped when the new model has none, position embeddings
resampled to the new grid. Beyond the original it handles every classifier,
non-square grids, bicubic resampling and scanned models, and it checks the
result against the model, failing with a list of what differs.

Command line (`python -m vit_jax.checkpoint --help`, in `checkpoint_cli`):
  inspect FILE                    keys, shapes, dtypes, parameter count, and
                                  the model the file holds (zoo name if any).
  convert IN OUT [--names N]      rewrite under linen or released names.
  resize IN OUT --image-size H W  resample the position embedding offline.
"""

import collections
import contextlib
import math
import os
import re
import sys
import tempfile
import zipfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from absl import logging
import numpy as np

from vit_jax import layouts

Params = Dict[str, Any]
Grid = Tuple[int, int]

_NUMBERED = re.compile(r'^(.*)_(\d+)$')
_ENCODER_BLOCK = re.compile(r'^encoderblock_\d+$')
_GROUPNORM = re.compile(r'^gn(\d+|_root|_proj)$')

# Inside an encoder block, linen names -> the names of the released files.
# Pre-linen flax numbered a parent's submodules with one counter in creation
# order: LayerNorm, attention, LayerNorm, MLP (SPEC section 4).
_RELEASED_BLOCK_NAMES = {
    'LayerNorm_0': 'LayerNorm_0',
    'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
    'LayerNorm_1': 'LayerNorm_2',
    'MlpBlock_0': 'MlpBlock_3',
}
NAME_SCHEMES = ('released', 'linen')
# 'bilinear_aligned' is the original's scipy.ndimage.zoom(order=1);
# 'bilinear' is accepted as its short name.
RESAMPLE_METHODS = ('bilinear_aligned', 'bicubic')
_METHOD_ALIASES = {'bilinear': 'bilinear_aligned'}


class CheckpointError(ValueError):
  """A checkpoint file that cannot be read or does not fit the model."""


# ----------------------------------------------------------------------------
# Trees.


def recover_tree(keys, values) -> Params:
  """Nests flat '/'-joined keys into a dict tree."""
  tree = {}
  for key, value in zip(keys, values):
    node = tree
    *parents, leaf = key.split('/')
    for part in parents:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise CheckpointError(f'Key {key!r} nests under a parameter {part!r}.')
    if isinstance(node.get(leaf), dict):
      raise CheckpointError(f'Key {key!r} is both a parameter and a module.')
    node[leaf] = value
  return tree


def flatten_tree(tree: Params, prefix: str = '') -> Dict[str, Any]:
  """The inverse of `recover_tree`: {'a/b/c': leaf}."""
  flat = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, (dict, collections.abc.Mapping)):
      flat.update(flatten_tree(value, path + '/'))
    else:
      flat[path] = value
  return flat


def _flatten_keep_empty(tree: Mapping[str, Any],
                        prefix: str = '') -> Dict[str, Any]:
  """`flatten_tree` keeping empty sub-dicts (layers without weights)."""
  flat = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, collections.abc.Mapping) and value:
      flat.update(_flatten_keep_empty(value, path + '/'))
    else:
      flat[path] = value
  return flat


def _to_dict(tree: Any) -> Any:
  """Mappings (FrozenDict, ConfigDict-like) to plain dicts, leaves untouched."""
  if isinstance(tree, collections.abc.Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def _shape(x) -> Optional[Tuple[int, ...]]:
  if isinstance(x, collections.abc.Mapping):
    return None
  return tuple(getattr(x, 'shape', np.shape(x)))


def convert_pre_linen(params: Params) -> Params:
  """Renumbers pre-linen module names (one counter per parent) per class.

  Inside every dict, names `Class_i` are grouped by `Class` and renumbered
  0, 1, ... in the order of their old index. Linen-named trees pass through
  unchanged, since their numbers already count per class from 0.

  Args:
    params: nested dict.

  Returns:
    The same tree under linen names.
  """
  if not isinstance(params, dict):
    return params
  groups = collections.defaultdict(list)
  out = {}
  for name, value in params.items():
    match = _NUMBERED.match(name)
    if match:
      groups[match.group(1)].append((int(match.group(2)), name, value))
    else:
      out[name] = convert_pre_linen(value)
  for prefix, members in groups.items():
    members.sort(key=lambda member: member[0])
    for new_index, (_, _, value) in enumerate(members):
      out[f'{prefix}_{new_index}'] = convert_pre_linen(value)
  return out


def convert_to_released(params: Params) -> Params:
  """Linen names -> the released (pre-linen) names inside every encoder block.

  The inverse of `convert_pre_linen` for this model family: only encoder
  blocks have submodules of different classes under one parent.

  Args:
    params: nested dict under linen names.

  Returns:
    The tree under released names.
  """
  def walk(tree, in_block):
    out = {}
    for name, value in tree.items():
      if in_block:
        name = _RELEASED_BLOCK_NAMES.get(name, name)
      if isinstance(value, dict):
        value = walk(value, _ENCODER_BLOCK.match(name) is not None)
      out[name] = value
    return out
  return walk(params, False)


def _map_groupnorm(params: Params, fn) -> Params:
  """Applies `fn` to the GroupNorm scale/bias leaves (gn1, gn_root, ...)."""
  def walk(tree, parent):
    out = {}
    for k, v in tree.items():
      if isinstance(v, dict):
        out[k] = walk(v, k)
      elif _GROUPNORM.match(parent) and k in ('scale', 'bias'):
        out[k] = fn(v)
      else:
        out[k] = v
    return out
  return walk(params, '')


def _fix_groupnorm(params: Params) -> Params:
  """Squeezes GroupNorm scale/bias stored as (1, 1, 1, C) (released hybrids)."""
  return _map_groupnorm(
      params, lambda v: v.reshape(-1) if getattr(v, 'ndim', 0) == 4 else v)


def _unsqueeze_groupnorm(params: Params) -> Params:
  """GroupNorm scale/bias to (1, 1, 1, C), as pre-linen flax stored them."""
  return _map_groupnorm(
      params, lambda v: v.reshape(1, 1, 1, -1) if v.ndim == 1 else v)


# ----------------------------------------------------------------------------
# Reading.


def read_npz(path: str) -> Dict[str, np.ndarray]:
  """Reads every array of an `.npz`; a clear CheckpointError for bad files."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f'Checkpoint {path!r} does not exist.')
  if os.path.isdir(path):
    raise CheckpointError(
        f'Checkpoint {path!r} is a directory, not an .npz file. (Orbax '
        'training checkpoints are exported to .npz with checkpoint.save.)')
  if not zipfile.is_zipfile(path):
    raise CheckpointError(
        f'Checkpoint {path!r} is not an .npz file (not a zip archive, or a '
        'truncated one). Re-download or re-export it.')
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError,
          TypeError, AttributeError, NotImplementedError) as e:
    raise CheckpointError(
        f'Cannot read checkpoint {path!r}: not a complete .npz file '
        f'({type(e).__name__}: {e}). Re-download or re-export it.') from e
  if not arrays:
    raise CheckpointError(f'Checkpoint {path!r} holds no arrays.')
  return arrays


def _strip_wrappers(tree: Params) -> Params:
  """The parameters inside `opt/target/` or a lone `params/` root."""
  opt = tree.get('opt')
  if isinstance(opt, dict) and isinstance(opt.get('target'), dict):
    # Old flax `Optimizer`: {'target': params, 'state': ...}.
    return opt['target']
  if set(tree) == {'params'} and isinstance(tree['params'], dict):
    return tree['params']
  return tree


def _convert_big_vision(tree: Params) -> Params:
  """big_vision's top-level `pos_embedding` and scanned blocks to ours."""
  if 'pos_embedding' in tree:
    posemb = tree.pop('pos_embedding')
    transformer = tree.setdefault('Transformer', {})
    if 'posembed_input' in transformer:
      raise CheckpointError('Found both big_vision\'s top-level pos_embedding '
                            'and Transformer/posembed_input.')
    if getattr(posemb, 'ndim', 0) != 3:
      raise CheckpointError(f'pos_embedding has shape {_shape(posemb)}; '
                            'expected (1, tokens, hidden).')
    if 'cls' in tree:
      # big_vision adds the table before prepending the class token: in our
      # order (prepend, then add) that is a zero row for the class token.
      posemb = np.concatenate(
          [np.zeros_like(posemb[:, :1]), np.asarray(posemb)], axis=1)
    transformer['posembed_input'] = {'pos_embedding': posemb}
  try:
    return layouts.scan_to_layers(tree)
  except ValueError as e:
    raise CheckpointError(str(e)) from None


def canonicalize(params: Mapping[str, Any]) -> Params:
  """Any layout `load` knows (see the module docstring) -> linen-named tree.

  Args:
    params: nested dict of arrays (flax FrozenDicts are fine).

  Returns:
    A new nested dict of the same leaves (numpy stays numpy) under linen
    names, per-layer blocks, squeezed GroupNorm parameters.
  """
  tree = _to_dict(params)
  tree = _strip_wrappers(tree)
  tree = _convert_big_vision(tree)
  tree = convert_pre_linen(tree)
  tree = _fix_groupnorm(tree)
  return tree


def load(path: str) -> Params:
  """Loads an `.npz` checkpoint into a nested dict of numpy arrays.

  Accepts linen and released (pre-linen) names, old optimizer and big_vision
  layouts (module docstring); squeezes (1,1,1,C) GroupNorm parameters.
  Returns linen names, ready for `model.apply({'params': p}, ...)`.

  Args:
    path: the `.npz` file.

  Returns:
    The nested parameter dict.

  Raises:
    CheckpointError: the file is missing, not an `.npz`, truncated, or its
      keys do not form a tree.
  """
  flat = read_npz(path)
  try:
    return canonicalize(recover_tree(list(flat), list(flat.values())))
  except CheckpointError as e:
    raise CheckpointError(f'Checkpoint {os.fspath(path)!r}: {e}') from None


# ----------------------------------------------------------------------------
# Writing.


def _as_numpy(x, path: str) -> np.ndarray:
  """A leaf as a numpy array (jax arrays are fetched from their device)."""
  array = np.asarray(x)
  if array.dtype.kind == 'V':
    # bfloat16 and friends (ml_dtypes) have no .npy type; np.load would give
    # raw bytes back. float32 holds them exactly.
    try:
      array = array.astype(np.float32)
    except (TypeError, ValueError) as e:
      raise CheckpointError(f'Parameter {path!r} has dtype {array.dtype}, '
                            'which .npz cannot store.') from e
  if array.dtype.kind == 'O':
    raise CheckpointError(f'Parameter {path!r} is not a numeric array '
                          f'({type(x).__name__}).')
  return array


def save(params: Mapping[str, Any], path: str, *,
         names: str = 'released') -> None:
  """Writes parameters to an `.npz` the original and timm can read.

  This is also how a fine-tuned model leaves the project: training
  checkpoints (e.g. an orbax-restored train state) are exported by passing
  their `params` subtree here. Any nested dict works: numpy or jax arrays
  (fetched from the devices), FrozenDicts, linen or released names, per-layer
  or scanned encoder blocks (scanned ones are written per layer).
  bfloat16 leaves are written as float32.

  The file is written atomically: to a temporary file in the same directory,
  then renamed over `path`, so a crash never leaves a partial file there.

  Args:
    params: nested dict of arrays (the model's 'params' collection).
    path: destination file; written as given (no '.npz' is appended).
    names: 'released' (default): the pre-linen names of Google's released
      files (`MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`
      inside `encoderblock_i`; GroupNorm scale/bias as (1, 1, 1, C)), what
      the original's `checkpoint.load` and timm's `_load_weights` read.
      'linen': this model's own names and shapes.

  Raises:
    CheckpointError: `params` has non-array leaves, no leaves, or the
      destination directory cannot be written.
    ValueError: unknown `names`.
  """
  if names not in NAME_SCHEMES:
    raise ValueError(f'Unknown names={names!r}; use one of {NAME_SCHEMES}.')
  if not isinstance(params, collections.abc.Mapping):
    raise CheckpointError(f'save expects a nested dict of parameters; got '
                          f'{type(params).__name__}.')
  flat = {k: _as_numpy(v, k) for k, v in flatten_tree(params).items()}
  if not flat:
    raise CheckpointError('No parameters to save (empty tree).')
  tree = canonicalize(recover_tree(list(flat), list(flat.values())))
  if names == 'released':
    tree = _unsqueeze_groupnorm(convert_to_released(tree))
  _write_npz_atomically(os.fspath(path), flatten_tree(tree))


def _write_npz_atomically(path: str, flat: Dict[str, np.ndarray]) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  try:
    fd, tmp_path = tempfile.mkstemp(
        dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  except OSError as e:
    raise CheckpointError(f'Cannot write {path!r}: {e}') from e
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **flat)
      f.flush()
      os.fsync(f.fileno())
    # mkstemp creates the file 0600; give it the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    os.replace(tmp_path, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp_path)
    raise


# ----------------------------------------------------------------------------
# Comparing a checkpoint with a model.


def _format_list(entries: List[str], limit: int = 30) -> str:
  """Indented lines; long lists summarised per top-level module."""
  if len(entries) > limit:
    groups = collections.defaultdict(list)
    for entry in entries:
      groups[entry.split('/', 1)[0].split(' ', 1)[0]].append(entry)
    entries = []
    for name, members in groups.items():
      if len(members) <= 3:
        entries.extend(members)
      else:
        entries.append(f'{name}/... ({len(members)} parameters, e.g. '
                       f'{members[0]})')
  shown = entries[:limit]
  more = (f'\n    ... and {len(entries) - limit} more'
          if len(entries) > limit else '')
  return ''.join(f'\n    {e}' for e in shown) + more


def _describe_shape(x) -> str:
  shape = _shape(x)
  return '{}' if shape is None else str(shape)


def _differing_keys(params_flat, expected_flat):
  missing = sorted(expected_flat.keys() - params_flat.keys())
  unexpected = sorted(params_flat.keys() - expected_flat.keys())
  mismatched = sorted(k for k in params_flat.keys() & expected_flat.keys()
                      if _shape(params_flat[k]) != _shape(expected_flat[k]))
  return missing, unexpected, mismatched


def _differences_lines(params_flat, expected_flat, missing, unexpected,
                       mismatched):
  return (
      [f'{k} {_describe_shape(expected_flat[k])}' for k in missing],
      [f'{k} {_describe_shape(params_flat[k])}' for k in unexpected],
      [f'{k}: checkpoint {_describe_shape(params_flat[k])}, model '
       f'{_describe_shape(expected_flat[k])}' for k in mismatched])


def _differences_message(missing, unexpected, mismatched) -> str:
  parts = ['The checkpoint does not fit the model.']
  if missing:
    parts.append(f'  In the model but not in the checkpoint ({len(missing)}):'
                 + _format_list(missing))
  if unexpected:
    parts.append('  In the checkpoint but not in the model '
                 f'({len(unexpected)}):'
                 + _format_list(unexpected))
  if mismatched:
    parts.append(f'  Shapes differ ({len(mismatched)}):'
                 + _format_list(mismatched))
  parts.append('  Build the model with the configuration the checkpoint was '
               'trained with (`python -m vit_jax.checkpoint inspect FILE` '
               'shows it).')
  return '\n'.join(parts)


def inspect_params(*, params: Params, expected: Params,
                   fail_if_extra: bool = True, fail_if_missing: bool = True,
                   fail_if_shape_mismatch: bool = False) -> Params:
  """Checks that `params` has the keys of `expected` (the original's helper).

  As in the original, empty sub-dicts of `expected` (layers without weights,
  which serialisation drops) are added back to `params`, and the params are
  returned. Unlike it, the error lists every differing key with its shape,
  and shape mismatches of common keys too.

  Args:
    params: the checkpoint's tree; modified in place (empty dicts added).
    expected: the model's tree (arrays or `jax.ShapeDtypeStruct`s).
    fail_if_extra: raise if `params` has keys `expected` lacks.
    fail_if_missing: raise if `expected` has keys `params` lacks.
    fail_if_shape_mismatch: raise if a common key's shapes differ (the
      original did not check shapes, hence False by default).

  Returns:
    `params`.

  Raises:
    CheckpointError (a ValueError, as the original raised): keys differ.
  """
  params_flat = _flatten_keep_empty(params)
  expected_flat = _flatten_keep_empty(expected)
  missing, unexpected, mismatched = _differing_keys(params_flat, expected_flat)
  # Layers without weights: flax serialisation drops their empty dicts.
  empty = [k for k in missing
           if isinstance(expected_flat[k], collections.abc.Mapping)]
  for key in empty:
    node = params
    for part in key.split('/'):
      node = node.setdefault(part, {})
    logging.info('inspect_params: recovered empty %s', key)
  missing = [k for k in missing if k not in empty]
  missing, unexpected, mismatched = _differences_lines(
      params_flat, expected_flat, missing, unexpected, mismatched)
  if missing:
    logging.info('inspect_params: missing keys: %s', missing)
  if unexpected:
    logging.info('inspect_params: unexpected keys: %s', unexpected)
  if mismatched:
    logging.info('inspect_params: shapes differ: %s', mismatched)
  if ((fail_if_missing and missing) or (fail_if_extra and unexpected) or
      (fail_if_shape_mismatch and mismatched)):
    raise CheckpointError(
        _differences_message(missing, unexpected, mismatched))
  return params


# ----------------------------------------------------------------------------
# Resampling position embeddings.


def _bilinear_aligned_weights(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] linear interpolation, output i at input i*(n_in-1)/(n_out-1).

  The corner-aligned sampling of `scipy.ndimage.zoom(order=1)`, which the
  original uses (SPEC section 5).
  """
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
  """[n_out, n_in] bicubic weights, half-pixel centres, antialiased shrinking.

  Output pixel i's centre lies at input coordinate (i + 0.5) * n_in / n_out
  - 0.5. When shrinking, the kernel is stretched by n_in / n_out (a low-pass
  filter). Taps outside the input are dropped and each row renormalised to
  sum to 1. This is the definition of `jax.image.resize(method='cubic')`
  (also PIL's BICUBIC), which the tests compare with.
  """
  scale = n_in / n_out
  support = max(scale, 1.)
  centre = (np.arange(n_out) + 0.5) * scale - 0.5
  weights = _keys_cubic((centre[:, None] - np.arange(n_in)[None, :]) / support)
  return weights / weights.sum(axis=1, keepdims=True)


def resample_grid(grid_HxWxD: np.ndarray, new_hw: Grid,
                  method: str = 'bilinear_aligned') -> np.ndarray:
  """Resamples a grid of embeddings [H, W, D] to [new_h, new_w, D].

  Args:
    grid_HxWxD: the embeddings on their grid.
    new_hw: (new_h, new_w).
    method: 'bilinear_aligned' (the original's, = scipy.ndimage.zoom with
      order=1, corners aligned) or 'bicubic' (see `_bicubic_weights`).

  Returns:
    The resampled grid, in the input's dtype (computed in float64).
  """
  method = _METHOD_ALIASES.get(method, method)
  if method not in RESAMPLE_METHODS:
    raise ValueError(f'Unknown resampling method {method!r}; use one of '
                     f'{RESAMPLE_METHODS + tuple(_METHOD_ALIASES)}.')
  weights_fn = (_bilinear_aligned_weights if method == 'bilinear_aligned'
                else _bicubic_weights)
  h, w, _ = grid_HxWxD.shape
  new_h, new_w = new_hw
  rows_hxH = weights_fn(h, new_h)
  cols_wxW = weights_fn(w, new_w)
  out = np.einsum('hH,HWd,wW->hwd', rows_hxH,
                  np.asarray(grid_HxWxD, np.float64), cols_wxW)
  return out.astype(grid_HxWxD.dtype)


def _grid_of(num_tokens: int, grid: Optional[Sequence[int]], what: str) -> Grid:
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


def interpolate_posembed(posemb, num_tokens: int, has_class_token: bool, *,
                         grid: Optional[Sequence[int]] = None,
                         old_grid: Optional[Sequence[int]] = None,
                         method: str = 'bilinear_aligned') -> np.ndarray:
  """Resamples a (1, N, D) position embedding to `num_tokens` rows.

  As the original (SPEC section 5): the class-token row (when the model has
  one) is kept aside, the rest reshaped to its grid, resampled, and the
  class row put back in front. With the default method the numbers are the
  original's `scipy.ndimage.zoom(grid, (gh/gh_old, gw/gw_old, 1), order=1)`.

  Args:
    posemb: (1, N, D), class-token row first when `has_class_token`.
    num_tokens: rows of the result, the class token included.
    has_class_token: whether row 0 belongs to the class token.
    grid: (rows, cols) of the new grid; default: square.
    old_grid: (rows, cols) of `posemb`'s grid; default: square.
    method: 'bilinear_aligned' (alias 'bilinear'; the original's) or
      'bicubic' (`jax.image.resize(method='cubic')` numbers).

  Returns:
    numpy (1, num_tokens, D) in `posemb`'s dtype.

  Raises:
    CheckpointError: a grid that is not square when none is given, or one
      that does not have the number of tokens.
  """
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise CheckpointError(f'The position embedding has shape {posemb.shape}; '
                          'expected (1, tokens, hidden).')
  num_prefix = int(bool(has_class_token))
  posemb_tok, posemb_grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
  gh_old, gw_old = _grid_of(posemb_grid.shape[0], old_grid, 'checkpoint\'s')
  gh, gw = _grid_of(num_tokens - num_prefix, grid, 'new')
  logging.info('interpolate_posembed: grid %dx%d -> %dx%d (%s)', gh_old, gw_old,
               gh, gw, method)
  grid_HxWxD = posemb_grid.reshape(gh_old, gw_old, -1)
  resampled = resample_grid(grid_HxWxD, (gh, gw), method)
  return np.concatenate([posemb_tok, resampled.reshape(1, gh * gw, -1)],
                        axis=1)


# ----------------------------------------------------------------------------
# Fine-tuning adaptation.


def _pixels_per_token(model_config) -> Grid:
  """Stem stride times patch size, from the model config."""
  ph, pw = tuple(model_config.patches.size)
  resnet = model_config.get('resnet')
  stride = 1
  if resnet is not None:
    from vit_jax import models_resnet  # pylint: disable=g-import-not-at-top
    stride = models_resnet.stem_stride(tuple(resnet.num_layers))
  return stride * ph, stride * pw


def _image_grid(image_size, stride: Grid, what: str) -> Grid:
  if isinstance(image_size, int):
    image_size = (image_size, image_size)
  h, w = (int(s) for s in image_size)
  sh, sw = stride
  if h <= 0 or w <= 0 or h % sh or w % sw:
    raise CheckpointError(
        f'The {what} image size {h}x{w} is not a positive multiple of the '
        f'{sh}x{sw} pixels per token of the model.')
  return h // sh, w // sw


def load_pretrained(*, pretrained_path: Union[str, os.PathLike, Mapping],
                    init_params: Mapping[str, Any], model_config,
                    image_size: Union[None, int, Sequence[int]] = None,
                    pretrained_image_size: Union[None, int,
                                                 Sequence[int]] = None,
                    method: str = 'bilinear_aligned') -> Params:
  """Adapts a pre-trained checkpoint to a new model for fine-tuning.

  As the original (SPEC section 5):
    * the head is the fresh one of `init_params` (zeros), also when the class
      counts match, so the adapted model's logits start at exactly 0 (plus
      the head bias init);
    * `pre_logits` is dropped when `model_config.representation_size` is
      None, kept otherwise;
    * the position embedding is resampled when its token count differs from
      the model's; the class-token row is kept aside.
  Beyond the original:
    * every classifier: the class token exists for 'token' and
      'token_unpooled', not for 'gap' and 'unpooled';
    * non-square grids: the new grid is `image_size` (or
      `model_config.image_size`) divided by the pixels per token (patch size
      times the ResNet stem's stride); without one, the token count must be
      a square. Likewise `pretrained_image_size` for a non-square checkpoint;
    * `method='bicubic'`; 2-D learned embeddings (`posemb='learn_2d'`);
      scanned models (`scan=True`);
    * the result is checked against `init_params`: keys and shapes must
      agree, else a CheckpointError lists the differences. Only top-level
      modules the model lacks (pre-training heads such as masked patch
      prediction's `mpp_head` and `mask_token`) are dropped silently, as the
      original ignored them.

  Args:
    pretrained_path: the `.npz`, or an already loaded params dict.
    init_params: the new model's freshly initialised params.
    model_config: the model's ConfigDict (zoo config plus num_classes);
      reads `classifier`, `representation_size`, `patches.size`, `resnet`,
      and `image_size` / `posemb` if present.
    image_size: (height, width) or an int: the fine-tuning resolution.
    pretrained_image_size: the checkpoint's resolution (only needed when its
      grid is not square).
    method: resampling, see `interpolate_posembed`.

  Returns:
    A nested dict of numpy arrays with the structure of `init_params`.

  Raises:
    CheckpointError: the file is unreadable, or it does not fit the model;
      the message names the source.
  """
  if isinstance(pretrained_path, collections.abc.Mapping):
    source = 'The given params'
    restored = canonicalize(pretrained_path)
  else:
    source = f'Checkpoint {os.fspath(pretrained_path)!r}'
    restored = load(pretrained_path)
  try:
    return _adapt(restored, _to_dict(init_params), model_config,
                  image_size=image_size,
                  pretrained_image_size=pretrained_image_size, method=method)
  except CheckpointError as e:
    raise CheckpointError(f'{source}: {e}') from None


def _materialize(x, fill: float) -> np.ndarray:
  """An array leaf as numpy; a shape-only leaf as an array full of `fill`."""
  if hasattr(x, '__array__'):
    return np.asarray(x)
  return np.full(x.shape, fill, x.dtype)


def _adapt(restored: Params, init_params: Params, model_config, *, image_size,
           pretrained_image_size, method) -> Params:
  """`load_pretrained` on a loaded tree."""
  if isinstance(model_config, dict):
    import ml_collections  # pylint: disable=g-import-not-at-top
    model_config = ml_collections.ConfigDict(model_config)
  restored = inspect_params(params=restored, expected=init_params,
                            fail_if_extra=False, fail_if_missing=False)
  classifier = model_config.get('classifier', 'token')
  has_class_token = classifier in ('token', 'token_unpooled')
  if has_class_token != ('cls' in restored) and 'embedding' in restored:
    raise CheckpointError(
        f'The model (classifier={classifier!r}) '
        f'{"has" if has_class_token else "has no"} class token, but the '
        f'checkpoint {"has" if "cls" in restored else "has no"} `cls`. '
        'Fine-tune with the classifier it was trained with ("token" or '
        '"token_unpooled" with a class token, "gap" or "unpooled" without).')

  # The original's fine-tuning head variants: representation_size=None drops
  # pre_logits; otherwise it is kept and only the last layer is new.
  if model_config.get('representation_size') is None:
    restored.pop('pre_logits', None)
  elif 'pre_logits' not in restored and 'pre_logits' in init_params:
    raise CheckpointError(
        f'The model has a representation layer (representation_size='
        f'{model_config.representation_size}) but the checkpoint has no '
        '`pre_logits`; set representation_size=None.')
  if 'head' in init_params:
    # init_params may be shapes only (jax.eval_shape); the fresh head is then
    # built as the model initialises it: zero kernel, head_bias_init bias.
    fill = {'kernel': 0., 'bias': model_config.get('head_bias_init', 0.)}
    restored['head'] = {k: _materialize(v, fill.get(k, 0.))
                        for k, v in init_params['head'].items()}
  else:
    restored.pop('head', None)

  new_posemb = init_params.get('Transformer', {}).get('posembed_input')
  old_posemb = restored.get('Transformer', {}).get('posembed_input')
  if new_posemb and old_posemb:
    image_size = (model_config.get('image_size') if image_size is None
                  else image_size)
    grid = old_grid = None
    if image_size is not None:
      grid = _image_grid(image_size, _pixels_per_token(model_config),
                         'fine-tuning')
    if pretrained_image_size is not None:
      old_grid = _image_grid(pretrained_image_size,
                             _pixels_per_token(model_config), 'pre-training')
    restored['Transformer']['posembed_input'] = _resample_posembed_input(
        old_posemb, new_posemb, has_class_token=has_class_token, grid=grid,
        old_grid=old_grid, method=method)

  # A scanned model (scan=True) holds its blocks stacked.
  if 'encoderblock' in init_params.get('Transformer', {}):
    try:
      restored = layouts.layers_to_scan(
          restored, _shape(next(iter(flatten_tree(
              init_params['Transformer']['encoderblock']).values())))[0])
    except ValueError as e:
      raise CheckpointError(str(e)) from None

  restored_flat = _flatten_keep_empty(restored)
  init_flat = _flatten_keep_empty(init_params)
  missing, unexpected, mismatched = _differing_keys(restored_flat, init_flat)
  # Top-level modules the model lacks are pre-training heads (e.g. masked
  # patch prediction's `mpp_head`, `mask_token`): dropped, as the original
  # ignored them. Anything else that differs is another model.
  foreign = {k.split('/', 1)[0] for k in unexpected} - set(init_params)
  inner_unexpected = [k for k in unexpected
                      if k.split('/', 1)[0] not in foreign]
  if missing or inner_unexpected or mismatched:
    raise CheckpointError(_differences_message(*_differences_lines(
        restored_flat, init_flat, missing, unexpected, mismatched)))
  for name in sorted(foreign):
    logging.warning('load_pretrained: dropping %s, which the model lacks.',
                    name)
    del restored[name]
  return restored


def _resample_posembed_input(old: Params, new: Params, *, has_class_token,
                             grid, old_grid, method) -> Params:
  """Resamples the tables of `posembed_input` to the shapes of `new`."""
  out = dict(old)
  if 'pos_embedding' in old and 'pos_embedding' in new:
    posemb, target = old['pos_embedding'], new['pos_embedding']
    if (_shape(posemb) != _shape(target) or grid is not None or
        old_grid is not None):
      out['pos_embedding'] = interpolate_posembed(
          posemb, _shape(target)[1], has_class_token, grid=grid,
          old_grid=old_grid, method=method)
      logging.info('load_pretrained: position embedding %s -> %s',
                   _shape(posemb), out['pos_embedding'].shape)
  # 2-D learned tables (posemb='learn_2d'): one row per grid row / column.
  for name in ('pos_embedding_row', 'pos_embedding_col'):
    if name in old and name in new and _shape(old[name]) != _shape(new[name]):
      table = np.asarray(old[name])
      size = _shape(new[name])[0]
      out[name] = resample_grid(table[:, None, :], (size, 1),
                                method)[:, 0, :]
  return out


def main(argv=None) -> int:
  """`python -m vit_jax.checkpoint`; see `vit_jax.checkpoint_cli`."""
  from vit_jax import checkpoint_cli  # pylint: disable=g-import-not-at-top
  return checkpoint_cli.main(argv)


if __name__ == '__main__':
  sys.exit(main())

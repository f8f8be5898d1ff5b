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

Fitting a checkpoint to a model (`inspect_params`, `load_pretrained` for
fine-tuning) lives in `vit_jax.pretrained`, position-embedding resampling
(`interpolate_posembed`) in `vit_jax.posembed`; the original's names
`checkpoint.inspect_params`, `checkpoint.load_pretrained` and
`checkpoint.interpolate_posembed` still work (served by `__getattr__` below,
since those modules build on this one).

Command line (`python -m vit_jax.checkpoint --help`, in `checkpoint_cli`):
  inspect FILE                    keys, shapes, dtypes, parameter count, and
                                  the model the file holds (zoo name if any).
  convert IN OUT [--names N]      rewrite under linen or released names.
  resize IN OUT --image-size H W  resample the position embedding offline.
"""

import collections
import contextlib
import io
import os
import re
import sys
import tempfile
import zipfile
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from vit_jax import filesystem
from vit_jax import layouts
from vit_jax import moved_names
from vit_jax import trees

Params = Dict[str, Any]
Grid = Tuple[int, int]

# Defined in `trees` (which `layouts` shares); these are the original's names.
CheckpointError = trees.CheckpointError
recover_tree = trees.recover_tree
flatten_tree = trees.flatten_tree

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


# ----------------------------------------------------------------------------
# Trees.


def shape_of(x) -> Optional[Tuple[int, ...]]:
  """A leaf's shape (arrays, ShapeDtypeStructs, lists); None for a subtree."""
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
  """Reads every array of an `.npz` (a local path or a URI such as gs://...);
  a clear CheckpointError for bad files."""
  path = os.fspath(path)
  if not filesystem.exists(path):
    raise CheckpointError(f'Checkpoint {path!r} does not exist.')
  if filesystem.isdir(path):
    raise CheckpointError(
        f'Checkpoint {path!r} is a directory, not an .npz file. (Orbax '
        'training checkpoints are exported to .npz with checkpoint.save.)')
  try:
    with filesystem.open_file(path, 'rb') as f:
      if not zipfile.is_zipfile(f):
        raise CheckpointError(
            f'Checkpoint {path!r} is not an .npz file (not a zip archive, or '
            'a truncated one). Re-download or re-export it.')
      f.seek(0)
      with np.load(f, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
  except CheckpointError:
    raise
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
      raise CheckpointError(f'pos_embedding has shape {shape_of(posemb)}; '
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
  tree = trees.to_dict(params)
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
  if filesystem.has_scheme(path):
    # A remote file system: a temporary name beside it, then a rename. The
    # archive is built in memory (zipfile needs to seek, which remote files
    # may not).
    tmp_path = f'{path}.tmp'
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    try:
      with filesystem.open_file(tmp_path, 'wb') as f:
        f.write(buffer.getvalue())
      filesystem.replace(tmp_path, path)
    except BaseException:
      with contextlib.suppress(Exception):
        filesystem.remove(tmp_path)
      raise
    return
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


def copy(src: str, dst: str, progress: bool = True,
         block_size: int = 10 * 1024 * 1024) -> None:
  """Copies a file between any two paths of `vit_jax.filesystem` (e.g. a
  released checkpoint from gs://vit_models/... to a local folder), in blocks
  of `block_size` bytes, with a progress bar if `progress`."""
  import tqdm  # pylint: disable=g-import-not-at-top
  with filesystem.open_file(src, 'rb') as fin, \
      filesystem.open_file(dst, 'wb') as fout:
    with tqdm.tqdm(unit='B', unit_scale=True, disable=not progress) as bar:
      while block := fin.read(block_size):
        fout.write(block)
        bar.update(len(block))


def get_augreg_df(directory: str = 'gs://vit_models/augreg'):
  """The AugReg runs of `{directory}/index.csv` as a pandas DataFrame.

  One row per fine-tuning of a pre-training (Steiner et al., "How to train
  your ViT?"): `filename` is the pre-trained checkpoint's stem
  (`{directory}/{filename}.npz`), `ds` its pre-training data ('i1k',
  'i21k', 'i21k_30'), `final_val` its final upstream validation accuracy,
  `adapt_*` the fine-tuning's dataset, settings, results and file.
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  path = filesystem.join(directory, 'index.csv')
  if not filesystem.exists(path):
    raise FileNotFoundError(
        f'AugReg index {path} does not exist; the public one is '
        'gs://vit_models/augreg/index.csv.')
  with filesystem.open_file(path, 'r') as f:
    return pd.read_csv(f)


# The original's API (SPEC section 8) kept these in this module.
_MOVED = {
    'inspect_params': 'vit_jax.pretrained',
    'load_pretrained': 'vit_jax.pretrained',
    'interpolate_posembed': 'vit_jax.posembed',
}
__getattr__ = moved_names.resolver(__name__, _MOVED)


def main(argv=None) -> int:
  """`python -m vit_jax.checkpoint`; see `vit_jax.checkpoint_cli`."""
  from vit_jax import checkpoint_cli  # pylint: disable=g-import-not-at-top
  return checkpoint_cli.main(argv)


if __name__ == '__main__':
  sys.exit(main())

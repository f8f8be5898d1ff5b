"""The `.npz` checkpoint format below `vit_jax.checkpoint`: naming schemes
and layouts in, released names out, atomic writes.

`canonicalize` (and so `checkpoint.load`) reads linen and released names,
released hybrids' (1, 1, 1, C) GroupNorm parameters, old flax optimizer
checkpoints (`opt/target/`), a lone `params/` root, and big_vision's ViT
(top-level `pos_embedding`, scanned blocks). big_vision adds the position
embedding before prepending the class token; this model prepends first
(paper Eq. 1), so a zero row for the class token is inserted.
"""

import collections
import contextlib
import os
import re
import tempfile
from typing import Any, Dict, Iterable, Mapping, Tuple, Union
import zipfile

import numpy as np

from vit_jax.checkpoints import layouts
from vit_jax.checkpoints import trees
from vit_jax.checkpoints.trees import CheckpointError
from vit_jax.data import filesystem

Params = Dict[str, Any]

_NUMBERED = re.compile(r'^(.*)_(\d+)$')
ENCODER_BLOCK = re.compile(r'^encoderblock_\d+$')
_GROUPNORM = re.compile(r'^gn(\d+|_root|_proj)$')

# Inside an encoder block, linen names -> the names of the released files.
# Pre-linen flax numbered a parent's submodules with one counter in creation
# order: LayerNorm, attention, LayerNorm, MLP.
_RELEASED_BLOCK_NAMES = {
    'LayerNorm_0': 'LayerNorm_0',
    'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
    'LayerNorm_1': 'LayerNorm_2',
    'MlpBlock_0': 'MlpBlock_3',
}
NAME_SCHEMES = ('released', 'linen')


def convert_pre_linen(params: Params) -> Params:
  """Renumbers pre-linen module names (one counter per parent) per class.

  Inside every dict, `Class_i` names are renumbered 0, 1, ... per `Class` in
  the order of their old index; linen-named trees pass through unchanged.
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
  """Linen names -> the released (pre-linen) names inside encoder blocks."""

  def walk(tree, in_block):
    out = {}
    for name, value in tree.items():
      if in_block:
        name = _RELEASED_BLOCK_NAMES.get(name, name)
      if isinstance(value, dict):
        value = walk(value, ENCODER_BLOCK.match(name) is not None)
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


def unsqueeze_groupnorm(params: Params) -> Params:
  """GroupNorm scale/bias to (1, 1, 1, C), as pre-linen flax stored them."""
  return _map_groupnorm(params, lambda v: v.reshape(1, 1, 1, -1)
                        if v.ndim == 1 else v)


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
      raise CheckpointError('pos_embedding has shape '
                            f'{trees.shape_of(posemb)}; '
                            'expected (1, tokens, hidden).')
    if 'cls' in tree:
      # big_vision adds the table before prepending the class token: in our
      # order (prepend, then add) that is a zero row for the class token.
      posemb = np.concatenate(
          [np.zeros_like(posemb[:, :1]),
           np.asarray(posemb)], axis=1)
    transformer['posembed_input'] = {'pos_embedding': posemb}
  try:
    return layouts.scan_to_layers(tree)
  except ValueError as e:
    raise CheckpointError(str(e)) from None


def canonicalize(params: Mapping[str, Any]) -> Params:
  """Any layout `load` knows -> a new linen-named tree of the same leaves.

  Encoder blocks come out per layer, GroupNorm parameters squeezed.
  """
  tree = trees.to_dict(params)
  tree = _strip_wrappers(tree)
  tree = _convert_big_vision(tree)
  tree = convert_pre_linen(tree)
  tree = _fix_groupnorm(tree)
  return tree


def file_tree(params: Mapping[str, Any], names: str) -> Params:
  """`canonicalize`d, then as a file of `names` holds it.

  `names` is 'released' (pre-linen names, GroupNorm as (1, 1, 1, C)) or
  'linen'; anything else raises ValueError.
  """
  if names not in NAME_SCHEMES:
    raise ValueError(f'Unknown names={names!r}; use one of {NAME_SCHEMES}.')
  tree = canonicalize(params)
  if names == 'released':
    tree = unsqueeze_groupnorm(convert_to_released(tree))
  return tree


# ----------------------------------------------------------------------------
# Writing.


def as_numpy(x, path: str) -> np.ndarray:
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


class _AppendOnly:
  """A file zipfile can only append to, for remote files (gfile) whose seek
  and tell fail in ways zipfile does not expect."""

  def __init__(self, f):
    self._f = f

  def write(self, data) -> int:
    self._f.write(data)  # gfile returns None
    return memoryview(data).nbytes

  def flush(self) -> None:
    self._f.flush()


def _write_entries(f, arrays: Iterable[Tuple[str, Any]]) -> None:
  """Writes ('name', array) pairs into `f` as `np.savez`'s 'name.npy'
  entries (uncompressed, zip64), each as soon as it arrives."""
  names = set()
  with zipfile.ZipFile(
      f, mode='w', compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
    for name, array in arrays:
      if name in names:
        raise CheckpointError(f'Parameter {name!r} is written twice.')
      names.add(name)
      with archive.open(f'{name}.npy', 'w', force_zip64=True) as entry:
        np.lib.format.write_array(
            entry, np.asanyarray(array), allow_pickle=False)
      del array  # Not held while the next one is produced.


def write_npz_atomically(
    path: str, arrays: Union[Mapping[str, np.ndarray],
                             Iterable[Tuple[str, np.ndarray]]]
) -> None:
  """Writes an `.npz` that `np.load` reads, or nothing if a step fails.

  `arrays` is a mapping or an iterable of ('name', array) pairs (e.g. a
  generator: only one array need exist at a time). Local files go to a
  temporary name and are renamed over `path`; remote ones stream to
  `path.tmp` first.
  """
  if isinstance(arrays, Mapping):
    arrays = arrays.items()
  if filesystem.has_scheme(path):
    tmp_path = f'{path}.tmp'
    try:
      with filesystem.open_file(tmp_path, 'wb') as f:
        _write_entries(_AppendOnly(f), arrays)
      filesystem.replace(tmp_path, path)
    except BaseException:
      with contextlib.suppress(Exception):
        filesystem.remove(tmp_path)
      raise
    return
  directory = os.path.dirname(os.path.abspath(path))
  try:  # missing parent folders are created
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(
        dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  except OSError as e:
    raise CheckpointError(
        f'Cannot write {path!r}: {e.strerror} (in {e.filename or directory}).'
    ) from e
  try:
    with os.fdopen(fd, 'wb') as f:
      _write_entries(f, arrays)
      f.flush()
      os.fsync(f.fileno())
    # mkstemp creates the file 0600; give it the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    os.replace(tmp_path, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp_path)
    if isinstance(e, OSError):  # named by the file asked for, not the tmp
      raise CheckpointError(f'Cannot write {path!r}: {e.strerror}.') from e
    raise

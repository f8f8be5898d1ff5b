"""Checkpoints in the released `.npz` format (SPEC section 4).

A checkpoint is a plain `np.savez` file, one array per parameter, keyed by the
module path joined with '/'. Two naming schemes exist: flax linen's (one
counter per class inside a parent: `LayerNorm_0`, `LayerNorm_1`,
`MultiHeadDotProductAttention_0`, `MlpBlock_0`) and the pre-linen one of the
files Google released (one counter per parent: `LayerNorm_0`,
`MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`). `load` accepts
both and returns linen names.
"""

import collections
import os
import re
import zipfile
from typing import Any, Dict

import numpy as np

Params = Dict[str, Any]

_NUMBERED = re.compile(r'^(.*)_(\d+)$')


class CheckpointError(ValueError):
  """A checkpoint file that cannot be read or does not fit the model."""


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
    for new_index, (_, _, value) in enumerate(sorted(members)):
      out[f'{prefix}_{new_index}'] = convert_pre_linen(value)
  return out


def _fix_groupnorm(params: Params) -> Params:
  """Squeezes GroupNorm scale/bias stored as (1, 1, 1, C) by hybrid AugReg files."""
  def fix(path, value):
    leaf_parent = path[-2] if len(path) > 1 else ''
    if (leaf_parent.startswith('gn') and path[-1] in ('scale', 'bias') and
        getattr(value, 'ndim', 0) == 4):
      return value.reshape(-1)
    return value

  def walk(tree, path):
    return {k: walk(v, path + (k,)) if isinstance(v, dict) else fix(path + (k,), v)
            for k, v in tree.items()}
  return walk(params, ())


def read_npz(path: str) -> Dict[str, np.ndarray]:
  """Reads every array of an `.npz`; a clear CheckpointError for bad files."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f'Checkpoint {path!r} does not exist.')
  try:
    with np.load(path, allow_pickle=False) as data:
      if not hasattr(data, 'files'):
        raise CheckpointError(
            f'Checkpoint {path!r} holds a single array, not an .npz of '
            'named parameters.')
      return {k: data[k] for k in data.files}
  except CheckpointError:
    raise
  except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
    raise CheckpointError(
        f'Cannot read checkpoint {path!r}: not a complete .npz file '
        f'({type(e).__name__}: {e}). Re-download or re-export it.') from e


def load(path: str) -> Params:
  """Loads an `.npz` checkpoint into a nested dict of numpy arrays.

  Accepts linen and released (pre-linen) names; squeezes (1,1,1,C) GroupNorm
  parameters. Returns linen names, ready for `model.apply({'params': p}, ...)`.

  Args:
    path: the `.npz` file.

  Returns:
    The nested parameter dict.
  """
  flat = read_npz(path)
  params = recover_tree(list(flat), list(flat.values()))
  params = convert_pre_linen(params)
  params = _fix_groupnorm(params)
  return params

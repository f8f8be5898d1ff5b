"""Parameter trees as nested dicts and as flat '/'-keyed dicts.

The released `.npz` checkpoints hold one array per '/'-joined path
(`Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`); flax holds the
same parameters as nested dicts. `recover_tree` nests, `flatten_tree`
flattens; `shape_of` tells a leaf from a subtree. `vit_jax.checkpoint`,
`npz` and `layouts` build on them; this module imports none of them.
"""

import collections.abc
from typing import Any, Dict, Optional, Tuple

import numpy as np

Params = Dict[str, Any]


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
    if isinstance(node.get(leaf), dict):
      raise CheckpointError(f'Key {key!r} is both a parameter and a module.')
    node[leaf] = value
  return tree


def flatten_tree(tree: Params,
                 prefix: str = '',
                 *,
                 keep_empty: bool = False) -> Dict[str, Any]:
  """The inverse of `recover_tree`: {'a/b/c': leaf}.

  With `keep_empty`, an empty sub-dict (a layer without weights) stays as a
  leaf of its own instead of vanishing.
  """
  flat = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, collections.abc.Mapping) and (value or not keep_empty):
      flat.update(flatten_tree(value, path + '/', keep_empty=keep_empty))
    else:
      flat[path] = value
  return flat


def to_dict(tree: Any) -> Any:
  """Mappings (FrozenDict, ConfigDict-like) to plain dicts, leaves untouched."""
  if isinstance(tree, collections.abc.Mapping):
    return {k: to_dict(v) for k, v in tree.items()}
  return tree


def shape_of(x) -> Optional[Tuple[int, ...]]:
  """A leaf's shape (arrays, ShapeDtypeStructs, lists); None for a subtree."""
  if isinstance(x, collections.abc.Mapping):
    return None
  return tuple(getattr(x, 'shape', np.shape(x)))

"""Converting parameters to a file's layout one array at a time.

For trees too large to hold at once: `plan` runs `npz.file_tree` on
stand-ins that record what it does to each leaf (a layer slice, a reshape),
and `convert` replays that on each array as it arrives. The result equals
`file_tree`'s.
"""

import math
import operator
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Sequence, Tuple

import numpy as np

from vit_jax.checkpoints import npz
from vit_jax.checkpoints import trees
from vit_jax.checkpoints.trees import CheckpointError

# {leaf key: [(file key, its stand-in), ...]}: what `plan` returns.
Layout = Dict[str, List[Tuple[str, '_StandIn']]]


class _StandIn:
  """A leaf's shape and the indexing and reshapes applied to it so far.

  It supports only `shape`, `ndim`, `x[i]` and `reshape`, so a conversion
  that needs values fails instead of being replayed wrongly.
  """

  def __init__(self, key: str, shape: Sequence[int], steps: tuple = ()):
    self.key = key
    self.shape = tuple(shape)
    self.steps = steps

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __getitem__(self, index):
    if not isinstance(index, int) or not self.shape:
      raise TypeError(f'{self.key}: the leaf-by-leaf conversion only takes '
                      f'whole layers out of a leaf, not [{index!r}].')
    return _StandIn(self.key, self.shape[1:],
                    self.steps + ((operator.getitem, index),))

  def reshape(self, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
      shape = tuple(shape[0])
    size = math.prod(self.shape)
    known = math.prod(d for d in shape if d != -1)
    new = tuple(size // known if d == -1 else d for d in shape)
    if math.prod(new) != size:
      raise ValueError(f'{self.key}: cannot reshape {self.shape} to {shape}.')
    return _StandIn(self.key, new, self.steps + ((np.reshape, new),))

  def apply(self, array: np.ndarray) -> np.ndarray:
    """What the conversion makes of `array`, the leaf's value."""
    for fn, arg in self.steps:
      array = fn(array, arg)
    return array


def plan(shapes: Mapping[str, Any], names: str) -> Layout:
  """Where each leaf of a parameter tree goes in a file of `names`.

  `shapes` maps '/'-joined keys to shapes (or anything with `.shape`).
  Returns {key: [(file key, stand-in), ...]} in `shapes`' order, one entry
  per layer for a scanned leaf. Raises CheckpointError for an empty or
  malformed tree, ValueError for unknown `names`.
  """
  if not shapes:
    raise CheckpointError('No parameters to save (empty tree).')
  stand_ins = [_StandIn(k, getattr(s, 'shape', s)) for k, s in shapes.items()]
  tree = npz.file_tree(trees.recover_tree(list(shapes), stand_ins), names)
  layout = {key: [] for key in shapes}
  for file_key, stand_in in trees.flatten_tree(tree).items():
    layout[stand_in.key].append((file_key, stand_in))
  return layout


def convert(leaves: Iterable[Tuple[str, Any]],
            layout: Layout) -> Iterator[Tuple[str, np.ndarray]]:
  """Yields the (file key, numpy array) pairs of each leaf as it arrives,
  converted as `layout` says; holds no leaf past its pairs."""
  for key, leaf in leaves:
    leaf = npz.as_numpy(leaf, key)
    for file_key, stand_in in layout[key]:
      yield file_key, stand_in.apply(leaf)
    del leaf

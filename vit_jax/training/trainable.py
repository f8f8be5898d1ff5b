"""Which parameters train: a mask, and the split into trainable and frozen.

Only the trainable half is differentiated and gets optimizer state; frozen
leaves stay bit-for-bit what was loaded.
"""

import re
from typing import Any, Dict, Optional, Tuple

import flax.traverse_util
import jax

from vit_jax.configs import choices

Params = Any


def _flat(params: Params) -> Dict[str, Any]:
  return flax.traverse_util.flatten_dict(params, sep='/')


def _unflat(flat: Dict[str, Any]) -> Params:
  return flax.traverse_util.unflatten_dict(flat, sep='/') if flat else {}


def trainable_mask(params: Params, spec: Optional[str]) -> Params:
  """A tree of bools with `params`' structure: True where the leaf trains.

  Args:
    params: nested dicts of arrays or ShapeDtypeStructs.
    spec: None/'all', a key of choices.TRAINABLE_PRESETS, or a regular
      expression searched in each leaf's '/'-joined path.

  Raises:
    ValueError: the expression is invalid or selects no parameter.
  """
  regex = choices.trainable_pattern(spec)
  flat = _flat(params)
  if regex is None:
    return _unflat({k: True for k in flat})
  try:
    compiled = re.compile(regex)
  except re.error as e:
    raise ValueError(
        f'config.trainable={spec!r} is not a valid regular '
        f'expression ({e}); use one of {sorted(choices.TRAINABLE_PRESETS)}, '
        "'all', or a valid regex.") from e
  mask = {k: bool(compiled.search(k)) for k in flat}
  if not any(mask.values()):
    top = sorted({k.split('/')[0] for k in flat})
    raise ValueError(
        f'config.trainable={spec!r} selects no parameter. Parameter paths '
        f'look like {next(iter(flat))!r}; top-level names: {top}. Use one '
        f'of {sorted(choices.TRAINABLE_PRESETS)}, \'all\', or a regex '
        'matching some of them.')
  return _unflat(mask)


def split(params: Params, mask: Params) -> Tuple[Params, Params]:
  """(trainable, frozen): the leaves where `mask` is True / False."""
  flat, flat_mask = _flat(params), _flat(mask)
  if flat.keys() != flat_mask.keys():
    raise ValueError('The trainable mask does not have the structure of the '
                     'parameters.')
  return (_unflat({
      k: v for k, v in flat.items() if flat_mask[k]
  }), _unflat({
      k: v for k, v in flat.items() if not flat_mask[k]
  }))


def merge(trainable: Params, frozen: Params) -> Params:
  """The full parameter tree from the two halves of `split`."""
  flat = _flat(trainable)
  flat.update(_flat(frozen))
  return _unflat(flat)


def count(params: Params) -> int:
  """Number of scalars in a tree."""
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def describe(params: Params, mask: Params) -> str:
  """'Training 7,690 of 5,725,306 parameters (head/bias, head/kernel)'."""
  trainable, _ = split(params, mask)
  names = sorted(_flat(trainable))
  total, n = count(params), count(trainable)
  if n == total:
    return f'Training all {total:,} parameters.'
  shown = ', '.join(
      names[:6]) + (f', ... ({len(names)} arrays)' if len(names) > 6 else '')
  return f'Training {n:,} of {total:,} parameters ({shown}); the rest frozen.'


def partition(params, mask):
  """(trainable part, frozen part, merge function); `mask` None: no split."""
  if mask is None:
    return params, {}, lambda t: t
  train_part, frozen = split(params, mask)
  return train_part, frozen, lambda t: merge(t, frozen)

"""Per-layer <-> scanned layout of the encoder blocks' parameters.

Checkpoints hold `Transformer/encoderblock_{i}/...` per block; a model with
`scan=True` holds `Transformer/encoderblock/...` with a leading layer axis.
These functions convert nested dicts, flat '/'-keyed dicts and pytrees of
them (optax states); numpy stays numpy, jax stays jax.
"""

import re
from typing import Any, Dict, Mapping

import jax
import numpy as np

from vit_jax.checkpoints import trees

Params = Any

SCANNED = 'encoderblock'
_LAYER_RE = re.compile(r'^encoderblock_(\d+)$')


def _stack(leaves):
  if all(isinstance(x, np.ndarray) for x in leaves):
    return np.stack(leaves)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.stack(leaves)


def _is_flat(tree: Mapping[str, Any]) -> bool:
  return any('/' in k for k in tree) and not any(
      isinstance(v, Mapping) for v in tree.values())


def _nest(flat: Mapping[str, Any]) -> Dict[str, Any]:
  return trees.recover_tree(list(flat), list(flat.values()))


def _map_tree(fn, tree):
  return {
      k: _map_tree(fn, v) if isinstance(v, Mapping) else fn(v)
      for k, v in tree.items()
  }


def _on_mappings(fn, tree):
  """Applies `fn` to the outermost Mappings of a pytree (e.g. optax states)."""
  return jax.tree_util.tree_map(
      lambda t: fn(t) if isinstance(t, Mapping) else t,
      tree,
      is_leaf=lambda t: isinstance(t, Mapping))


def is_scanned(params: Params) -> bool:
  """Whether some subtree of `params` holds blocks in the scanned layout."""
  params = _nest(params) if _is_flat(params) else params
  return any(k == SCANNED or (isinstance(v, Mapping) and is_scanned(v))
             for k, v in params.items())


def layers_to_scan(params: Params, num_layers: int) -> Dict[str, Any]:
  """Stacks `encoderblock_0..num_layers-1` into `encoderblock`.

  Returns the tree in the form given (nested or flat); one without
  `encoderblock_{i}` comes back unchanged. Raises ValueError when blocks are
  missing or extra, differ in names or shapes, or are already scanned.
  """
  if not isinstance(params, Mapping):
    return _on_mappings(lambda t: layers_to_scan(t, num_layers), params)
  flat = _is_flat(params)
  tree = _nest(params) if flat else params
  out = _layers_to_scan(tree, num_layers, path='')
  return trees.flatten_tree(out) if flat else out


def _layers_to_scan(tree, num_layers, path):
  layers = {int(m.group(1)): k for k in tree if (m := _LAYER_RE.match(k))}
  out = {}
  if layers:
    if SCANNED in tree:
      raise ValueError(f'{path or "params"} has both {SCANNED!r} and '
                       f'per-layer blocks; it is not a valid tree.')
    if sorted(layers) != list(range(num_layers)):
      raise ValueError(
          f'{path or "params"} has blocks {sorted(layers)}, but the model has '
          f'num_layers={num_layers} (blocks 0..{num_layers - 1}). Load a '
          'checkpoint of the same depth or fix transformer.num_layers.')
    blocks = [trees.flatten_tree(tree[layers[i]]) for i in range(num_layers)]
    for i, block in enumerate(blocks[1:], 1):
      if block.keys() != blocks[0].keys():
        raise ValueError(
            f'{path}encoderblock_{i} has parameters {sorted(block)} but '
            f'encoderblock_0 has {sorted(blocks[0])}; blocks can only be '
            'stacked when they hold the same names (convert pre-linen names '
            'first: vit_jax.checkpoints.npz.convert_pre_linen).')
      for name, leaf in block.items():
        if np.shape(leaf) != np.shape(blocks[0][name]):
          raise ValueError(
              f'{path}encoderblock_{i}/{name} has shape {np.shape(leaf)} but '
              f'encoderblock_0 has {np.shape(blocks[0][name])}.')
    out[SCANNED] = _nest(
        {name: _stack([b[name] for b in blocks]) for name in blocks[0]})
  for k, v in tree.items():
    if k in layers.values():
      continue
    out[k] = (
        _layers_to_scan(v, num_layers, f'{path}{k}/')
        if isinstance(v, Mapping) else v)
  return out


def scan_to_layers(params: Params) -> Dict[str, Any]:
  """Splits `encoderblock` (leading layer axis) into `encoderblock_{i}`.

  Returns the tree in the form given; one without `encoderblock` comes back
  unchanged. Raises ValueError when leaves disagree on the layer count.
  """
  if not isinstance(params, Mapping):
    return _on_mappings(scan_to_layers, params)
  flat = _is_flat(params)
  tree = _nest(params) if flat else params
  out = _scan_to_layers(tree, path='')
  return trees.flatten_tree(out) if flat else out


def _scan_to_layers(tree, path):
  out = {}
  for k, v in tree.items():
    if k == SCANNED and isinstance(v, Mapping):
      leaves = trees.flatten_tree(v)
      depths = {
          name: np.shape(x)[0] if np.ndim(x) else None
          for name, x in leaves.items()
      }
      if len(set(depths.values())) != 1 or None in depths.values():
        raise ValueError(
            f'{path}{SCANNED} leaves must share a leading layer axis; got '
            f'leading sizes {depths}.')
      num_layers = next(iter(depths.values()))
      for i in range(num_layers):
        out[f'encoderblock_{i}'] = _map_tree(lambda x, i=i: x[i], v)
    elif isinstance(v, Mapping):
      out[k] = _scan_to_layers(v, f'{path}{k}/')
    else:
      out[k] = v
  if any(_LAYER_RE.match(k) for k in tree) and SCANNED in tree:
    raise ValueError(f'{path or "params"} has both {SCANNED!r} and per-layer '
                     'blocks; it is not a valid tree.')
  return out

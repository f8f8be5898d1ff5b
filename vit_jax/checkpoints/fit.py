"""Fitting a checkpoint's tree to a model's: the work behind
`checkpoint.inspect_params`, `load_pretrained` and `interpolate_posembed`.

`adapt` turns a pre-trained tree into a fine-tuning model's, step by step:
class token check, head, position embedding, scan layout, final check.
"""

import collections
import re
from typing import Any, Dict, Optional, Sequence, Tuple

from absl import logging
import numpy as np

from vit_jax.checkpoints import layouts
from vit_jax.checkpoints import posembed
from vit_jax.checkpoints import tree_diff
from vit_jax.checkpoints import trees
from vit_jax.checkpoints.trees import CheckpointError
from vit_jax.configs import choices

Params = Dict[str, Any]
Grid = Tuple[int, int]
_BLOCK = re.compile(r'^encoderblock_\d+$')


def inspect(params: Params, expected: Params, *, fail_if_extra: bool,
            fail_if_missing: bool, fail_if_shape_mismatch: bool) -> Params:
  """`checkpoint.inspect_params`."""
  params_flat = trees.flatten_tree(params, keep_empty=True)
  expected_flat = trees.flatten_tree(expected, keep_empty=True)
  missing, unexpected, mismatched = tree_diff.differing_keys(
      params_flat, expected_flat)
  # Layers without weights: flax serialisation drops their empty dicts.
  empty = [
      k for k in missing
      if isinstance(expected_flat[k], collections.abc.Mapping)
  ]
  for key in empty:
    node = params
    for part in key.split('/'):
      node = node.setdefault(part, {})
    logging.info('inspect_params: recovered empty %s', key)
  missing = [k for k in missing if k not in empty]
  missing, unexpected, mismatched = tree_diff.differences_lines(
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
        tree_diff.differences_message(missing, unexpected, mismatched))
  return params


def adapt(restored: Params, init_params: Params, model_config, *, image_size,
          pretrained_image_size, method) -> Params:
  """`checkpoint.load_pretrained` on a loaded tree."""
  if isinstance(model_config, dict):
    import ml_collections  # pylint: disable=g-import-not-at-top
    model_config = ml_collections.ConfigDict(model_config)
  restored = inspect(
      restored,
      init_params,
      fail_if_extra=False,
      fail_if_missing=False,
      fail_if_shape_mismatch=False)
  has_class_token = _check_class_token(restored, model_config)
  _fit_head(restored, init_params, model_config)
  _fit_posembed(
      restored,
      init_params,
      model_config,
      has_class_token=has_class_token,
      image_size=image_size,
      pretrained_image_size=pretrained_image_size,
      method=method)
  restored = _to_layout_of(restored, init_params)
  _check_fit(restored, init_params)
  return restored


def _check_class_token(restored: Params, model_config) -> bool:
  """Whether the model has a class token; fails if the checkpoint differs."""
  classifier = model_config.get('classifier', 'token')
  has_class_token = classifier in ('token', 'token_unpooled')
  if has_class_token != ('cls' in restored) and 'embedding' in restored:
    raise CheckpointError(
        f'The model (classifier={classifier!r}) '
        f'{"has" if has_class_token else "has no"} class token, but the '
        f'checkpoint {"has" if "cls" in restored else "has no"} `cls`. '
        'Fine-tune with the classifier it was trained with ("token" or '
        '"token_unpooled" with a class token, "gap" or "unpooled" without).')
  return has_class_token


def _fit_head(restored: Params, init_params: Params, model_config) -> None:
  """The original's fine-tuning head: `pre_logits` dropped when
  representation_size is None, kept otherwise; a fresh `head`."""
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
    restored['head'] = {
        k: _materialize(v, fill.get(k, 0.))
        for k, v in init_params['head'].items()
    }
  else:
    restored.pop('head', None)


def _materialize(x, fill: float) -> np.ndarray:
  """An array leaf as numpy; a shape-only leaf as an array full of `fill`."""
  if hasattr(x, '__array__'):
    return np.asarray(x)
  return np.full(x.shape, fill, x.dtype)


def _fit_posembed(restored: Params, init_params: Params, model_config, *,
                  has_class_token, image_size, pretrained_image_size,
                  method) -> None:
  """Resamples every position-embedding table to the model's grid: those of
  `posembed_input`, `posembed_shared` and the blocks' `posembed` as the
  input's, the blocks' `posembed_relative` by `posembed.resample_relative`."""
  image_size = (
      model_config.get('image_size') if image_size is None else image_size)
  grid = old_grid = None
  if image_size is not None:
    grid = posembed.image_grid(image_size, pixels_per_token(model_config),
                               'fine-tuning')
  if pretrained_image_size is not None:
    old_grid = posembed.image_grid(pretrained_image_size,
                                   pixels_per_token(model_config),
                                   'pre-training')
  for parent, name, new in _posemb_tables(
      restored.get('Transformer', {}), init_params.get('Transformer', {})):
    if name == 'posembed_relative':
      parent[name] = _resample_relative(parent[name], new, grid, old_grid)
    else:
      parent[name] = _resample_tables(
          parent[name],
          new,
          has_class_token=has_class_token,
          grid=grid,
          old_grid=old_grid,
          method=method)


def _posemb_tables(old: Params, new: Params):
  """(dict holding a table module, its name, the model's) of each one both
  trees have; per-layer shapes of a scanned model."""
  found = [(old, name, new.get(name))
           for name in ('posembed_input', 'posembed_shared')]
  scanned = new.get(layouts.SCANNED, {})
  for block, subtree in old.items():
    if not _BLOCK.match(block) or not isinstance(subtree, dict):
      continue
    for name in ('posembed', 'posembed_relative'):
      target = new.get(block, {}).get(name)
      if target is None and name in scanned:  # Per layer: no layer axis.
        target = {
            k: np.broadcast_to(
                np.float32(0),
                trees.shape_of(v)[1:]) for k, v in scanned[name].items()
        }
      found.append((subtree, name, target))
  return [(p, name, t) for p, name, t in found if t and p.get(name)]


def _resample_relative(old: Params, new: Params, grid, old_grid) -> Params:
  """`rel_embedding` [2N-1, H, D/H] to the model's grid."""
  out = dict(old)
  table, target = old['rel_embedding'], new['rel_embedding']
  n_old = (trees.shape_of(table)[0] + 1) // 2
  n_new = (trees.shape_of(target)[0] + 1) // 2
  if n_old != n_new or grid is not None or old_grid is not None:
    old_hw = posembed.grid_of(n_old, old_grid, 'checkpoint\'s')
    new_hw = posembed.grid_of(n_new, grid, 'new')
    out['rel_embedding'] = posembed.resample_relative(table, old_hw, new_hw)
    logging.info('load_pretrained: relative table %s -> %s',
                 trees.shape_of(table), out['rel_embedding'].shape)
  return out


def _resample_tables(old: Params, new: Params, *, has_class_token, grid,
                     old_grid, method) -> Params:
  """Resamples the tables of `posembed_input` to the shapes of `new`."""
  out = dict(old)
  if 'pos_embedding' in old and 'pos_embedding' in new:
    posemb, target = old['pos_embedding'], new['pos_embedding']
    if (trees.shape_of(posemb) != trees.shape_of(target) or grid is not None or
        old_grid is not None):
      out['pos_embedding'] = resample_posembed(
          posemb,
          trees.shape_of(target)[1],
          has_class_token,
          grid=grid,
          old_grid=old_grid,
          method=method)
      logging.info('load_pretrained: position embedding %s -> %s',
                   trees.shape_of(posemb), out['pos_embedding'].shape)
  # 2-D learned tables (posemb='learn_2d'): one row per grid row / column.
  for name in ('pos_embedding_row', 'pos_embedding_col'):
    if (name in old and name in new and
        trees.shape_of(old[name]) != trees.shape_of(new[name])):
      table = np.asarray(old[name])
      size = trees.shape_of(new[name])[0]
      out[name] = posembed.resample_grid(table[:, None, :], (size, 1),
                                         method)[:, 0, :]
  return out


def _to_layout_of(restored: Params, init_params: Params) -> Params:
  """Stacks the blocks when the model is scanned (scan=True)."""
  if 'encoderblock' not in init_params.get('Transformer', {}):
    return restored
  try:
    return layouts.layers_to_scan(
        restored,
        trees.shape_of(
            next(
                iter(
                    trees.flatten_tree(init_params['Transformer']
                                       ['encoderblock']).values())))[0])
  except ValueError as e:
    raise CheckpointError(str(e)) from None


def _check_fit(restored: Params, init_params: Params) -> None:
  """Fails unless `restored` has the keys and shapes of `init_params`; drops
  top-level modules the model lacks (pre-training heads such as masked patch
  prediction's `mpp_head`, `mask_token`), as the original ignored them."""
  restored_flat = trees.flatten_tree(restored, keep_empty=True)
  init_flat = trees.flatten_tree(init_params, keep_empty=True)
  missing, unexpected, mismatched = tree_diff.differing_keys(
      restored_flat, init_flat)
  foreign = {k.split('/', 1)[0] for k in unexpected} - set(init_params)
  inner_unexpected = [
      k for k in unexpected if k.split('/', 1)[0] not in foreign
  ]
  if missing or inner_unexpected or mismatched:
    raise CheckpointError(
        tree_diff.differences_message(*tree_diff.differences_lines(
            restored_flat, init_flat, missing, unexpected, mismatched)))
  for name in sorted(foreign):
    logging.warning('load_pretrained: dropping %s, which the model lacks.',
                    name)
    del restored[name]


def resample_posembed(posemb, num_tokens: int, has_class_token: bool, *,
                      grid: Optional[Sequence[int]],
                      old_grid: Optional[Sequence[int]],
                      method: str) -> np.ndarray:
  """`checkpoint.interpolate_posembed`."""
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise CheckpointError(f'The position embedding has shape {posemb.shape}; '
                          'expected (1, tokens, hidden).')
  num_prefix = int(bool(has_class_token))
  posemb_tok, posemb_grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
  gh_old, gw_old = posembed.grid_of(posemb_grid.shape[0], old_grid,
                                    'checkpoint\'s')
  gh, gw = posembed.grid_of(num_tokens - num_prefix, grid, 'new')
  logging.info('interpolate_posembed: grid %dx%d -> %dx%d (%s)', gh_old, gw_old,
               gh, gw, method)
  grid_HxWxD = posemb_grid.reshape(gh_old, gw_old, -1)
  resampled = posembed.resample_grid(grid_HxWxD, (gh, gw), method)
  return np.concatenate([posemb_tok, resampled.reshape(1, gh * gw, -1)], axis=1)


def pixels_per_token(model_config) -> Grid:
  """Stem stride times patch size, from the model config."""
  ph, pw = tuple(model_config.patches.size)
  resnet = model_config.get('resnet')
  stride = 1
  if resnet is not None:
    stride = choices.stem_stride(tuple(resnet.num_layers))
  return stride * ph, stride * pw

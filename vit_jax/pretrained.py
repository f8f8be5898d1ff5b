"""Fitting a checkpoint to a model: `inspect_params` and `load_pretrained`.

The original's two helpers of that name (SPEC section 5, and its public API:
`vit_jax.checkpoint.inspect_params` / `load_pretrained` still work):
`inspect_params` compares a checkpoint's tree with a model's, and
`load_pretrained` adapts a pre-trained checkpoint to a fine-tuning model: a
fresh head, `pre_logits` dropped when the new model has none, position
embeddings resampled to the new grid (`vit_jax.posembed`). Beyond the
original it handles every classifier, non-square grids, bicubic resampling
and scanned models, and it checks the result against the model, failing with
a list of what differs.
"""

import collections
import os
from typing import Any, List, Mapping, Sequence, Union

from absl import logging
import numpy as np

from vit_jax import checkpoint
from vit_jax import layouts
from vit_jax import posembed
from vit_jax import trees
from vit_jax.checkpoint import CheckpointError

Params = checkpoint.Params


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
  shape = checkpoint.shape_of(x)
  return '{}' if shape is None else str(shape)


def _differing_keys(params_flat, expected_flat):
  missing = sorted(expected_flat.keys() - params_flat.keys())
  unexpected = sorted(params_flat.keys() - expected_flat.keys())
  mismatched = sorted(k for k in params_flat.keys() & expected_flat.keys()
                      if checkpoint.shape_of(params_flat[k]) != checkpoint.shape_of(expected_flat[k]))
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
  params_flat = trees.flatten_tree(params, keep_empty=True)
  expected_flat = trees.flatten_tree(expected, keep_empty=True)
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
    restored = checkpoint.canonicalize(pretrained_path)
  else:
    source = f'Checkpoint {os.fspath(pretrained_path)!r}'
    restored = checkpoint.load(pretrained_path)
  try:
    return _adapt(restored, trees.to_dict(init_params), model_config,
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
      grid = posembed.image_grid(image_size, posembed.pixels_per_token(model_config),
                         'fine-tuning')
    if pretrained_image_size is not None:
      old_grid = posembed.image_grid(pretrained_image_size,
                             posembed.pixels_per_token(model_config), 'pre-training')
    restored['Transformer']['posembed_input'] = _resample_posembed_input(
        old_posemb, new_posemb, has_class_token=has_class_token, grid=grid,
        old_grid=old_grid, method=method)

  # A scanned model (scan=True) holds its blocks stacked.
  if 'encoderblock' in init_params.get('Transformer', {}):
    try:
      restored = layouts.layers_to_scan(
          restored, checkpoint.shape_of(next(iter(checkpoint.flatten_tree(
              init_params['Transformer']['encoderblock']).values())))[0])
    except ValueError as e:
      raise CheckpointError(str(e)) from None

  restored_flat = trees.flatten_tree(restored, keep_empty=True)
  init_flat = trees.flatten_tree(init_params, keep_empty=True)
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
    if (checkpoint.shape_of(posemb) != checkpoint.shape_of(target) or grid is not None or
        old_grid is not None):
      out['pos_embedding'] = posembed.interpolate_posembed(
          posemb, checkpoint.shape_of(target)[1], has_class_token, grid=grid,
          old_grid=old_grid, method=method)
      logging.info('load_pretrained: position embedding %s -> %s',
                   checkpoint.shape_of(posemb), out['pos_embedding'].shape)
  # 2-D learned tables (posemb='learn_2d'): one row per grid row / column.
  for name in ('pos_embedding_row', 'pos_embedding_col'):
    if name in old and name in new and checkpoint.shape_of(old[name]) != checkpoint.shape_of(new[name]):
      table = np.asarray(old[name])
      size = checkpoint.shape_of(new[name])[0]
      out[name] = posembed.resample_grid(table[:, None, :], (size, 1),
                                method)[:, 0, :]
  return out

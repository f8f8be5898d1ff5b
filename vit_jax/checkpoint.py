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

`load` also reads old optimizer checkpoints and big_vision's layout (the
list is in `vit_jax.checkpoints.npz`), and timm ViT state dicts (`.pth`,
`.safetensors`; `vit_jax.checkpoints.timm_layout`).

The original's API (SPEC section 8) lives here: `load`, `recover_tree`,
`inspect_params` (a checkpoint's tree against a model's), `load_pretrained`
(a pre-trained checkpoint adapted to a fine-tuning model: a fresh head,
`pre_logits` dropped when the new model has none, position embeddings
resampled to the new grid), `interpolate_posembed`, `get_augreg_df`, `copy`.
Beyond the original, `load_pretrained` handles every classifier, non-square
grids, bicubic resampling and scanned models, and checks its result against
the model, failing with a list of what differs. The command line
(`python -m vit_jax.interop.checkpoint_cli`) inspects, converts and resizes
files.
"""

import collections
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from absl import logging
import numpy as np

from vit_jax.data import filesystem
from vit_jax.checkpoints import layouts
from vit_jax.checkpoints import npz
from vit_jax.checkpoints import posembed
from vit_jax.checkpoints import timm_layout
from vit_jax.checkpoints import torch_layouts
from vit_jax.checkpoints import tree_diff
from vit_jax.checkpoints import trees
from vit_jax.checkpoints.trees import CheckpointError

Params = Dict[str, Any]
Grid = Tuple[int, int]


def recover_tree(keys, values) -> Params:
  """The nested dict of '/'-joined `keys` and their `values` (the original's
  helper; `vit_jax.checkpoints.trees.flatten_tree` is its inverse)."""
  return trees.recover_tree(keys, values)


# ----------------------------------------------------------------------------
# Reading and writing.


def load(path: str) -> Params:
  """Loads an `.npz` checkpoint into a nested dict of numpy arrays.

  Accepts linen and released (pre-linen) names, old optimizer and big_vision
  layouts (module docstring), timm state dicts (`torch.save` files, read
  without executing code, and `.safetensors`); squeezes (1,1,1,C) GroupNorm
  parameters.
  Returns linen names, ready for `model.apply({'params': p}, ...)`.

  Args:
    path: the `.npz` file.

  Returns:
    The nested parameter dict.

  Raises:
    CheckpointError: the file is missing, not an `.npz`, truncated, or its
      keys do not form a tree.
  """
  if torch_layouts.is_torch_file(path):
    try:
      params, _, timm_model = timm_layout.read(path)
    except CheckpointError as e:
      raise CheckpointError(f'Checkpoint {os.fspath(path)!r}: {e}') from None
    logging.info('%s: timm weights of %s', path, timm_model)
    return params
  flat = npz.read_npz(path)
  try:
    return npz.canonicalize(recover_tree(list(flat), list(flat.values())))
  except CheckpointError as e:
    raise CheckpointError(f'Checkpoint {os.fspath(path)!r}: {e}') from None


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
  if not isinstance(params, collections.abc.Mapping):
    raise CheckpointError(f'save expects a nested dict of parameters; got '
                          f'{type(params).__name__}.')
  flat = {k: npz.as_numpy(v, k)
          for k, v in trees.flatten_tree(params).items()}
  if not flat:
    raise CheckpointError('No parameters to save (empty tree).')
  tree = npz.file_tree(recover_tree(list(flat), list(flat.values())), names)
  npz.write_npz_atomically(os.fspath(path), trees.flatten_tree(tree))


def copy(src: str, dst: str, progress: bool = True,
         block_size: int = 10 * 1024 * 1024) -> None:
  """Copies a file between any two paths of `vit_jax.data.filesystem` (e.g. a
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


# ----------------------------------------------------------------------------
# Fitting a checkpoint to a model.


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
  missing, unexpected, mismatched = tree_diff.differing_keys(
      params_flat, expected_flat)
  # Layers without weights: flax serialisation drops their empty dicts.
  empty = [k for k in missing
           if isinstance(expected_flat[k], collections.abc.Mapping)]
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
    restored = npz.canonicalize(pretrained_path)
  else:
    source = f'Checkpoint {os.fspath(pretrained_path)!r}'
    restored = load(pretrained_path)
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
      grid = posembed.image_grid(image_size, pixels_per_token(model_config),
                         'fine-tuning')
    if pretrained_image_size is not None:
      old_grid = posembed.image_grid(pretrained_image_size,
                             pixels_per_token(model_config), 'pre-training')
    restored['Transformer']['posembed_input'] = _resample_posembed_input(
        old_posemb, new_posemb, has_class_token=has_class_token, grid=grid,
        old_grid=old_grid, method=method)

  # A scanned model (scan=True) holds its blocks stacked.
  if 'encoderblock' in init_params.get('Transformer', {}):
    try:
      restored = layouts.layers_to_scan(
          restored, trees.shape_of(next(iter(trees.flatten_tree(
              init_params['Transformer']['encoderblock']).values())))[0])
    except ValueError as e:
      raise CheckpointError(str(e)) from None

  restored_flat = trees.flatten_tree(restored, keep_empty=True)
  init_flat = trees.flatten_tree(init_params, keep_empty=True)
  missing, unexpected, mismatched = tree_diff.differing_keys(
      restored_flat, init_flat)
  # Top-level modules the model lacks are pre-training heads (e.g. masked
  # patch prediction's `mpp_head`, `mask_token`): dropped, as the original
  # ignored them. Anything else that differs is another model.
  foreign = {k.split('/', 1)[0] for k in unexpected} - set(init_params)
  inner_unexpected = [k for k in unexpected
                      if k.split('/', 1)[0] not in foreign]
  if missing or inner_unexpected or mismatched:
    raise CheckpointError(tree_diff.differences_message(
        *tree_diff.differences_lines(
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
    if (trees.shape_of(posemb) != trees.shape_of(target) or grid is not None or
        old_grid is not None):
      out['pos_embedding'] = interpolate_posembed(
          posemb, trees.shape_of(target)[1], has_class_token, grid=grid,
          old_grid=old_grid, method=method)
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
  gh_old, gw_old = posembed.grid_of(posemb_grid.shape[0], old_grid,
                                    'checkpoint\'s')
  gh, gw = posembed.grid_of(num_tokens - num_prefix, grid, 'new')
  logging.info('interpolate_posembed: grid %dx%d -> %dx%d (%s)', gh_old, gw_old,
               gh, gw, method)
  grid_HxWxD = posemb_grid.reshape(gh_old, gw_old, -1)
  resampled = posembed.resample_grid(grid_HxWxD, (gh, gw), method)
  return np.concatenate([posemb_tok, resampled.reshape(1, gh * gw, -1)],
                        axis=1)


def pixels_per_token(model_config) -> Grid:
  """Stem stride times patch size, from the model config."""
  ph, pw = tuple(model_config.patches.size)
  resnet = model_config.get('resnet')
  stride = 1
  if resnet is not None:
    from vit_jax import models_resnet  # pylint: disable=g-import-not-at-top
    stride = models_resnet.stem_stride(tuple(resnet.num_layers))
  return stride * ph, stride * pw

"""Checkpoints in the released `.npz` format: the original `vit_jax`'s API.

A checkpoint is a plain `np.savez` file, one array per parameter, keyed by the
module path joined with '/'. `load` reads flax linen's names and the pre-linen
ones of Google's released files (one counter per parent:
`MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`), old optimizer
and big_vision layouts (`checkpoints.npz`) and timm state dicts
(`checkpoints.timm_layout`), and returns linen names; `save` writes the
released names by default, which the original and timm read.
`load_pretrained` fits a pre-trained checkpoint to a fine-tuning model
(`checkpoints.fit`). The command line is `python -m
vit_jax.interop.checkpoint_cli`.
"""

import collections
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from absl import logging
import numpy as np

from vit_jax.checkpoints import fit
from vit_jax.checkpoints import npz
from vit_jax.checkpoints import timm_layout
from vit_jax.checkpoints import torch_layouts
from vit_jax.checkpoints import trees
from vit_jax.checkpoints.trees import CheckpointError
from vit_jax.data import filesystem

Params = Dict[str, Any]
Grid = Tuple[int, int]


def recover_tree(keys, values) -> Params:
  """The nested dict of '/'-joined `keys` and their `values`."""
  return trees.recover_tree(keys, values)


def load(path: str) -> Params:
  """The nested dict of numpy arrays, linen names, of a checkpoint file (any
  layout of the module docstring; timm files are read without running code).

  Raises:
    CheckpointError: the file is missing, unreadable, truncated, or its keys
      do not form a tree.
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


def save(params: Mapping[str, Any],
         path: str,
         *,
         names: str = 'released') -> None:
  """Writes a nested dict of arrays to `path` atomically (no '.npz' added).

  Scanned blocks are written per layer, bfloat16 as float32.

  Args:
    params: e.g. the 'params' of a model or a train state, numpy or jax.
    names: 'released' (Google's released files' names and GroupNorm shapes,
      what the original's and timm's loaders read) or 'linen' (this model's).

  Raises:
    CheckpointError: non-array or no leaves, or an unwritable destination.
    ValueError: unknown `names`.
  """
  if not isinstance(params, collections.abc.Mapping):
    raise CheckpointError(f'save expects a nested dict of parameters; got '
                          f'{type(params).__name__}.')
  flat = {k: npz.as_numpy(v, k) for k, v in trees.flatten_tree(params).items()}
  if not flat:
    raise CheckpointError('No parameters to save (empty tree).')
  tree = npz.file_tree(recover_tree(list(flat), list(flat.values())), names)
  npz.write_npz_atomically(os.fspath(path), trees.flatten_tree(tree))


def copy(src: str,
         dst: str,
         progress: bool = True,
         block_size: int = 10 * 1024 * 1024) -> None:
  """Copies a file between two `vit_jax.data.filesystem` paths (e.g. from
  gs://vit_models/...), with a progress bar if `progress`."""
  import tqdm  # pylint: disable=g-import-not-at-top
  with filesystem.open_file(src, 'rb') as fin, \
      filesystem.open_file(dst, 'wb') as fout:
    with tqdm.tqdm(unit='B', unit_scale=True, disable=not progress) as bar:
      while block := fin.read(block_size):
        fout.write(block)
        bar.update(len(block))


def get_augreg_df(directory: str = 'gs://vit_models/augreg'):
  """The AugReg runs of `{directory}/index.csv` (Steiner et al., "How to train
  your ViT?") as a pandas DataFrame, one row per fine-tuning: `filename` is
  the pre-trained checkpoint's stem, `ds` its data, `final_val` its upstream
  accuracy, `adapt_*` the fine-tuning's."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  path = filesystem.join(directory, 'index.csv')
  if not filesystem.exists(path):
    raise FileNotFoundError(
        f'AugReg index {path} does not exist; the public one is '
        'gs://vit_models/augreg/index.csv.')
  with filesystem.open_file(path, 'r') as f:
    return pd.read_csv(f)


def inspect_params(*,
                   params: Params,
                   expected: Params,
                   fail_if_extra: bool = True,
                   fail_if_missing: bool = True,
                   fail_if_shape_mismatch: bool = False) -> Params:
  """Checks that `params` has the keys of `expected`; returns `params`.

  Empty sub-dicts of `expected` (layers without weights) are added to
  `params` in place, as the original did.

  Args:
    expected: the model's tree (arrays or `jax.ShapeDtypeStruct`s).
    fail_if_shape_mismatch: also fail on common keys of other shapes.

  Raises:
    CheckpointError (a ValueError): keys differ; it lists each with shapes.
  """
  return fit.inspect(
      params,
      expected,
      fail_if_extra=fail_if_extra,
      fail_if_missing=fail_if_missing,
      fail_if_shape_mismatch=fail_if_shape_mismatch)


def load_pretrained(*,
                    pretrained_path: Union[str, os.PathLike, Mapping],
                    init_params: Mapping[str, Any],
                    model_config,
                    image_size: Union[None, int, Sequence[int]] = None,
                    pretrained_image_size: Union[None, int,
                                                 Sequence[int]] = None,
                    method: str = 'bilinear_aligned') -> Params:
  """A pre-trained checkpoint adapted to a new model for fine-tuning.

  As the original: a fresh head from `init_params`, `pre_logits` dropped when
  `model_config.representation_size` is None, the position embedding
  resampled to the model's grid (class-token row kept aside). Also: every
  classifier, non-square grids, 2-D embeddings, scanned models; top-level
  modules the model lacks (pre-training heads) are dropped.

  Args:
    pretrained_path: the file, or an already loaded params dict.
    init_params: the new model's params (arrays or shapes).
    model_config: the model's config (`classifier`, `representation_size`,
      `patches.size`, `resnet`, and `image_size` if present).
    image_size: int or (height, width) of fine-tuning; default
      `model_config.image_size`, else a square grid.
    pretrained_image_size: the checkpoint's, for a non-square grid.
    method: see `interpolate_posembed`.

  Returns:
    A nested dict of numpy arrays with the structure of `init_params`.

  Raises:
    CheckpointError: an unreadable file, or keys or shapes that do not fit
      the model (listed, with the source named).
  """
  if isinstance(pretrained_path, collections.abc.Mapping):
    source = 'The given params'
    restored = npz.canonicalize(pretrained_path)
  else:
    source = f'Checkpoint {os.fspath(pretrained_path)!r}'
    restored = load(pretrained_path)
  try:
    return fit.adapt(
        restored,
        trees.to_dict(init_params),
        model_config,
        image_size=image_size,
        pretrained_image_size=pretrained_image_size,
        method=method)
  except CheckpointError as e:
    raise CheckpointError(f'{source}: {e}') from None


def interpolate_posembed(posemb,
                         num_tokens: int,
                         has_class_token: bool,
                         *,
                         grid: Optional[Sequence[int]] = None,
                         old_grid: Optional[Sequence[int]] = None,
                         method: str = 'bilinear_aligned') -> np.ndarray:
  """Resamples a (1, N, D) position embedding to `num_tokens` rows.

  The class-token row (if `has_class_token`) is kept aside, the rest
  resampled from `old_grid` to `grid` ((rows, cols); default square).
  'bilinear_aligned' (alias 'bilinear') gives the original's numbers
  (`scipy.ndimage.zoom`, order 1); 'bicubic' those of `jax.image.resize`.

  Raises:
    CheckpointError: a grid that is not square when none is given, or one
      without the number of tokens.
  """
  return fit.resample_posembed(
      posemb,
      num_tokens,
      has_class_token,
      grid=grid,
      old_grid=old_grid,
      method=method)

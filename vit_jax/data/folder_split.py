"""A seeded, stratified train/val split of a single-tree image folder.

A folder with a `train` or `test` subfolder has the train/test layout
(`<dir>/<split>/<class>/*`) and is read as it is. Otherwise it is a single
tree `<dir>/<class>/*`, split here into 'train' and 'val' ('test' is an
alias of 'val'). Per class:

  1. its files, relative to the class folder with '/' separators, NFC,
     sorted by code point;
  2. seed = the first 4 bytes, big-endian, of
     `sha256(f'{split_seed}/{class_name}'.encode('utf-8'))`;
  3. `order = numpy.random.RandomState(seed).permutation(n)`;
  4. `order[:k]` is validation, with `k = round(val_fraction * n)` clipped
     to [1, n - 1] when n >= 2; a single file goes to train.

The split depends only on file names, `val_fraction` and `split_seed`.
"""

import hashlib
import os
from typing import Dict, List, Sequence, Tuple
import unicodedata

import numpy as np

from vit_jax.data import filesystem

TRAIN_TEST = 'train_test'  # <dir>/train/<class>/*, <dir>/test/<class>/*
SINGLE_TREE = 'single_tree'  # <dir>/<class>/*, split by this module

TRAIN = 'train'
VAL = 'val'
# Split names a single tree answers to, and the part each one reads.
SPLIT_ALIASES = {'train': TRAIN, 'val': VAL, 'validation': VAL, 'test': VAL}

DEFAULT_VAL_FRACTION = 0.2
DEFAULT_SPLIT_SEED = 0

LAYOUTS_HELP = ('either one folder per class, <dir>/<class>/*.jpg (split into '
                "'train' and 'val' by --config.val_fraction and "
                '--config.split_seed), or <dir>/train/<class>/*.jpg and '
                '<dir>/test/<class>/*.jpg')


def detect_layout(root: str) -> str:
  """`TRAIN_TEST` or `SINGLE_TREE` for an existing folder `root`."""
  if not filesystem.isdir(root):
    raise ValueError(f'Image folder {root!r} does not exist; expected '
                     f'{LAYOUTS_HELP}.')
  for name in (TRAIN, 'test'):
    if filesystem.isdir(filesystem.join(root, name)):
      return TRAIN_TEST
  return SINGLE_TREE


def resolve_split(split: str) -> str:
  """Maps a split name of a single tree to `TRAIN` or `VAL`."""
  try:
    return SPLIT_ALIASES[split]
  except (KeyError, TypeError):
    raise ValueError(
        f'Split {split!r} of a single-tree image folder (<dir>/<class>/*): '
        f"use 'train', or 'val' (also called 'test' or 'validation') for the "
        'held-out part; set --config.train_split / --config.test_split.'
    ) from None


def check_params(val_fraction: float, split_seed: int) -> Tuple[float, int]:
  """Validates and normalises `(val_fraction, split_seed)`."""
  try:
    val_fraction = float(val_fraction)
  except (TypeError, ValueError):
    val_fraction = float('nan')
  if not 0 < val_fraction < 1:
    raise ValueError(
        f'config.val_fraction={val_fraction!r}: the fraction of each class '
        'held out for validation must be strictly between 0 and 1, e.g. 0.2.')
  if isinstance(split_seed, bool) or not isinstance(split_seed,
                                                    (int, np.integer)):
    raise ValueError(f'config.split_seed={split_seed!r} must be an integer.')
  return val_fraction, int(split_seed)


def num_val(n: int, val_fraction: float) -> int:
  """Validation files of a class of `n` files (step 4 of the recipe)."""
  if n < 2:
    return 0
  return min(max(round(val_fraction * n), 1), n - 1)


def class_seed(split_seed: int, class_name: str) -> int:
  """The uint32 seed of one class's permutation (step 2 of the recipe)."""
  key = f'{int(split_seed)}/{unicodedata.normalize("NFC", class_name)}'
  return int.from_bytes(hashlib.sha256(key.encode('utf-8')).digest()[:4], 'big')


def sort_key(relpath: str) -> str:
  """Machine-independent sort key of a path relative to its class folder."""
  return unicodedata.normalize('NFC', relpath.replace(os.sep, '/'))


def split_class_files(class_name: str,
                      files: Sequence[str],
                      class_dir: str = '',
                      *,
                      val_fraction: float,
                      split_seed: int) -> Tuple[List[str], List[str]]:
  """Splits one class's files into (train, val), each in sorted order.

  Args:
    class_name: the class folder's name (part of the seed).
    files: the class's files, in any order (absolute or relative paths).
    class_dir: the class folder; paths are sorted relative to it.
    val_fraction: fraction of the class held out, in (0, 1).
    split_seed: the split's seed (independent of the training seed).
  """
  val_fraction, split_seed = check_params(val_fraction, split_seed)
  keyed = sorted(
      (sort_key(os.path.relpath(f, class_dir) if class_dir else f), f)
      for f in files)
  if len({k for k, _ in keyed}) != len(keyed):
    raise ValueError(f'Class {class_name!r} lists a file twice.')
  files = [f for _, f in keyed]
  k = num_val(len(files), val_fraction)
  order = np.random.RandomState(class_seed(split_seed,
                                           class_name)).permutation(len(files))
  is_val = np.zeros(len(files), bool)
  is_val[order[:k]] = True
  return ([f for f, v in zip(files, is_val) if not v],
          [f for f, v in zip(files, is_val) if v])


def split_files(files_by_class: Dict[str, Sequence[str]],
                *,
                val_fraction: float = DEFAULT_VAL_FRACTION,
                split_seed: int = DEFAULT_SPLIT_SEED,
                root: str = '') -> Dict[str, Tuple[List[str], List[str]]]:
  """`{class: (train files, val files)}` of a tree `<root>/<class>`."""
  return {
      name:
          split_class_files(
              name,
              files,
              os.path.join(root, name) if root else '',
              val_fraction=val_fraction,
              split_seed=split_seed) for name, files in files_by_class.items()
  }

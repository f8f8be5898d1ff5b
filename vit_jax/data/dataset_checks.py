"""Datasets a run cannot learn from meaningfully, named before training.

A class without training images is an error; a class missing from the test
split and a train split smaller than one batch are warnings.
"""

import sys

from absl import logging
import numpy as np

from vit_jax import input_pipeline
from vit_jax.data import folder_split
from vit_jax.data import image_folders


def warn(text: str) -> None:
  """One paragraph on the console (and in the log)."""
  logging.info('%s', text)
  print(f'Warning: {text}', file=sys.stderr, flush=True)


def _check_folder_classes(config) -> None:
  root = config.dataset
  if folder_split.detect_layout(root) != folder_split.TRAIN_TEST:
    return  # a single tree drops empty class folders itself (list_tree)
  _, labels, classes, _ = image_folders.list_folder(root, config.train_split)
  counts = np.bincount(labels, minlength=len(classes))
  empty = [c for c, n in zip(classes, counts) if not n]
  if empty:
    raise ValueError(
        f'Class folder(s) {empty} of image folder {root!r} have no images in '
        f'the {config.train_split!r} split, so a model cannot learn them (a '
        'folder of another split, or an empty one, makes them classes). Add '
        f'images to {root}/{config.train_split}/<class>, or remove the '
        'class folder from every split.')
  _, test_labels, _, _ = image_folders.list_folder(root, config.test_split)
  test_counts = np.bincount(test_labels, minlength=len(classes))
  untested = [c for c, n in zip(classes, test_counts) if not n]
  if untested:
    warn(f'Class(es) {untested} of image folder {root!r} have no images in '
         f'the {config.test_split!r} split: its test accuracy does not '
         'measure them. Add test images of them to test the model on every '
         'class.')


def check(config) -> None:
  """Raises ValueError or warns (above) for `config`'s dataset."""
  if image_folders.is_folder(config.dataset):
    _check_folder_classes(config)
  n = input_pipeline.get_dataset_info(
      config.dataset, config.train_split,
      data_dir=config.get('tfds_data_dir'))['num_examples']
  if n < config.batch:
    warn(f'The {config.train_split!r} split of {config.dataset} has {n} '
         f'images, fewer than one batch (config.batch={config.batch}): every '
         'batch repeats images, and each step is several epochs. Lower '
         '--config.batch (a multiple of the device count) to train on '
         'distinct images.')

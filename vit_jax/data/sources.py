"""`Source`: what every dataset of `vit_jax.input_pipeline` is reduced to.

One split's process shard: a finite `tf.data` of undecoded `(image, label)`
examples plus a `decode` to uint8 `[H, W, 3]`.
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

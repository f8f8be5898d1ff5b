"""The PyTorch tutorials' preprocessing, as options of `config.pp`.

  pp.augment='random_resized_crop'  torchvision's `RandomResizedCrop`
  pp.flip=True                      random horizontal flip (p=0.5)
  pp.eval_resize=256                `Resize(256)` + `CenterCrop(pp.crop)`

Boxes and offsets follow torchvision's integer arithmetic; the draws are
TF's stateless ones, seeded per example; resizing is bilinear, antialiased.
"""

import math

from vit_jax.data import tf_import

tf = tf_import.import_tensorflow()

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
TRIES = 10


def crop_box(height, width, seed, scale=SCALE, ratio=RATIO):
  """torchvision's `RandomResizedCrop.get_params`: (top, left, h, w)."""
  height = tf.cast(height, tf.float32)
  width = tf.cast(width, tf.float32)
  u = tf.random.stateless_uniform([TRIES, 4], seed)
  area = height * width * (scale[0] + u[:, 0] * (scale[1] - scale[0]))
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + u[:, 1] * (log_hi - log_lo))
  w = tf.round(tf.sqrt(area * aspect))
  h = tf.round(tf.sqrt(area / aspect))
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(ok, tf.int32))
  top = tf.floor(u[first, 2] * (height - h[first] + 1))
  left = tf.floor(u[first, 3] * (width - w[first] + 1))
  # No try fits: the centre crop, its aspect clamped to `ratio`.
  in_ratio = width / height
  fw = tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width)
  fh = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
  fallback = tf.stack(
      [tf.floor((height - fh) / 2),
       tf.floor((width - fw) / 2), fh, fw])
  box = tf.where(
      tf.reduce_any(ok), tf.stack([top, left, h[first], w[first]]), fallback)
  return tf.unstack(tf.cast(box, tf.int32))


def random_resized_crop(image, size, seed):
  """A `crop_box` of `image`, resized to `size` (float32)."""
  shape = tf.shape(image)
  top, left, h, w = crop_box(shape[0], shape[1], seed)
  image = tf.slice(image, [top, left, 0], [h, w, -1])
  image.set_shape([None, None, 3])  # tf.slice forgets the channel count
  return tf.image.resize(image, size, antialias=True)


def random_flip(image, seed):
  """Mirrors `image` left-right with probability 1/2."""
  seed = tf.random.experimental.stateless_fold_in(seed, 1)
  return tf.image.stateless_random_flip_left_right(image, seed)


def resize_short_center_crop(image, size, short_side: int):
  """torchvision's `Resize(short_side)` then `CenterCrop(size)`."""
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  short, long = tf.minimum(h, w), tf.maximum(h, w)
  new_long = (short_side * long) // short  # int(size * long / short)
  new_h = tf.where(h <= w, short_side, new_long)
  new_w = tf.where(h <= w, new_long, short_side)
  image = tf.image.resize(image, tf.stack([new_h, new_w]), antialias=True)
  top = tf.cast(tf.round(tf.cast(new_h - size[0], tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size[1], tf.float32) / 2), tf.int32)
  image = tf.slice(image, [top, left, 0], [size[0], size[1], -1])
  image.set_shape([size[0], size[1], 3])
  return image

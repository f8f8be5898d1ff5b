"""Random affine augmentation: rotation and zoom about the centre, then shift.

Bilinear with zero fill (`pp.augment='affine'`); example i draws its four
uniforms in [-1, 1] from `tf.random.stateless_uniform([4], seed_i)`.
"""

import math

from vit_jax.data import tf_import

tf = tf_import.import_tensorflow()


def uniforms(seeds):
  """[B, 2] int64 seeds -> [B, 4] float32, row i drawn from seed i."""
  return tf.map_fn(
      lambda s: tf.random.stateless_uniform([4], s, minval=-1., maxval=1.),
      seeds,
      fn_output_signature=tf.float32)


def draw(u, *, rotate: float, zoom: float, shift_pad: float):
  """(theta in radians, scale, tx, ty) of uniforms `u` [B, 4]."""
  return (u[:, 0] * rotate * math.pi / 180., 1. + u[:, 1] * zoom,
          u[:, 2] * shift_pad, u[:, 3] * shift_pad)


def warp(images, size, theta, scale, tx, ty):
  """images [B, H, W, C] -> float32 [B, *size, C], rotated, zoomed, shifted."""
  # The op maps output pixels back to the input: A (out - c) + c - t, with A
  # the inverse of "rotate, then zoom".
  cos, sin = tf.cos(theta) / scale, tf.sin(theta) / scale
  cy, cx = (size[0] - 1) / 2, (size[1] - 1) / 2
  zero = tf.zeros_like(cos)
  transforms = tf.cast(
      tf.stack([
          cos, sin, cx - cos * cx - sin * cy - tx, -sin, cos,
          cy + sin * cx - cos * cy - ty, zero, zero
      ],
               axis=1), tf.float32)
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(images, tf.float32),
      transforms=transforms,
      output_shape=tf.constant(size, tf.int32),
      fill_value=0.,
      interpolation='BILINEAR',
      fill_mode='CONSTANT')

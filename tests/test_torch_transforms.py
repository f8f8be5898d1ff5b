"""The tutorials' preprocessing options (vit_jax/data/torch_transforms.py)."""

import math

import ml_collections
import numpy as np
import pytest

from vit_jax import input_pipeline
from vit_jax.data import torch_transforms
from vit_jax.data.tf_import import import_tensorflow

tf = import_tensorflow()


def _image(h, w):
  return np.arange(h * w * 3).reshape(h, w, 3).astype(np.uint8) % 251


def _augment(**pp):
  config = ml_collections.ConfigDict({'pp': dict(crop=4, **pp)})
  return input_pipeline.Augment.from_config(config)


def test_eval_resize_takes_the_centre_crop_of_the_short_side():
  image = _image(6, 9)
  # Short side already 6: no resize; top round(2/2)=1, left round(5/2)=2.
  out = input_pipeline._preprocess(
      tf.constant(image), (4, 4), _augment(eval_resize=6))
  np.testing.assert_array_equal(
      out.numpy(), (image[1:5, 2:6].astype(np.float32) - 127.5) / 127.5)
  # Portrait, odd margin: top round(5/2) = 2 (half to even), left 1.
  tall = _image(9, 6)
  out = torch_transforms.resize_short_center_crop(tf.constant(tall), (4, 4),
                                                  6).numpy()
  np.testing.assert_array_equal(out, tall[2:6, 1:5].astype(np.float32))
  # The default stays the original's plain resize.
  plain = input_pipeline._preprocess(tf.constant(image), (4, 4), _augment())
  np.testing.assert_array_equal(
      plain.numpy(), (tf.image.resize(image, (4, 4)).numpy() - 127.5) / 127.5)


def test_flip_mirrors_about_half_of_the_examples():
  image = _image(4, 4)
  augment = _augment(augment='none', flip=True)
  flipped = 0
  for i in range(64):
    out = input_pipeline._preprocess(
        tf.constant(image), (4, 4), augment, tf.constant([i, 0]))
    x = out.numpy() * 127.5 + 127.5
    if np.array_equal(x, image[:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(x, image)
  assert 20 <= flipped <= 44  # binomial(64, 1/2): 5 sigma


def test_random_resized_crop_boxes_have_torchvision_ranges():
  h, w = 60, 80
  seeds = tf.stack([tf.range(400), tf.ones(400, tf.int32)], axis=1)
  boxes = tf.function(lambda seeds: tf.map_fn(
      lambda seed: tf.stack(torch_transforms.crop_box(h, w, seed)), seeds))(
          seeds).numpy()
  top, left, bh, bw = boxes.T
  area, ratio = bh * bw / (h * w), bw / bh
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + bh <= h).all() and (left + bw <= w).all()
  # torchvision: area 0.08-1 and log-ratio uniform in [log 3/4, log 4/3],
  # up to the rounding of h and w to whole pixels.
  assert area.min() >= 0.075 and area.max() <= 1
  assert ratio.min() >= 0.74 and ratio.max() <= 1.35
  assert area.min() < 0.12 and area.max() > 0.8  # the whole range drawn
  log_ratio = np.log(ratio)
  assert abs(log_ratio.mean()) < 0.03
  assert log_ratio.std() == pytest.approx(
      math.log(16 / 9) / math.sqrt(12), rel=0.15)
  # Against torchvision's own sampler where it imports.
  try:
    import timm_support  # pylint: disable=g-import-not-at-top
    timm_support.make_torchvision_importable()
    import torch  # pylint: disable=g-import-not-at-top
    from torchvision import transforms  # pylint: disable=g-import-not-at-top
  except ImportError:  # the checks above stand
    return
  torch.manual_seed(0)
  theirs = np.array([
      transforms.RandomResizedCrop.get_params(
          torch.zeros(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(400)
  ])
  t_area = theirs[:, 2] * theirs[:, 3] / (h * w)
  assert abs(t_area.mean() - area.mean()) < 0.06
  assert t_area.min() >= 0.075 and (theirs[:, 0] + theirs[:, 2] <= h).all()


def test_train_crop_has_the_crop_size_and_bad_options_are_named():
  out = input_pipeline._preprocess(
      tf.constant(_image(30, 50)), (4, 4),
      _augment(augment='random_resized_crop', flip=True), tf.constant([3, 4]))
  assert out.shape == (4, 4, 3)
  with pytest.raises(ValueError, match='flips already'):
    _augment(augment='inception_crop', flip=True)
  with pytest.raises(ValueError, match='smaller than'):
    _augment(eval_resize=3)

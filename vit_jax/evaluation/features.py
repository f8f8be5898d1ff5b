"""Frozen representations of images: a model's pre_logits output, batched.

The model with `num_classes=0` (tanh(Dense) with a representation layer,
else the pooled encoder output); unpooled classifiers are pooled here
(`token_unpooled`: class token, `unpooled`: mean of the tokens).
"""

from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

Params = Any

DEFAULT_BATCH_SIZE = 256


def feature_model(model):
  """The model without head: `num_classes=0` returns the pre_logits output."""
  return model.clone(num_classes=0)


_JITTED = {}  # id(model) -> (model, jitted fn); modules are unhashable


def _jitted_features(model):
  cached = _JITTED.get(id(model))
  if cached is not None and cached[0] is model:
    return cached[1]
  without_head = feature_model(model)
  classifier = model.classifier

  @jax.jit
  def apply(params, images):
    x = without_head.apply({'params': params}, images, train=False)
    if classifier == 'token_unpooled':
      x = x[:, 0]
    elif classifier == 'unpooled':
      x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
    return x.astype(jnp.float32)

  if len(_JITTED) > 8:
    _JITTED.clear()
  _JITTED[id(model)] = (model, apply)
  return apply


def make_feature_fn(model, batch_size: int = DEFAULT_BATCH_SIZE):
  """A function (params, images [N, H, W, 3]) -> float32 features [N, D].

  Jitted once per model object for one batch shape (the last batch is
  padded); the head, if any, is not used.
  """
  apply = _jitted_features(model)

  def feature_fn(params, images):
    params = {k: v for k, v in params.items() if k != 'head'}
    images = np.asarray(images, np.float32)
    out = []
    for start in range(0, len(images), batch_size):
      batch = images[start:start + batch_size]
      n = len(batch)
      if n < batch_size:
        pad = np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)
        batch = np.concatenate([batch, pad])
      out.append(np.asarray(apply(params, batch))[:n])
    if not out:
      raise ValueError('No images to extract features from.')
    return np.concatenate(out)

  return feature_fn


def _batches_of(images_or_dataset) -> Iterator[np.ndarray]:
  """Image batches [n, H, W, 3] from an array or an iterable of batches."""
  if isinstance(images_or_dataset, (np.ndarray, jax.Array)):
    yield np.asarray(images_or_dataset)
    return
  for batch in images_or_dataset:
    if isinstance(batch, dict):
      images = np.asarray(batch['image'])
      mask = batch.get('mask')
      images = images.reshape(-1, *images.shape[-3:])  # [devices, b] -> [n]
      if mask is not None:
        images = images[np.asarray(mask).reshape(-1) > 0]  # drop padding
    elif isinstance(batch, (tuple, list)):
      images = np.asarray(batch[0])
    else:
      images = np.asarray(batch)
    yield images.reshape(-1, *images.shape[-3:])


def extract_features(model,
                     params: Params,
                     images_or_dataset,
                     *,
                     batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
  """Frozen representations (pre_logits output) of images: float32 [N, D].

  `images_or_dataset` is an array [N, H, W, 3] in [-1, 1], or an iterable of
  arrays, `(images, labels)` tuples or input-pipeline dicts (padding with
  mask 0 is dropped). The order is kept; a `head` in `params` is ignored.
  """
  feature_fn = make_feature_fn(model, batch_size)
  return np.concatenate(
      [feature_fn(params, b) for b in _batches_of(images_or_dataset) if len(b)])

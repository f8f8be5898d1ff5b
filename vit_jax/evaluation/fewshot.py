"""Few-shot linear evaluation, the paper's cheap probe of a representation.

Paper Sec. 4.1 / Appendix B.3 (SPEC section 7): freeze the model, take the
representation of `k` training images per class, fit a regularised
least-squares regression from the representation to {-1, 1}^K targets in
closed form, and report accuracy on the test split; k = 1, 5, 10, 25, averaged
over several random draws of the k images (seeds).

Choices, stated:
  * Representation: the model applied with `num_classes=0`, i.e. the output of
    `pre_logits` -- tanh(Dense) when the model has a representation layer, the
    pooled encoder output (class token or GAP) otherwise. Unpooled classifiers
    are pooled here: `token_unpooled` takes the class token, `unpooled`
    averages the tokens.
  * The regression (as big_vision's few-shot evaluator): features are
    standardised with the mean and std of the k-shot training features, a
    constant bias feature `BIAS_FEATURE` = 100 is appended (so the bias is
    all but unregularised), targets are 2 * one_hot - 1, and
    W = (X^T X + l2 I)^-1 X^T Y, computed through an eigendecomposition of
    X^T X (or of X X^T when there are fewer examples than features, using
    X^T (X X^T + l2 I)^-1 Y, which is the same W). Default l2 = 2^10
    (big_vision's default); `l2_regs=(...)` instead picks l2 per draw by
    accuracy on held-out training images of the same pool (disjoint from the
    k shots).
  * Shots are drawn per seed from a pool of training images (by default the
    whole train split; `max_per_class` caps it, taking the first images of
    each class in split order). The k images of a seed are the first k of one
    permutation, so a seed's 1-shot set is inside its 5-shot set.

Periodic evaluation during training: see `make_fewshot_evaluator`.

Command line:

  python -m vit_jax.evaluation.fewshot --model ViT-B_16 \
      --checkpoint ViT-B_16.npz --dataset embedded_mnist --shots 1,5,10 --seeds 3
"""

import argparse
import math
import sys
import time
from typing import (Any, Callable, Dict, Iterator, Optional, Sequence, Tuple,
                    Union)

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import checkpoint
from vit_jax import models
from vit_jax.evaluation import trained_model

Params = Any

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_L2_REG = 2.0**10
L2_REG_SWEEP = tuple(2.0**k for k in range(-10, 21, 2))
BIAS_FEATURE = 100.0
DEFAULT_BATCH_SIZE = 256


# ------------------------------------------------------------ features


def _feature_model(model):
  """The model without head: `num_classes=0` returns the pre_logits output."""
  return model.clone(num_classes=0)


_JITTED = {}  # id(model) -> (model, jitted fn); modules are unhashable


def _jitted_features(model):
  cached = _JITTED.get(id(model))
  if cached is not None and cached[0] is model:
    return cached[1]
  feature_model = _feature_model(model)
  classifier = model.classifier

  @jax.jit
  def apply(params, images):
    x = feature_model.apply({'params': params}, images, train=False)
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

  Jitted for one batch shape (compiled once per model object); the last batch
  is padded.

  Args:
    model: a VisionTransformer (its head, if any, is not used).
    batch_size: images per forward pass.
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


def extract_features(model, params: Params, images_or_dataset, *,
                     batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
  """Frozen representations (pre_logits output) of images.

  Args:
    model: a VisionTransformer.
    params: its parameters (a `head` is ignored).
    images_or_dataset: float32 images [N, H, W, 3] in [-1, 1], or an iterable
      of batches: arrays, `(images, labels)` tuples, or input-pipeline dicts
      `{'image': [devices, b, H, W, 3], 'mask': [devices, b]}` (padding
      examples, mask 0, are dropped).
    batch_size: images per forward pass.

  Returns:
    float32 [N, D], in input order.
  """
  feature_fn = make_feature_fn(model, batch_size)
  return np.concatenate([feature_fn(params, b)
                         for b in _batches_of(images_or_dataset) if len(b)])


# ------------------------------------------------------- the regression


class _RidgeSolver:
  """Closed-form ridge regression for many l2 values from one decomposition.

  With X [N, D] and Y [N, C]: if N >= D, X^T X = Q diag(e) Q^T and
  W = Q diag(1/(e + l2)) Q^T X^T Y; else X X^T = Q diag(e) Q^T and
  W = X^T Q diag(1/(e + l2)) Q^T Y (the push-through identity, same W).
  """

  def __init__(self, x_NxD: np.ndarray, y_NxC: np.ndarray):
    x = np.asarray(x_NxD, np.float64)
    y = np.asarray(y_NxC, np.float64)
    n, d = x.shape
    self._primal = n >= d
    gram = x.T @ x if self._primal else x @ x.T
    self._eigs, q = np.linalg.eigh(gram)
    self._eigs = np.maximum(self._eigs, 0.0)  # round-off of a PSD matrix
    if self._primal:
      self._left = q
      self._right = q.T @ (x.T @ y)
    else:
      self._left = x.T @ q
      self._right = q.T @ y

  def weights(self, l2_reg: float) -> np.ndarray:
    if not l2_reg > 0:
      raise ValueError(f'l2_reg must be positive; got {l2_reg}.')
    return (self._left / (self._eigs + l2_reg)) @ self._right


def fit_ridge(x_NxD: np.ndarray, y_NxC: np.ndarray,
              l2_reg: float) -> np.ndarray:
  """W = (X^T X + l2 I)^-1 X^T Y in float64 (X includes any bias column)."""
  return _RidgeSolver(x_NxD, y_NxC).weights(l2_reg)


class _Probe:
  """Standardisation, bias feature and ridge solver fitted to k-shot data."""

  def __init__(self, train_x, train_y, num_classes):
    train_x = np.asarray(train_x, np.float64)
    self.mean = train_x.mean(axis=0, keepdims=True)
    self.std = train_x.std(axis=0, keepdims=True) + 1e-5
    targets = 2.0 * np.eye(num_classes)[np.asarray(train_y)] - 1.0
    self.solver = _RidgeSolver(self.transform(train_x), targets)

  def transform(self, x):
    x = (np.asarray(x, np.float64) - self.mean) / self.std
    return np.concatenate([x, np.full((len(x), 1), BIAS_FEATURE)], axis=1)

  def accuracy(self, x, y, l2_reg):
    if len(x) == 0:
      raise ValueError('No test examples to compute accuracy on.')
    w = self.solver.weights(l2_reg)
    pred = np.argmax(self.transform(x) @ w, axis=1)
    return float(np.mean(pred == np.asarray(y)))


def _int_labels(y) -> np.ndarray:
  y = np.asarray(y)
  return np.argmax(y, axis=-1) if y.ndim == 2 else y.astype(np.int64)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray,
                 test_x: np.ndarray, test_y: np.ndarray, *,
                 l2_reg: float = DEFAULT_L2_REG,
                 num_classes: Optional[int] = None) -> float:
  """Test accuracy of the closed-form regularised least-squares probe.

  Args:
    train_x: features [N, D].
    train_y: integer labels [N] (or one-hot [N, K]).
    test_x: features [M, D].
    test_y: labels [M] (or one-hot).
    l2_reg: ridge strength (> 0), on standardised features.
    num_classes: K; default 1 + the largest label seen.

  Returns:
    Accuracy in [0, 1].
  """
  train_y, test_y = _int_labels(train_y), _int_labels(test_y)
  if num_classes is None:
    num_classes = int(max(train_y.max(), test_y.max())) + 1
  return _Probe(train_x, train_y, num_classes).accuracy(test_x, test_y, l2_reg)


# ---------------------------------------------------------- k-shot draws


def _class_name(names, c):
  return f'{c} ({names[c]!r})' if names is not None and str(names[c]) != str(
      c) else f'{c}'


def check_shots(labels: np.ndarray, shots: Sequence[int], num_classes: int, *,
                extra_per_class: int = 0, class_names=None, where: str = ''):
  """Raises a ValueError naming the class, k and the count for a short class."""
  counts = np.bincount(labels, minlength=num_classes)
  for k in sorted(shots, reverse=True):
    if k < 1:
      raise ValueError(f'Shots must be positive; got {k}.')
    need = k + extra_per_class
    short = [c for c in range(num_classes) if counts[c] < need]
    if short:
      c = short[0]
      more = (f' ({len(short)} classes are short, e.g. '
              f'{", ".join(str(s) for s in short[:5])})' if len(short) > 1
              else '')
      extra = (f' + {extra_per_class} held out for choosing l2_reg'
               if extra_per_class else '')
      raise ValueError(
          f'{k}-shot evaluation needs {need} training images{extra} of class '
          f'{_class_name(class_names, c)}, but only {counts[c]} are available'
          f'{where}{more}. Use fewer shots, or a larger pool '
          '(max_per_class / train split).')


def fewshot_accuracies(train_x, train_y, test_x, test_y, *,
                       shots: Sequence[int] = DEFAULT_SHOTS,
                       seeds: Sequence[int] = DEFAULT_SEEDS,
                       l2_reg: float = DEFAULT_L2_REG,
                       l2_regs: Optional[Sequence[float]] = None,
                       val_per_class: int = 5,
                       num_classes: Optional[int] = None,
                       class_names=None) -> Dict[int, list]:
  """Per-seed k-shot accuracies from precomputed features.

  Args:
    train_x: pool of training features [N, D].
    train_y: their labels [N].
    test_x: test features [M, D].
    test_y: test labels [M].
    shots: the k values.
    seeds: one draw of k images per class for each seed.
    l2_reg: fixed ridge strength (when `l2_regs` is None).
    l2_regs: if given, the l2 of each draw is the one of these with the best
      accuracy on `val_per_class` further pool images per class.
    val_per_class: held-out pool images per class for choosing l2.
    num_classes: K (default from the labels).
    class_names: for error messages.

  Returns:
    {k: [accuracy of each seed]}.
  """
  train_y, test_y = _int_labels(train_y), _int_labels(test_y)
  if num_classes is None:
    num_classes = int(max(train_y.max(), test_y.max())) + 1
  extra = val_per_class if l2_regs else 0
  check_shots(train_y, shots, num_classes, extra_per_class=extra,
              class_names=class_names)
  by_class = [np.flatnonzero(train_y == c) for c in range(num_classes)]
  results = {int(k): [] for k in shots}
  for seed in seeds:
    rng = np.random.default_rng(seed)
    order = [rng.permutation(idx) for idx in by_class]
    for k in shots:
      idx = np.concatenate([o[:k] for o in order])
      probe = _Probe(train_x[idx], train_y[idx], num_classes)
      l2 = l2_reg
      if l2_regs:
        val = np.concatenate([o[k:k + val_per_class] for o in order])
        val_acc = [probe.accuracy(train_x[val], train_y[val], r)
                   for r in l2_regs]
        l2 = l2_regs[int(np.argmax(val_acc))]
      results[int(k)].append(probe.accuracy(test_x, test_y, l2))
  return results


# --------------------------------------------------------------- data


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
  config.pp = ml_collections.ConfigDict({'crop': int(image_size),
                                         'augment': 'none'})
  return config


def iter_split(dataset: str, split: str, *, image_size: int,
               batch_size: int = DEFAULT_BATCH_SIZE,
               data_dir: Optional[str] = None
               ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """One pass over a split with the evaluation preprocessing, in split order.

  Reads through `vit_jax.input_pipeline` (plain resize, [-1, 1]); every
  process reads the whole split (few-shot results must not depend on the
  number of hosts).

  Yields:
    (images float32 [n, H, W, 3], labels int64 [n]).
  """
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  devices = jax.local_device_count()
  batch = max(1, math.ceil(batch_size / devices)) * devices
  config = _pipeline_config(dataset, split, image_size, batch, data_dir)
  _, ds = input_pipeline.get_datasets(config, process_index=0,
                                      process_count=1)
  for b in ds.as_numpy_iterator():
    keep = b['mask'].reshape(-1) > 0
    images = b['image'].reshape(-1, *b['image'].shape[-3:])[keep]
    labels = np.argmax(b['label'].reshape(-1, b['label'].shape[-1]),
                       axis=-1)[keep]
    if len(labels):
      yield images, labels


def _capped(batches, *, num_classes, max_per_class=None, max_examples=None):
  """Keeps the first `max_per_class` per class / `max_examples` in total.

  A total cap also caps each class at ceil(max_examples / num_classes), so a
  split stored sorted by class (as embedded_mnist) still gives every class.
  """
  if max_examples is not None:
    balanced = -(-max_examples // num_classes)
    max_per_class = (balanced if max_per_class is None
                     else min(max_per_class, balanced))
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


def load_split(dataset: str, split: str, *, image_size: int,
               max_per_class: Optional[int] = None,
               max_examples: Optional[int] = None,
               batch_size: int = DEFAULT_BATCH_SIZE,
               data_dir: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
  """Images and labels of a split in memory (first ones, if capped).

  Returns:
    (images float32 [N, H, W, 3] in [-1, 1], labels int64 [N]).
  """
  info = dataset_info(dataset, split, data_dir)
  parts = list(_capped(
      iter_split(dataset, split, image_size=image_size,
                 batch_size=batch_size, data_dir=data_dir),
      num_classes=info['num_classes'], max_per_class=max_per_class,
      max_examples=max_examples))
  if not parts:
    raise ValueError(f'{dataset} split {split!r} yielded no examples.')
  return (np.concatenate([p[0] for p in parts]),
          np.concatenate([p[1] for p in parts]))


def dataset_info(dataset: str, split: str, data_dir=None) -> dict:
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.get_dataset_info(dataset, split, data_dir=data_dir)


# ------------------------------------------------------------ evaluate


def _default_image_size(model, params):
  size = trained_model.image_size_from_params(model, params)
  if size is None:
    raise ValueError('Cannot infer the image size from the position '
                     'embedding; pass image_size.')
  return size


def evaluate(model, params: Params,
             dataset_name_or_arrays: Union[str, Sequence, Dict[str, Any]], *,
             shots: Sequence[int] = DEFAULT_SHOTS,
             seeds: Sequence[int] = DEFAULT_SEEDS,
             l2_reg: float = DEFAULT_L2_REG,
             l2_regs: Optional[Sequence[float]] = None,
             image_size: Optional[int] = None,
             train_split: str = 'train', test_split: str = 'test',
             max_per_class: Optional[int] = None,
             max_test_examples: Optional[int] = None,
             batch_size: int = DEFAULT_BATCH_SIZE,
             data_dir: Optional[str] = None,
             return_per_seed: bool = False) -> Dict[int, Any]:
  """Few-shot linear evaluation of a model's frozen representation.

  Args:
    model: a VisionTransformer.
    params: its parameters (unreplicated).
    dataset_name_or_arrays: a dataset name for `vit_jax.input_pipeline`
      ('embedded_mnist', a TFDS name, an image folder), or arrays: a tuple
      `(train_images, train_labels, test_images, test_labels)` or a dict with
      those keys; images float32 [N, H, W, 3] in [-1, 1] at the model's size.
    shots: k values.
    seeds: draws per k (accuracies are averaged over them).
    l2_reg: ridge strength; see the module docstring.
    l2_regs: optional sweep to choose l2 per draw (see `fewshot_accuracies`).
    image_size: for dataset names; default from the position embedding.
    train_split: split the shots are drawn from.
    test_split: split accuracy is measured on.
    max_per_class: cap of the training pool per class (default: all).
    max_test_examples: cap of the test split (default: all): the first
      examples in split order, at most ceil(cap / classes) per class.
    batch_size: images per forward pass.
    data_dir: TFDS data directory.
    return_per_seed: return {k: [acc per seed]} instead of means.

  Returns:
    {k: mean accuracy over seeds}.
  """
  shots = tuple(int(k) for k in shots)
  feature_fn = make_feature_fn(model, batch_size)
  class_names = None
  if isinstance(dataset_name_or_arrays, str):
    dataset = dataset_name_or_arrays
    info = dataset_info(dataset, train_split, data_dir)
    num_classes, class_names = info['num_classes'], info.get('int2str')
    image_size = image_size or _default_image_size(model, params)

    def features_of(split, **caps):
      feats, labels = [], []
      for images, y in _capped(
          iter_split(dataset, split, image_size=image_size,
                     batch_size=batch_size, data_dir=data_dir),
          num_classes=num_classes, **caps):
        feats.append(feature_fn(params, images))
        labels.append(y)
      if not feats:
        raise ValueError(f'{dataset} split {split!r} yielded no examples.')
      return np.concatenate(feats), np.concatenate(labels)

    train_x, train_y = features_of(train_split, max_per_class=max_per_class)
    # Fail before the (longer) test pass if a class is short.
    check_shots(train_y, shots, num_classes, class_names=class_names,
                extra_per_class=5 if l2_regs else 0,
                where=f' in {dataset} split {train_split!r}' + (
                    f' with max_per_class={max_per_class}'
                    if max_per_class else ''))
    test_x, test_y = features_of(test_split, max_examples=max_test_examples)
  else:
    data = dataset_name_or_arrays
    if isinstance(data, dict):
      data = tuple(data[k] for k in ('train_images', 'train_labels',
                                     'test_images', 'test_labels'))
    if len(data) != 4:
      raise ValueError('Arrays must be (train_images, train_labels, '
                       'test_images, test_labels).')
    train_images, train_y, test_images, test_y = data
    train_y, test_y = _int_labels(train_y), _int_labels(test_y)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    check_shots(train_y, shots, num_classes,
                extra_per_class=5 if l2_regs else 0)
    train_x = feature_fn(params, train_images)
    test_x = feature_fn(params, test_images)
  per_seed = fewshot_accuracies(
      train_x, train_y, test_x, test_y, shots=shots, seeds=seeds,
      l2_reg=l2_reg, l2_regs=l2_regs, num_classes=num_classes,
      class_names=class_names)
  if return_per_seed:
    return per_seed
  return {k: float(np.mean(v)) for k, v in per_seed.items()}


# ------------------------------------------------------- during training


def _unreplicate_if_needed(params, reference_shapes):
  """Device 0's copy of pmap-replicated params (one extra leading axis)."""
  leaf = params['embedding']['kernel']
  ref = reference_shapes['embedding']['kernel'].shape
  if tuple(leaf.shape) == tuple(ref):
    return params
  if tuple(leaf.shape[1:]) == tuple(ref):
    return jax.tree_util.tree_map(lambda x: x[0], params)
  raise ValueError(f'embedding/kernel has shape {tuple(leaf.shape)}; the model '
                   f'expects {tuple(ref)}.')


def make_fewshot_evaluator(config, *, model=None
                           ) -> Callable[[Params], Dict[str, float]]:
  """A periodic few-shot evaluation for a training loop.

  Fields read (all under `config.fewshot` unless noted; defaults in brackets):
    dataset [config.dataset, else 'embedded_mnist'], train_split ['train'],
    test_split ['test'], shots [(1, 5, 10, 25)], seeds [(0, 1, 2)],
    l2_reg [2**10], image_size [config.pp.crop, else 224],
    max_per_class [None = all], max_test_examples [None = all],
    batch_size [config.batch_eval, else 256], and `config.tfds_data_dir`.
    `every_steps` is for the training loop (this function ignores it).

  Images are read once, at the first call, and kept in memory (N x H x W x 3
  float32: cap them with max_per_class / max_test_examples for big datasets);
  each call extracts features and fits the probes. Every process computes the
  same numbers on the full data.

  Args:
    config: the training ConfigDict.
    model: the VisionTransformer being trained (its head is ignored). Default:
      built from `config.model` (a dict of VisionTransformer fields, as the
      original's configs) or `config.model_name`.

  Returns:
    `evaluator(params) -> {'fewshot/{k}shot': mean accuracy}`; params may be
    pmap-replicated (device 0's copy is used).
  """
  fs = config.get('fewshot') or {}
  get = lambda key, default: (fs.get(key) if fs.get(key) is not None
                              else default)
  dataset = get('dataset', config.get('dataset') or 'embedded_mnist')
  image_size = get('image_size', None)
  if image_size is None:
    from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    height, width = input_pipeline.get_image_size(config)
    if height != width:
      raise ValueError(f'Few-shot evaluation uses square images; set '
                       f'config.fewshot.image_size (pp.crop is '
                       f'{height}x{width}).')
    image_size = height
  image_size = int(image_size)
  shots = tuple(int(k) for k in get('shots', DEFAULT_SHOTS))
  seeds = tuple(int(s) for s in get('seeds', DEFAULT_SEEDS))
  l2_reg = float(get('l2_reg', DEFAULT_L2_REG))
  batch_size = int(get('batch_size', config.get('batch_eval') or
                       DEFAULT_BATCH_SIZE))
  train_split = get('train_split', 'train')
  test_split = get('test_split', 'test')
  max_per_class = get('max_per_class', None)
  max_test = get('max_test_examples', None)
  data_dir = config.get('tfds_data_dir')
  if model is None:
    if config.get('model') is not None:
      fields = {k: v for k, v in config.model.items() if k != 'num_classes'}
      model = models.VisionTransformer(num_classes=None, **fields)
    else:
      model = models.get_model(config.model_name)
  feature_fn = make_feature_fn(model, batch_size)
  reference = jax.eval_shape(lambda: _feature_model(model).init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)),
      train=False))['params']
  cache = {}

  def evaluator(params):
    if not cache:
      info = dataset_info(dataset, train_split, data_dir)
      cache['num_classes'] = info['num_classes']
      cache['train'] = load_split(dataset, train_split, image_size=image_size,
                                  max_per_class=max_per_class,
                                  batch_size=batch_size, data_dir=data_dir)
      check_shots(cache['train'][1], shots, info['num_classes'],
                  class_names=info.get('int2str'),
                  where=f' in {dataset} split {train_split!r}')
      cache['test'] = load_split(dataset, test_split, image_size=image_size,
                                 max_examples=max_test, batch_size=batch_size,
                                 data_dir=data_dir)
    params = _unreplicate_if_needed(params, reference)
    train_x = feature_fn(params, cache['train'][0])
    test_x = feature_fn(params, cache['test'][0])
    per_seed = fewshot_accuracies(
        train_x, cache['train'][1], test_x, cache['test'][1], shots=shots,
        seeds=seeds, l2_reg=l2_reg, num_classes=cache['num_classes'])
    return {f'fewshot/{k}shot': float(np.mean(v)) for k, v in per_seed.items()}

  return evaluator


# ---------------------------------------------------------------- main


def _parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m vit_jax.evaluation.fewshot',
      description='Few-shot linear evaluation of a ViT checkpoint.')
  parser.add_argument('--model', required=True, help='zoo name, e.g. ViT-B_16')
  parser.add_argument('--checkpoint', default=None,
                      help='.npz checkpoint; omitted = random initialisation')
  parser.add_argument('--dataset', default='embedded_mnist',
                      help='embedded_mnist | TFDS name | image folder')
  parser.add_argument('--shots', default='1,5,10,25',
                      help='comma-separated k values')
  parser.add_argument('--seeds', type=int, default=3,
                      help='number of draws per k (seeds 0..N-1)')
  parser.add_argument('--l2-reg', type=float, default=DEFAULT_L2_REG)
  parser.add_argument('--select-l2', action='store_true',
                      help='choose l2 per draw from 2^-10..2^20 on held-out '
                           'pool images')
  parser.add_argument('--image-size', type=int, default=None,
                      help='default: from the checkpoint position embedding')
  parser.add_argument('--train-split', default='train')
  parser.add_argument('--test-split', default='test')
  parser.add_argument('--max-per-class', type=int, default=None)
  parser.add_argument('--max-test-examples', type=int, default=None,
                      help='first N test images, balanced over classes')
  parser.add_argument('--batch-size', type=int, default=DEFAULT_BATCH_SIZE)
  parser.add_argument('--data-dir', default=None, help='TFDS data dir')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = _parse_args(argv)
  try:
    shots = [int(k) for k in args.shots.split(',') if k.strip()]
    if args.checkpoint:
      model, params = trained_model.load_model(args.model, args.checkpoint)
      image_size = (args.image_size or
                    trained_model.image_size_from_params(model, params))
      if image_size is None:
        raise ValueError('Cannot infer the image size from the checkpoint; '
                         'pass --image-size.')
      trained_model.check_params_fit(model, params, image_size)
    else:
      model = models.get_model(args.model)
      image_size = args.image_size or 224
      params = jax.jit(lambda: model.init(
          jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)),
          train=False)['params'])()
    start = time.time()
    result = evaluate(
        model, params, args.dataset, shots=shots, seeds=range(args.seeds),
        l2_reg=args.l2_reg, l2_regs=L2_REG_SWEEP if args.select_l2 else None,
        image_size=image_size, train_split=args.train_split,
        test_split=args.test_split, max_per_class=args.max_per_class,
        max_test_examples=args.max_test_examples, batch_size=args.batch_size,
        data_dir=args.data_dir, return_per_seed=True)
  except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'{args.model} on {args.dataset} ({args.test_split}), '
        f'{args.seeds} seed(s), {time.time() - start:.1f}s:')
  for k, accs in result.items():
    print(f'  {k:3d}-shot accuracy: {np.mean(accs):.4f} '
          f'+- {np.std(accs):.4f}')
  return 0


if __name__ == '__main__':
  sys.exit(main())

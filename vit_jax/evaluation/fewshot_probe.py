"""The linear few-shot solver: k-shot accuracies from precomputed features.

Paper Sec. 4.1 and Appendix B.3; the regression follows big_vision's
few-shot evaluator: features standardised on the k-shot training set, a
constant bias feature `BIAS_FEATURE` appended (so the bias is all but
unregularised), targets 2 * one_hot - 1, W = (X^T X + l2 I)^-1 X^T Y in
closed form; l2 = 2^10, or picked per draw from `l2_regs` on held-out pool
images. A seed's k images are the first k of one permutation per class, so
its 1-shot set is inside its 5-shot set.
"""

from typing import Dict, Optional, Sequence

import numpy as np

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_L2_REG = 2.0**10
L2_REG_SWEEP = tuple(2.0**k for k in range(-10, 21, 2))
BIAS_FEATURE = 100.0

# ------------------------------------------------------- the regression


class _RidgeSolver:
  """Closed-form ridge regression for many l2 values from one eigh.

  Decomposes X^T X, or X X^T when N < D (the push-through identity gives
  the same W).
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


def int_labels(y) -> np.ndarray:
  """Integer labels [N] from integer labels [N] or one-hot labels [N, K]."""
  y = np.asarray(y)
  return np.argmax(y, axis=-1) if y.ndim == 2 else y.astype(np.int64)


def linear_probe(train_x: np.ndarray,
                 train_y: np.ndarray,
                 test_x: np.ndarray,
                 test_y: np.ndarray,
                 *,
                 l2_reg: float = DEFAULT_L2_REG,
                 num_classes: Optional[int] = None) -> float:
  """Test accuracy of the closed-form regularised least-squares probe.

  Labels are integers [N] or one-hot [N, K]; `l2_reg` > 0 acts on
  standardised features; `num_classes` defaults to 1 + the largest label.
  """
  train_y, test_y = int_labels(train_y), int_labels(test_y)
  if num_classes is None:
    num_classes = int(max(train_y.max(), test_y.max())) + 1
  return _Probe(train_x, train_y, num_classes).accuracy(test_x, test_y, l2_reg)


# ---------------------------------------------------------- k-shot draws


def _class_name(names, c):
  return f'{c} ({names[c]!r})' if names is not None and str(
      names[c]) != str(c) else f'{c}'


def check_shots(labels: np.ndarray,
                shots: Sequence[int],
                num_classes: int,
                *,
                extra_per_class: int = 0,
                class_names=None,
                where: str = ''):
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
              f'{", ".join(str(s) for s in short[:5])})'
              if len(short) > 1 else '')
      extra = (f' + {extra_per_class} held out for choosing l2_reg'
               if extra_per_class else '')
      raise ValueError(
          f'{k}-shot evaluation needs {need} training images{extra} of class '
          f'{_class_name(class_names, c)}, but only {counts[c]} are available'
          f'{where}{more}. Use fewer shots, or a larger pool '
          '(max_per_class / train split).')


def fewshot_accuracies(train_x,
                       train_y,
                       test_x,
                       test_y,
                       *,
                       shots: Sequence[int] = DEFAULT_SHOTS,
                       seeds: Sequence[int] = DEFAULT_SEEDS,
                       l2_reg: float = DEFAULT_L2_REG,
                       l2_regs: Optional[Sequence[float]] = None,
                       val_per_class: int = 5,
                       num_classes: Optional[int] = None,
                       class_names=None) -> Dict[int, list]:
  """Per-seed k-shot accuracies from precomputed features: {k: [accuracy]}.

  Each seed draws k training examples per class from the pool
  (`train_x`, `train_y`). With `l2_regs`, each draw takes the l2 of best
  accuracy on `val_per_class` further pool examples per class; otherwise
  `l2_reg`. `class_names` are for error messages.
  """
  train_y, test_y = int_labels(train_y), int_labels(test_y)
  if num_classes is None:
    num_classes = int(max(train_y.max(), test_y.max())) + 1
  extra = val_per_class if l2_regs else 0
  check_shots(
      train_y,
      shots,
      num_classes,
      extra_per_class=extra,
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
        val_acc = [
            probe.accuracy(train_x[val], train_y[val], r) for r in l2_regs
        ]
        l2 = l2_regs[int(np.argmax(val_acc))]
      results[int(k)].append(probe.accuracy(test_x, test_y, l2))
  return results

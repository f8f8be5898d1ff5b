"""The linear few-shot solver: k-shot accuracies from precomputed features.

Paper Sec. 4.1 / Appendix B.3 (SPEC section 7): fit a regularised
least-squares regression from frozen features to {-1, 1}^K targets in closed
form on `k` training images per class and report test accuracy, averaged over
several random draws of the k images (seeds).

Choices, stated:
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
  * Shots are drawn per seed from the pool of training features given. The k
    images of a seed are the first k of one permutation, so a seed's 1-shot
    set is inside its 5-shot set.

Use `fewshot_accuracies(train_x, train_y, test_x, test_y, shots=..., seeds=...)`
for {k: [accuracy per seed]}, `linear_probe` for one probe on given training
features, `fit_ridge` for the bare closed form. Features come from
`vit_jax.evaluation.features`; `vit_jax.evaluation.fewshot` runs the whole
evaluation of a model.
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


def int_labels(y) -> np.ndarray:
  """Integer labels [N] from integer labels [N] or one-hot labels [N, K]."""
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
  train_y, test_y = int_labels(train_y), int_labels(test_y)
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
  train_y, test_y = int_labels(train_y), int_labels(test_y)
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

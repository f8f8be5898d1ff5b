"""The original's data parallelism as a runner, and evaluation on any runner.

`PmapRunner` holds a full copy of the train state on every local device and
runs the pmapped step of `vit_jax.train.make_update_fn`;
`vit_jax.parallel.sharding.FsdpRunner` has the same methods for the sharded
step. `evaluate` and `confusion_matrix` take either runner.
"""

from typing import Any, Callable, Optional

import flax.jax_utils
import jax
import numpy as np

from vit_jax import input_pipeline
from vit_jax.training import objectives

# The pmap axis; gradients, losses and eval counts are reduced over it.
AXIS = 'batch'


def first_replica(x_repl) -> np.ndarray:
  """The first local replica of a pmapped array, as numpy.

  Unlike `x[0]`, this compiles no slice per shape.
  """
  return np.asarray(x_repl.addressable_shards[0].data)[0]


def make_eval_fn(
    apply_fn: Callable[..., Any],
    *,
    counts_fn: Optional[Callable[..., Any]] = None) -> Callable[..., Any]:
  """Returns the pmapped `eval_fn(params, batch) -> (correct, count)`.

  Both are summed over all devices of all processes; `counts_fn` (default:
  `objectives.top1_counts(apply_fn)`) gives one device's counts.
  """
  counts_fn = counts_fn or objectives.top1_counts(apply_fn)

  def eval_fn(params, batch):
    correct, count = counts_fn(params, batch)
    return jax.lax.psum(correct, AXIS), jax.lax.psum(count, AXIS)

  return jax.pmap(eval_fn, axis_name=AXIS)


class PmapRunner:
  """The original's data parallelism: replicated state and a pmapped step.

  `update_fn` is `train.make_update_fn`'s step. `sharding.FsdpRunner` has
  the same methods; `train.train_and_evaluate` only uses this interface.
  """

  def __init__(self,
               *,
               update_fn,
               counts_fn,
               n_prefetch: int,
               confusion_fn=None):
    self.devices = jax.local_device_count()
    self._update = update_fn
    self._eval = make_eval_fn(None, counts_fn=counts_fn)
    self._confusion = confusion_fn and jax.pmap(
        lambda p, b: jax.lax.psum(confusion_fn(p, b), AXIS), axis_name=AXIS)
    self._n_prefetch = n_prefetch

  def place(self, params, opt_state):
    """Replicates host state, named with the pmap axis so the step compiles
    once."""
    return flax.jax_utils.replicate((params, opt_state), axis_name=AXIS)

  def batches(self, dataset):
    return input_pipeline.prefetch(dataset, self._n_prefetch)

  def step(self, params, opt_state, batch, key):
    """One update; returns (params, opt_state, loss on the devices)."""
    rng = np.broadcast_to(key, (self.devices,) + np.shape(key))
    return self._update(params, opt_state, batch, rng)[:3]

  def scalar(self, x) -> float:
    return float(first_replica(x))

  def to_host(self, tree):
    return jax.tree_util.tree_map(first_replica, tree)

  def saved_state(self, tree):
    """One replica of `tree` as numpy, the layout every runner restores."""
    return self.to_host(tree)

  def restore_template(self, state):
    """`state` itself: read whole by each process, replicated by `place`."""
    return state

  def eval_params(self, params):
    return params

  def counts(self, params, batch):
    correct, count = self._eval(params, batch)
    return self.scalar(correct), self.scalar(count)

  def confusion(self, params, batch) -> np.ndarray:
    """The batch's confusion matrix summed over all devices."""
    return first_replica(self._confusion(params, batch))


def evaluate(runner, params, ds_test) -> float:
  """Accuracy over one pass of `ds_test` (each example counted once)."""
  correct = count = 0.
  for batch in runner.batches(ds_test):
    c, n = runner.counts(params, batch)
    correct += c
    count += n
  if not count:
    raise ValueError('The test split is empty; check --config.test_split.')
  return correct / count


def confusion_matrix(runner, params, ds_test) -> np.ndarray:
  """[classes, classes] int64 counts over one pass of `ds_test`."""
  total = None
  for batch in runner.batches(ds_test):
    m = np.rint(runner.confusion(params, batch)).astype(np.int64)
    total = m if total is None else total + m
  return total


def confusion_accuracy(matrix: np.ndarray) -> float:
  """Top-1 accuracy of a confusion matrix of one-hot labels (its trace)."""
  total = int(matrix.sum()) if matrix is not None else 0
  if not total:
    raise ValueError('The test split is empty; check --config.test_split.')
  return int(np.trace(matrix)) / total

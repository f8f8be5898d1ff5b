"""The jitted train and eval steps of sharded (FSDP-style) training.

`make_sharded_update_fn` is `train.make_update_fn` without pmap: one `jax.jit`
over a `device_mesh` mesh, taking state placed by `sharding.fsdp_shardings`
and a global batch from `sharding.shard_batch`. `make_sharded_eval_fn` counts
top-1 hits on such a batch. `sharding.FsdpRunner` drives both.
"""

from typing import Any, Callable, Optional, Tuple, Union

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import optax

from vit_jax import utils
from vit_jax.parallel import device_mesh
from vit_jax.training import objectives
from vit_jax.training import trainable

PyTree = Any
# A mesh axis name, or a tuple of them (`device_mesh.batch_axes`).
Axes = Union[str, Tuple[str, ...]]


def make_sharded_update_fn(*,
                           loss_fn: Callable[..., Any],
                           tx: optax.GradientTransformation,
                           mesh: Mesh,
                           param_shardings: PyTree,
                           opt_shardings: PyTree,
                           accum_steps: int = 1,
                           axis_name: Optional[str] = None,
                           trainable_mask: Any = None) -> Callable[..., Any]:
  """Returns the jitted, sharded update step (the pmap-free `make_update_fn`).

  Loss, global-batch mean and accumulation match `train.make_update_fn`:
  micro-batch `i` is slice `i` of every device's examples, as under pmap.
  Dropout differs: one key draws the masks of the whole global batch (with
  `jax_threefry_partitionable`, independent of the device count), where pmap
  folds in the device index.

  Args:
    loss_fn: `(params, images, labels, rng) -> loss`, e.g.
      `objectives.classification_loss_fn(model.apply, 'softmax_xent')`.
    tx: the optimizer.
    mesh: the mesh (`device_mesh`).
    param_shardings: shardings of the parameters (`sharding.fsdp_shardings`).
    opt_shardings: shardings of `tx.init(params)`.
    accum_steps: micro-batches per device batch (0 or 1: none).
    axis_name: the batch axis (default: every axis of the mesh).
    trainable_mask: as in `train.make_update_fn`.

  Returns:
    `update_fn(params, opt_state, batch, rng) -> (params, opt_state, loss,
    new_rng)` on a global batch and one key. State must come in with the
    given shardings and is donated; the loss is the global-batch mean.
  """
  axis = device_mesh.batch_axes(mesh, axis_name)
  accum_steps = max(int(accum_steps or 1), 1)
  batch_sharding = NamedSharding(mesh, P(axis))
  replicated = NamedSharding(mesh, P())
  update_fn = _update_fn(
      loss_fn=loss_fn,
      tx=tx,
      mesh=mesh,
      axis=axis,
      accum_steps=accum_steps,
      trainable_mask=trainable_mask)
  return jax.jit(
      update_fn,
      in_shardings=(param_shardings, opt_shardings, batch_sharding, replicated),
      out_shardings=(param_shardings, opt_shardings, replicated, replicated),
      donate_argnums=(0, 1))


def _update_fn(*, loss_fn: Callable[..., Any], tx: optax.GradientTransformation,
               mesh: Mesh, axis: Axes, accum_steps: int,
               trainable_mask: Any) -> Callable[..., Any]:
  """The step `make_sharded_update_fn` jits, on global arrays."""
  num_shards = device_mesh.axis_size(mesh, axis)

  def update_fn(params, opt_state, batch, rng):
    _, new_rng = jax.random.split(rng)
    images, labels = batch['image'], batch['label']
    global_batch = images.shape[0]
    if global_batch % (num_shards * accum_steps):
      raise ValueError(
          f'The global batch {global_batch} is not divisible by {num_shards} '
          f'devices x accum_steps={accum_steps}; choose a batch that is a '
          f'multiple of {num_shards * accum_steps}.')

    train_part, _, merge = trainable.partition(params, trainable_mask)

    def loss_wrt(train_part, images, labels):
      return loss_fn(merge(train_part), images, labels, rng)

    loss_and_grad = jax.value_and_grad(loss_wrt)
    if accum_steps == 1:
      l, g = loss_and_grad(train_part, images, labels)
    else:
      l, g = _accumulate(
          loss_and_grad,
          train_part,
          images,
          labels,
          mesh=mesh,
          axis=axis,
          accum_steps=accum_steps)
    updates, opt_state = tx.update(g, opt_state, train_part)
    params = merge(optax.apply_updates(train_part, updates))
    return params, opt_state, l, new_rng

  return update_fn


def _accumulate(loss_and_grad: Callable[..., Any], train_part: PyTree, images,
                labels, *, mesh: Mesh, axis: Axes, accum_steps: int):
  """(loss, grad) over `accum_steps` micro-batches cut as pmap cuts them."""
  num_shards = device_mesh.axis_size(mesh, axis)
  batch_sharding = NamedSharding(mesh, P(axis))

  # [D * A * s] -> [A, D, s]: each device's examples cut into A slices, as
  # pmap's per-device accumulation does; the device axis stays split, so no
  # data moves.
  def by_slice(x):
    x = x.reshape((num_shards, accum_steps, -1) + x.shape[1:])
    return jax.lax.with_sharding_constraint(
        x.swapaxes(0, 1), NamedSharding(mesh, P(None, axis)))

  def micro_step(train_part, images_1xDxS, labels_1xDxS):
    flat = lambda x: jax.lax.with_sharding_constraint(
        x.reshape((-1,) + x.shape[3:]), batch_sharding)
    return loss_and_grad(train_part, flat(images_1xDxS), flat(labels_1xDxS))

  return utils.accumulate_gradient(micro_step, train_part, by_slice(images),
                                   by_slice(labels), accum_steps)


def make_sharded_eval_fn(
    *,
    apply_fn: Callable[..., Any],
    mesh: Mesh,
    param_shardings: PyTree,
    axis_name: Optional[str] = None,
    counts_fn: Optional[Callable[..., Any]] = None) -> Callable[..., Any]:
  """Returns the jitted `eval_fn(params, batch) -> (correct, count)`.

  As `runners.make_eval_fn`, counted over a global batch (`counts_fn`,
  default `objectives.top1_counts`, honours `batch['mask']`).
  """
  axis = device_mesh.batch_axes(mesh, axis_name)
  replicated = NamedSharding(mesh, P())
  counts_fn = counts_fn or objectives.top1_counts(apply_fn)
  return jax.jit(
      counts_fn,
      in_shardings=(param_shardings, NamedSharding(mesh, P(axis))),
      out_shardings=(replicated, replicated))

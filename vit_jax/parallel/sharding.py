"""Sharded (FSDP-style) training under jit, for models bigger than a device.

The alternative to `train.make_update_fn`'s `jax.pmap`, after big_vision: one
`jax.jit` over a `device_mesh` mesh (1-D `data`, or 2-D `data` x `fsdp`).
The global batch is split over every device; each large parameter (and its
optimizer state) is split along its largest divisible dimension over the
parameter axis and replicated over the others; XLA's SPMD partitioner inserts
the all-gathers and reduce-scatters. The update has the semantics of
`train.make_update_fn` (dropout aside, see `sharded_step`).

This module places parameters, optimizer state and batches, and holds
`FsdpRunner`, the train loop's interface; `sharded_step` has the jitted steps.
"""

from typing import Any, Mapping, Optional, Sequence

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from vit_jax.parallel import device_mesh
from vit_jax.parallel import sharded_step
from vit_jax.training import trainable

# Leaves with fewer elements stay replicated: biases, LayerNorm and scalars
# cost more in per-leaf collectives than they save in memory. 2**16 float32
# is 256 KiB; every weight matrix of ViT-B and larger is above it.
MIN_SHARD_SIZE = 2**16

PyTree = Any

# ------------------------------------------------------- parameter layout


def fsdp_partition_spec(shape: Sequence[int],
                        num_shards: int,
                        *,
                        axis_name: str = device_mesh.DATA_AXIS,
                        min_size: int = MIN_SHARD_SIZE) -> P:
  """Where a leaf of `shape` is split over `num_shards` devices.

  The largest dimension that `num_shards` divides is split along `axis_name`
  (the earlier of equal sizes); the leaf is replicated (`P()`) when it has
  fewer than `min_size` elements or no dimension divides.
  """
  shape = tuple(int(n) for n in shape)
  if num_shards == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  # Stable sort: of equal sizes the earlier dimension wins.
  for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[dim] % num_shards == 0:
      return P(*([None] * dim + [axis_name]))
  return P()


def fsdp_shardings(params_or_shapes: PyTree,
                   mesh: Mesh,
                   *,
                   axis_name: Optional[str] = None,
                   min_size: int = MIN_SHARD_SIZE) -> PyTree:
  """A pytree of `NamedSharding`s, one per leaf by `fsdp_partition_spec`.

  The rule depends only on shapes, so optimizer state (pass
  `jax.eval_shape(tx.init, params)`) is split like its parameters. `axis_name`
  defaults to `device_mesh.fsdp_axis(mesh)`; other axes are replicated.
  """
  axis = device_mesh.fsdp_axis(mesh, axis_name)
  num_shards = mesh.shape[axis]
  return jax.tree_util.tree_map(
      lambda x: NamedSharding(
          mesh,
          fsdp_partition_spec(
              np.shape(x), num_shards, axis_name=axis, min_size=min_size)),
      params_or_shapes)


def shard_params(params: PyTree, shardings: PyTree) -> PyTree:
  """Places a pytree of arrays as `shardings` say; returns global arrays.

  Host leaves are cut on the host, so each device receives only its shard
  (every process must hold the same values); jax.Array leaves are resharded.
  """

  def put(x, sharding):
    if isinstance(x, jax.Array):
      return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  return jax.tree_util.tree_map(put, params, shardings)


# ------------------------------------------------------------------ batch


def shard_batch(batch: PyTree,
                mesh: Mesh,
                *,
                axis_name: Optional[str] = None,
                pmap_layout: Optional[bool] = None) -> PyTree:
  """This process's share of a batch as global `[global_batch, ...]` arrays.

  Leaves are `[local_devices, b, ...]` (`pmap_layout`; None infers it from
  the rank of `batch['image']`) or flat `[local_batch, ...]`; they are split
  over `axis_name` (default: every mesh axis). Raises ValueError when the
  layout cannot be told or the batch does not divide over the devices.
  """
  axes = device_mesh.batch_axes(mesh, axis_name)
  if pmap_layout is None:
    image = batch.get('image') if isinstance(batch, dict) else None
    if image is None or np.ndim(image) not in (4, 5):
      raise ValueError(
          'Cannot tell the batch layout: shard_batch infers it from '
          "batch['image'] of rank 5 ([devices, b, H, W, C]) or 4 ([b, H, W, "
          "C]); pass pmap_layout=True or False.")
    pmap_layout = np.ndim(image) == 5
  sharding = NamedSharding(mesh, P(axes))
  local_shards = len(mesh.local_devices)

  def put(x):
    x = np.asarray(x)
    if pmap_layout:
      if x.ndim < 2:
        raise ValueError(f'A leaf of shape {x.shape} has no [devices, b] axes; '
                         'pass pmap_layout=False for flat batches.')
      x = x.reshape((-1,) + x.shape[2:])
    if x.shape[0] % local_shards:
      raise ValueError(
          f'This process holds {x.shape[0]} examples, not divisible by its '
          f'{local_shards} devices on the mesh; make the batch a multiple '
          f'of {local_shards * jax.process_count()}.')
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree_util.tree_map(put, batch)


# ------------------------------------------------------------ train loop


def _host_scalar(x) -> float:
  """A replicated scalar as a float (also when other processes hold it)."""
  return float(np.asarray(x.addressable_shards[0].data))


class FsdpRunner:
  """`runners.PmapRunner`'s interface for `config.parallelism='fsdp'`.

  State is split along `fsdp` and replicated along `data` of a
  `device_mesh.make_data_fsdp_mesh` mesh; `mesh_sizes` ({'data', 'fsdp'})
  gives its sizes (default 1 x all devices). Checkpoints hold the same arrays
  as under pmap, written shard by shard, so runs resume under either.
  """

  def __init__(self,
               *,
               params,
               loss_fn,
               counts_fn,
               tx,
               accum_steps: int,
               trainable_mask,
               min_shard_size: int = MIN_SHARD_SIZE,
               confusion_fn=None,
               mesh_sizes: Optional[Mapping[str, int]] = None):
    mesh_sizes = mesh_sizes or {}
    self.mesh = device_mesh.make_data_fsdp_mesh(
        data=mesh_sizes.get('data', 1), fsdp=mesh_sizes.get('fsdp', -1))
    shapes = jax.eval_shape(lambda p: p, params)
    self.param_shardings = fsdp_shardings(
        shapes, self.mesh, min_size=min_shard_size)
    train_shapes = trainable.partition(shapes, trainable_mask)[0]
    self.opt_shardings = fsdp_shardings(
        jax.eval_shape(tx.init, train_shapes),
        self.mesh,
        min_size=min_shard_size)
    self._update = sharded_step.make_sharded_update_fn(
        loss_fn=loss_fn,
        tx=tx,
        mesh=self.mesh,
        param_shardings=self.param_shardings,
        opt_shardings=self.opt_shardings,
        accum_steps=accum_steps,
        trainable_mask=trainable_mask)
    self._eval = sharded_step.make_sharded_eval_fn(
        apply_fn=None,
        mesh=self.mesh,
        param_shardings=self.param_shardings,
        counts_fn=counts_fn)
    self._confusion = confusion_fn and jax.jit(
        confusion_fn,
        in_shardings=(self.param_shardings,
                      NamedSharding(self.mesh,
                                    P(device_mesh.batch_axes(self.mesh,
                                                             None)))),
        out_shardings=NamedSharding(self.mesh, P()))

  def place(self, params, opt_state):
    return (shard_params(params, self.param_shardings),
            shard_params(opt_state, self.opt_shardings))

  def batches(self, dataset):
    for batch in dataset.as_numpy_iterator():
      yield shard_batch(batch, self.mesh)

  def step(self, params, opt_state, batch, key):
    """One update; returns (params, opt_state, loss)."""
    if isinstance(batch.get('label'), np.ndarray):  # MPP's example indices
      batch = dict(
          batch,
          label=shard_batch({'label': batch['label']},
                            self.mesh,
                            pmap_layout=True)['label'])
    return self._update(params, opt_state, batch, key)[:3]

  def scalar(self, x) -> float:
    return _host_scalar(x)

  def to_host(self, tree):
    if all(x.is_fully_addressable for x in jax.tree_util.tree_leaves(tree)):
      return jax.device_get(tree)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(tree, tiled=True)

  def saved_state(self, tree):
    """What a checkpoint holds of `tree`: the sharded arrays themselves."""
    return tree

  def restore_template(self, state):
    """Shapes of `state` with this runner's shardings, to restore shards."""
    shardings = {
        'params': self.param_shardings,
        'opt_state': self.opt_shardings
    }
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
        state, shardings)

  def eval_params(self, params):
    return params

  def counts(self, params, batch):
    correct, count = self._eval(params, batch)
    return _host_scalar(correct), _host_scalar(count)

  def confusion(self, params, batch) -> np.ndarray:
    """The global batch's confusion matrix (`objectives.top1_confusion`)."""
    return np.asarray(self._confusion(params, batch).addressable_shards[0].data)

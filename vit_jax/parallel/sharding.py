"""Sharded (FSDP-style) training under jit, for models bigger than a device.

`train.make_update_fn` is the original's data parallelism: `jax.pmap` with a
full copy of the parameters and optimizer state on every device. This module
is the alternative of big_vision: one `jax.jit` over a `jax.sharding.Mesh`
(`device_mesh`), either 1-D (one axis `data`) or 2-D (`data` x `fsdp`),
where

  * the batch is one global array `[global_batch, H, W, C]` split over every
    device of the mesh, so every device computes the examples it holds;
  * every parameter (and the optimizer state that has its shape) is split
    along its largest dimension that the parameter axis divides (`fsdp` on
    the 2-D mesh, `data` on the 1-D one), and replicated when it is small or
    no dimension divides ("fully sharded data parallelism"): a device holds
    1/n of the train state, n the size of that axis. On the 2-D mesh each
    of the `data` rows holds such a sharded copy (hybrid sharding): n x 1 is
    plain data parallelism with replicated state, 1 x n the 1-D mesh's FSDP;
  * nothing is reduced by hand: XLA's SPMD partitioner all-gathers a
    parameter where the forward or backward pass needs it whole, and reduces
    the gradient of the global-mean loss onto the parameter's shards
    (reduce-scatter; XLA:CPU emits all-reduce and keeps its slice).

The update has the semantics of `train.make_update_fn` (same loss functions,
global-norm clipping over the whole gradient, same gradient accumulation), so
on a deterministic model both give the same parameters up to float rounding;
tests/test_sharding.py pins that on 8 devices. Dropout differs, see
`sharded_step.make_sharded_update_fn`.

The modules: `device_mesh` (the meshes and their axes), this one (where
parameters, optimizer state and batches are placed, and `FsdpRunner`, the
train loop's interface) and `sharded_step` (the jitted update and eval
steps).

Usage:

  mesh = device_mesh.make_data_fsdp_mesh(data=2, fsdp=-1)  # or make_mesh()
  param_shardings = sharding.fsdp_shardings(params, mesh)
  opt_shardings = sharding.fsdp_shardings(jax.eval_shape(tx.init, params), mesh)
  params = sharding.shard_params(params, param_shardings)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  update_fn = sharded_step.make_sharded_update_fn(
      apply_fn=model.apply, tx=tx, mesh=mesh, param_shardings=param_shardings,
      opt_shardings=opt_shardings, accum_steps=config.accum_steps)
  for batch in ds_train:  # input_pipeline layout [devices, b, ...]
    params, opt_state, loss, _ = update_fn(
        params, opt_state, sharding.shard_batch(batch, mesh), step_key)
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


def fsdp_partition_spec(shape: Sequence[int], num_shards: int, *,
                        axis_name: str = device_mesh.DATA_AXIS,
                        min_size: int = MIN_SHARD_SIZE) -> P:
  """Where a leaf of `shape` is split over `num_shards` devices (FSDP rule).

  The largest dimension that `num_shards` divides is split (the earlier one
  of equal sizes); the leaf is replicated when it has fewer than `min_size`
  elements or no dimension divides.

  Args:
    shape: the leaf's shape.
    num_shards: size of that axis.
    axis_name: the axis the parameters are split along.
    min_size: leaves with fewer elements are replicated.

  Returns:
    `PartitionSpec()` (replicated) or one naming `axis_name` at the split
    dimension.
  """
  shape = tuple(int(n) for n in shape)
  if num_shards == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  # Stable sort: of equal sizes the earlier dimension wins.
  for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[dim] % num_shards == 0:
      return P(*([None] * dim + [axis_name]))
  return P()


def fsdp_shardings(params_or_shapes: PyTree, mesh: Mesh, *,
                   axis_name: Optional[str] = None,
                   min_size: int = MIN_SHARD_SIZE) -> PyTree:
  """`NamedSharding`s that split each leaf as `fsdp_partition_spec` says.

  The rule depends only on the shape, so an optimizer state's buffers
  (momentum, Adam moments, whatever their dtype) are split exactly like
  their parameters: pass `jax.eval_shape(tx.init, params)` for them. Leaves
  are split along one axis (`device_mesh.fsdp_axis`) and replicated along
  the others: on a data x fsdp mesh every data row holds a full copy.

  Args:
    params_or_shapes: a pytree of arrays or of anything with `.shape`
      (`jax.ShapeDtypeStruct`).
    mesh: the mesh (`device_mesh.make_mesh` or `make_data_fsdp_mesh`).
    axis_name: the axis to split along (default: `fsdp` on a data x fsdp
      mesh, else the mesh's only axis).
    min_size: leaves with fewer elements are replicated.

  Returns:
    A pytree of `NamedSharding` with the structure of `params_or_shapes`.
  """
  axis = device_mesh.fsdp_axis(mesh, axis_name)
  num_shards = mesh.shape[axis]
  return jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, fsdp_partition_spec(
          np.shape(x), num_shards, axis_name=axis, min_size=min_size)),
      params_or_shapes)


def shard_params(params: PyTree, shardings: PyTree) -> PyTree:
  """Places a pytree (parameters or optimizer state) as `shardings` say.

  Host (numpy) leaves are cut on the host and each device receives only its
  shard, so a model bigger than one device can be loaded; every process must
  hold the same values (they do: `train.init_params` is seeded). jax.Array
  leaves are resharded with `jax.device_put`.

  Args:
    params: pytree of numpy or jax arrays.
    shardings: matching pytree of `jax.sharding.Sharding` (`fsdp_shardings`).

  Returns:
    The pytree of global `jax.Array`s.
  """

  def put(x, sharding):
    if isinstance(x, jax.Array):
      return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  return jax.tree_util.tree_map(put, params, shardings)


# ------------------------------------------------------------------ batch


def shard_batch(batch: PyTree, mesh: Mesh, *,
                axis_name: Optional[str] = None,
                pmap_layout: Optional[bool] = None) -> PyTree:
  """An input-pipeline batch as global arrays split along the batch axes.

  Each process passes its own share of the global batch, either in the
  layout of `input_pipeline.get_datasets` (`[local_devices, b, ...]`, the
  two leading axes are merged) or already flat (`[local_batch, ...]`). The
  result holds the processes' shares one after another: `[global_batch,
  ...]`, the `d`-th device of this process in mesh order (row by row on a
  2-D mesh) holding row block `d` of its share.

  Args:
    batch: pytree of host arrays, e.g. {'image', 'label', 'mask'}.
    mesh: the mesh (`device_mesh.make_mesh` or `make_data_fsdp_mesh`).
    axis_name: the axis to split along (default: every axis of the mesh,
      `device_mesh.batch_axes`).
    pmap_layout: whether leaves carry the leading device axis; None infers
      it from `batch['image']` (rank 5: yes, rank 4: no).

  Returns:
    The pytree of `jax.Array`s of shape `[global_batch, ...]`.
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
  """`runners.PmapRunner`'s interface for the sharded step
  (`config.parallelism='fsdp'`): a data x fsdp mesh over every device of
  every process (`device_mesh.make_data_fsdp_mesh`; `config.mesh`), the
  parameters and optimizer state split FSDP-style along `fsdp` and
  replicated along `data`, global batches split over both.

  Checkpoints are written shard by shard from the devices (each process
  writes what it holds; nothing is gathered) and hold the same arrays as
  under pmap, so a run resumes under either, on any number of devices.

  `min_shard_size` (`config.fsdp_min_shard_size`): leaves with fewer
  elements stay replicated, see `fsdp_partition_spec`. `mesh_sizes`
  (`config.mesh`): {'data': ..., 'fsdp': ...}, the sizes of
  `device_mesh.make_data_fsdp_mesh`; a missing size or None is its default
  (1 x every device: all of it FSDP).
  """

  def __init__(self, *, params, loss_fn, counts_fn, tx, accum_steps: int,
               trainable_mask, min_shard_size: int = MIN_SHARD_SIZE,
               confusion_fn=None,
               mesh_sizes: Optional[Mapping[str, int]] = None):
    mesh_sizes = mesh_sizes or {}
    self.mesh = device_mesh.make_data_fsdp_mesh(
        data=mesh_sizes.get('data', 1), fsdp=mesh_sizes.get('fsdp', -1))
    shapes = jax.eval_shape(lambda p: p, params)
    self.param_shardings = fsdp_shardings(shapes, self.mesh,
                                          min_size=min_shard_size)
    train_shapes = trainable.partition(shapes, trainable_mask)[0]
    self.opt_shardings = fsdp_shardings(jax.eval_shape(tx.init, train_shapes),
                                        self.mesh, min_size=min_shard_size)
    self._update = sharded_step.make_sharded_update_fn(
        apply_fn=None, tx=tx, mesh=self.mesh,
        param_shardings=self.param_shardings,
        opt_shardings=self.opt_shardings, accum_steps=accum_steps,
        loss_fn=loss_fn, trainable_mask=trainable_mask)
    self._eval = sharded_step.make_sharded_eval_fn(
        apply_fn=None, mesh=self.mesh, param_shardings=self.param_shardings,
        counts_fn=counts_fn)
    self._confusion = confusion_fn and jax.jit(
        confusion_fn,
        in_shardings=(self.param_shardings, NamedSharding(
            self.mesh, P(device_mesh.batch_axes(self.mesh, None)))),
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
      batch = dict(batch, label=shard_batch(
          {'label': batch['label']}, self.mesh, pmap_layout=True)['label'])
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
    """The restore template of a host `state` ({'params', 'opt_state'}):
    shapes and dtypes with this runner's shardings, so that each process
    reads only its shards."""
    shardings = {'params': self.param_shardings,
                 'opt_state': self.opt_shardings}
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
    return np.asarray(self._confusion(params, batch).addressable_shards[0]
                      .data)

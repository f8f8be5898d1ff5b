"""Sharded (FSDP-style) training under jit, for models bigger than a device.

`train.make_update_fn` is the original's data parallelism: `jax.pmap` with a
full copy of the parameters and optimizer state on every device. This module
is the alternative of big_vision: one `jax.jit` over a `jax.sharding.Mesh`
with a single data axis, where

  * the batch is one global array `[global_batch, H, W, C]` split along the
    data axis, so every device computes the examples it holds;
  * every parameter (and the optimizer state that has its shape) is split
    along its largest dimension that the data axis divides, and replicated
    when it is small or no dimension divides ("fully sharded data
    parallelism"): a device holds 1/n of the train state;
  * nothing is reduced by hand: XLA's SPMD partitioner all-gathers a
    parameter where the forward or backward pass needs it whole, and reduces
    the gradient of the global-mean loss onto the parameter's shards
    (reduce-scatter; XLA:CPU emits all-reduce and keeps its slice).

The update has the semantics of `train.make_update_fn` (same loss functions,
global-norm clipping over the whole gradient, same gradient accumulation), so
on a deterministic model both give the same parameters up to float rounding;
tests/test_sharding.py pins that on 8 devices. Dropout differs, see
`make_sharded_update_fn`.

Usage:

  mesh = sharding.make_mesh()
  param_shardings = sharding.fsdp_shardings(params, mesh)
  opt_shardings = sharding.fsdp_shardings(jax.eval_shape(tx.init, params), mesh)
  params = sharding.shard_params(params, param_shardings)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  update_fn = sharding.make_sharded_update_fn(
      apply_fn=model.apply, tx=tx, mesh=mesh, param_shardings=param_shardings,
      opt_shardings=opt_shardings, accum_steps=config.accum_steps)
  for batch in ds_train:  # input_pipeline layout [devices, b, ...]
    params, opt_state, loss, _ = update_fn(
        params, opt_state, sharding.shard_batch(batch, mesh), step_key)
"""

from typing import Any, Callable, Optional, Sequence

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from vit_jax import utils
from vit_jax.training import objectives
from vit_jax.training import trainable

# The mesh axis the batch and the parameters are split along.
DATA_AXIS = 'data'
# Leaves with fewer elements stay replicated: biases, LayerNorm and scalars
# cost more in per-leaf collectives than they save in memory. 2**16 float32
# is 256 KiB; every weight matrix of ViT-B and larger is above it.
MIN_SHARD_SIZE = 2**16

PyTree = Any


# -------------------------------------------------------------------- mesh


def make_mesh(devices: Optional[Sequence[jax.Device]] = None,
              axis_name: str = DATA_AXIS) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process).

  `shard_batch` gives each device of the mesh one row block of the global
  batch; with the default (`jax.devices()`, which on one host is
  `jax.local_devices()`) row `d` of an input-pipeline batch
  `[local_devices, b, ...]` lands on the same device as under pmap.

  Args:
    devices: the devices, in mesh order.
    axis_name: the name of the data axis.

  Returns:
    A `Mesh` with one axis `axis_name` of size `len(devices)`.
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError('make_mesh got no devices; pass None for all of them.')
  return Mesh(np.asarray(devices, dtype=object).reshape(-1), (axis_name,))


def _axis(mesh: Mesh, axis_name: Optional[str]) -> str:
  """`axis_name`, or the mesh's only axis; checks that the mesh has it."""
  if axis_name is None:
    if len(mesh.axis_names) != 1:
      raise ValueError(
          f'The mesh has axes {mesh.axis_names}; pass axis_name= to say which '
          'one is the data axis.')
    return mesh.axis_names[0]
  if axis_name not in mesh.axis_names:
    raise ValueError(f'The mesh has no axis {axis_name!r} (axes: '
                     f'{mesh.axis_names}); pass one of them as axis_name=.')
  return axis_name


# ------------------------------------------------------- parameter layout


def fsdp_partition_spec(shape: Sequence[int], num_shards: int, *,
                        axis_name: str = DATA_AXIS,
                        min_size: int = MIN_SHARD_SIZE) -> P:
  """Where a leaf of `shape` is split over `num_shards` devices (FSDP rule).

  The largest dimension that `num_shards` divides is split (the earlier one
  of equal sizes); the leaf is replicated when it has fewer than `min_size`
  elements or no dimension divides.

  Args:
    shape: the leaf's shape.
    num_shards: size of the data axis.
    axis_name: the data axis.
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
  their parameters: pass `jax.eval_shape(tx.init, params)` for them.

  Args:
    params_or_shapes: a pytree of arrays or of anything with `.shape`
      (`jax.ShapeDtypeStruct`).
    mesh: the mesh (`make_mesh`).
    axis_name: the data axis (default: the mesh's only axis).
    min_size: leaves with fewer elements are replicated.

  Returns:
    A pytree of `NamedSharding` with the structure of `params_or_shapes`.
  """
  axis = _axis(mesh, axis_name)
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
  """An input-pipeline batch as global arrays split along the data axis.

  Each process passes its own share of the global batch, either in the
  layout of `input_pipeline.get_datasets` (`[local_devices, b, ...]`, the
  two leading axes are merged) or already flat (`[local_batch, ...]`). The
  result holds the processes' shares one after another: `[global_batch,
  ...]`, device `d` of this process holding row block `d`.

  Args:
    batch: pytree of host arrays, e.g. {'image', 'label', 'mask'}.
    mesh: the mesh (`make_mesh`).
    axis_name: the data axis (default: the mesh's only axis).
    pmap_layout: whether leaves carry the leading device axis; None infers
      it from `batch['image']` (rank 5: yes, rank 4: no).

  Returns:
    The pytree of `jax.Array`s of shape `[global_batch, ...]`.
  """
  axis = _axis(mesh, axis_name)
  if pmap_layout is None:
    image = batch.get('image') if isinstance(batch, dict) else None
    if image is None or np.ndim(image) not in (4, 5):
      raise ValueError(
          'Cannot tell the batch layout: shard_batch infers it from '
          "batch['image'] of rank 5 ([devices, b, H, W, C]) or 4 ([b, H, W, "
          "C]); pass pmap_layout=True or False.")
    pmap_layout = np.ndim(image) == 5
  sharding = NamedSharding(mesh, P(axis))
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


# -------------------------------------------------------- train/eval step


def make_sharded_update_fn(*, apply_fn: Callable[..., Any],
                           tx: optax.GradientTransformation,
                           mesh: Mesh,
                           param_shardings: PyTree,
                           opt_shardings: PyTree,
                           accum_steps: int = 1,
                           loss: str = 'softmax_xent',
                           axis_name: Optional[str] = None,
                           loss_fn: Optional[Callable[..., Any]] = None,
                           trainable_mask: Any = None
                          ) -> Callable[..., Any]:
  """Returns the jitted, sharded update step (the pmap-free `make_update_fn`).

  Same loss (`objectives.LOSSES`), same mean over the global batch, same
  accumulation as `train.make_update_fn`: each device's examples are cut
  into `accum_steps` equal slices, and micro-batch `i` is slice `i` of every
  device, so the same examples meet in a micro-batch as under pmap, and no
  example moves between devices.

  Dropout differs: pmap gives each device the key `fold_in(rng, device)`
  for its own examples; here one key `rng` draws the masks of the whole
  global batch. With `jax_threefry_partitionable` (on by default since JAX
  0.5) each device draws only its own part, without communication, and the
  masks do not depend on the number of devices or the mesh: a run is the
  same on 1 or 8 devices. As under pmap, every micro-batch of one step uses
  the same key.

  Args:
    apply_fn: the model's `apply`.
    tx: the optimizer.
    mesh: the mesh (`make_mesh`).
    param_shardings: pytree of shardings of the parameters (`fsdp_shardings`).
    opt_shardings: pytree of shardings of `tx.init(params)`.
    accum_steps: micro-batches per device batch (0 or 1: none).
    loss: a key of `objectives.LOSSES`.
    axis_name: the data axis (default: the mesh's only axis).
    loss_fn: instead of apply_fn and loss, `(params, images, labels, rng) ->
      loss` (`objectives.make_loss_fn`).
    trainable_mask: as in `train.make_update_fn`: only the True leaves train
      and `opt_state` (and `opt_shardings`) cover those alone.

  Returns:
    `update_fn(params, opt_state, batch, rng) -> (params, opt_state, loss,
    new_rng)`, with `batch = {'image': [global_batch, H, W, C], 'label':
    [global_batch, classes]}` (`shard_batch`) and one key `rng` (not one per
    device). The loss is the mean over the global batch; `new_rng` is
    `split(rng)[1]` as in `make_update_fn`. Parameters and optimizer state
    must come in with the shardings given here (`shard_params`; jit refuses
    jax.Arrays placed otherwise) and come back with them, so the step
    compiles once. They are donated: do not use the arrays passed in
    afterwards. Numpy batches and keys are placed on the fly.
  """
  loss_fn = loss_fn or objectives.classification_loss_fn(apply_fn, loss)
  axis = _axis(mesh, axis_name)
  num_shards = mesh.shape[axis]
  accum_steps = max(int(accum_steps or 1), 1)
  batch_sharding = NamedSharding(mesh, P(axis))
  replicated = NamedSharding(mesh, P())

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
      # [D * A * s] -> [A, D, s]: row block d (device d's examples) is cut
      # into A slices, as pmap's per-device accumulation does. Reshape and
      # transpose keep the device axis split, so no data moves. The array
      # handed to `utils.accumulate_gradient` has A "examples" (one slice of
      # every device each); it feeds them one at a time to `micro_step`.
      def by_slice(x):
        x = x.reshape((num_shards, accum_steps, -1) + x.shape[1:])
        return jax.lax.with_sharding_constraint(
            x.swapaxes(0, 1), NamedSharding(mesh, P(None, axis)))

      def micro_step(train_part, images_1xDxS, labels_1xDxS):
        flat = lambda x: jax.lax.with_sharding_constraint(
            x.reshape((-1,) + x.shape[3:]), batch_sharding)
        return loss_and_grad(train_part, flat(images_1xDxS),
                             flat(labels_1xDxS))

      l, g = utils.accumulate_gradient(micro_step, train_part,
                                       by_slice(images), by_slice(labels),
                                       accum_steps)
    updates, opt_state = tx.update(g, opt_state, train_part)
    params = merge(optax.apply_updates(train_part, updates))
    return params, opt_state, l, new_rng

  return jax.jit(
      update_fn,
      in_shardings=(param_shardings, opt_shardings, batch_sharding,
                    replicated),
      out_shardings=(param_shardings, opt_shardings, replicated, replicated),
      donate_argnums=(0, 1))


def make_sharded_eval_fn(*, apply_fn: Callable[..., Any], mesh: Mesh,
                         param_shardings: PyTree,
                         axis_name: Optional[str] = None,
                         counts_fn: Optional[Callable[..., Any]] = None
                        ) -> Callable[..., Any]:
  """Returns the jitted `eval_fn(params, batch) -> (correct, count)`.

  As `train.make_eval_fn`, on a global batch (`shard_batch`): both counts
  are over the global batch; `counts_fn` (default `objectives.top1_counts`)
  computes them, `batch['mask']` keeping padding examples out.
  """
  axis = _axis(mesh, axis_name)
  replicated = NamedSharding(mesh, P())
  counts_fn = counts_fn or objectives.top1_counts(apply_fn)
  return jax.jit(counts_fn,
                 in_shardings=(param_shardings, NamedSharding(mesh, P(axis))),
                 out_shardings=(replicated, replicated))


# ------------------------------------------------------------ train loop


def _host_scalar(x) -> float:
  """A replicated scalar as a float (also when other processes hold it)."""
  return float(np.asarray(x.addressable_shards[0].data))


class FsdpRunner:
  """`train.PmapRunner`'s interface for the sharded step
  (`config.parallelism='fsdp'`): one mesh over every device of every process,
  parameters and optimizer state split FSDP-style, global batches.

  Checkpoints hold the full state gathered on the host (`process_allgather`
  when other processes hold shards): the same layout as under pmap, so a run
  resumes under either.

  `min_shard_size` (`config.fsdp_min_shard_size`): leaves with fewer
  elements stay replicated, see `fsdp_partition_spec`.
  """

  def __init__(self, *, params, loss_fn, counts_fn, tx, accum_steps: int,
               trainable_mask, min_shard_size: int = MIN_SHARD_SIZE,
               confusion_fn=None):
    self.mesh = make_mesh()
    shapes = jax.eval_shape(lambda p: p, params)
    self.param_shardings = fsdp_shardings(shapes, self.mesh,
                                          min_size=min_shard_size)
    train_shapes = trainable.partition(shapes, trainable_mask)[0]
    self.opt_shardings = fsdp_shardings(jax.eval_shape(tx.init, train_shapes),
                                        self.mesh, min_size=min_shard_size)
    self._update = make_sharded_update_fn(
        apply_fn=None, tx=tx, mesh=self.mesh,
        param_shardings=self.param_shardings,
        opt_shardings=self.opt_shardings, accum_steps=accum_steps,
        loss_fn=loss_fn, trainable_mask=trainable_mask)
    self._eval = make_sharded_eval_fn(
        apply_fn=None, mesh=self.mesh, param_shardings=self.param_shardings,
        counts_fn=counts_fn)
    self._confusion = confusion_fn and jax.jit(
        confusion_fn, in_shardings=(self.param_shardings,
                                    NamedSharding(self.mesh, P(_axis(
                                        self.mesh, None)))),
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

  def eval_params(self, params):
    return params

  def counts(self, params, batch):
    correct, count = self._eval(params, batch)
    return _host_scalar(correct), _host_scalar(count)

  def confusion(self, params, batch) -> np.ndarray:
    """The global batch's confusion matrix (`objectives.top1_confusion`)."""
    return np.asarray(self._confusion(params, batch).addressable_shards[0]
                      .data)

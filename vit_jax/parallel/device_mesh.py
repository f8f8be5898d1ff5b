"""The device meshes of sharded training and the names of their axes.

Two meshes, both over every device of every process:

  * `make_mesh()`: 1-D, one axis `DATA_AXIS` along which `sharding` splits
    both the batch and the parameters;
  * `make_data_fsdp_mesh(data, fsdp)`: 2-D, axes (`DATA_AXIS`, `FSDP_AXIS`)
    of sizes `data` x `fsdp` (big_vision's and MaxText's hybrid sharding).
    The batch is split over both axes (row blocks over all data x fsdp
    devices), parameters and optimizer state along `FSDP_AXIS` only, so they
    are replicated along `DATA_AXIS`. A 1 x n mesh is the 1-D mesh's FSDP; an
    n x 1 mesh is plain data parallelism with the state replicated, the
    math of pmap.

`sharding` and `sharded_step` ask this module which axes the batch and the
parameters use (`batch_axes`, `fsdp_axis`), so the same code serves both:

  mesh = device_mesh.make_data_fsdp_mesh(data=2, fsdp=-1)  # 2 x 4 on 8
  device_mesh.batch_axes(mesh, None)  # ('data', 'fsdp')
  device_mesh.fsdp_axis(mesh, None)  # 'fsdp'
"""

import math
from typing import Optional, Sequence, Tuple, Union

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh
import numpy as np

# The mesh axis the batch is split along (and, on the 1-D mesh, the
# parameters too).
DATA_AXIS = 'data'
# The axis of the 2-D mesh the parameters and optimizer state are split along.
FSDP_AXIS = 'fsdp'


def make_mesh(devices: Optional[Sequence[jax.Device]] = None,
              axis_name: str = DATA_AXIS) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process).

  `sharding.shard_batch` gives each device of the mesh one row block of the
  global batch; with the default (`jax.devices()`, which on one host is
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


def mesh_shape(data: int, fsdp: int, device_count: int) -> Tuple[int, int]:
  """The (data, fsdp) sizes of a 2-D mesh over `device_count` devices.

  Args:
    data: size of the data axis, or -1 for the devices `fsdp` leaves.
    fsdp: size of the fsdp axis, or -1 for the devices `data` leaves.
    device_count: all devices of all processes.

  Returns:
    (data, fsdp), positive, with data * fsdp == device_count.

  Raises:
    ValueError: a size below -1 or 0, both -1, a size that does not divide
      the device count, or a product other than the device count.
  """
  sizes = {'data': data, 'fsdp': fsdp}
  for name, size in sizes.items():
    if not isinstance(size, (int, np.integer)) or size == 0 or size < -1:
      raise ValueError(f'{name}={size!r} is not a number of devices: give a '
                       'positive size, or -1 for the devices the other axis '
                       'leaves.')
  if data == fsdp == -1:
    raise ValueError('data and fsdp are both -1; only one axis can take the '
                     'devices the other leaves.')
  divisors = [n for n in range(1, device_count + 1) if device_count % n == 0]
  for name, size in sizes.items():
    if size != -1 and device_count % size:
      raise ValueError(
          f'{name}={size} does not divide the {device_count} devices; choose '
          f'one of {divisors}.')
  data = data if data != -1 else device_count // fsdp
  fsdp = fsdp if fsdp != -1 else device_count // data
  if data * fsdp != device_count:
    raise ValueError(
        f'data={data} x fsdp={fsdp} = {data * fsdp} devices, but there are '
        f'{device_count}; the mesh must hold every device once.')
  return data, fsdp


def device_grid(data: int, fsdp: int,
                devices: Sequence[jax.Device]) -> np.ndarray:
  """The [data, fsdp] array of `devices` for `make_data_fsdp_mesh`.

  Flattened row by row it keeps each process's devices together, which
  `sharding.shard_batch` needs (a process feeds one contiguous block of
  rows): with several processes the devices in (process, id) order, so a
  process holds whole data rows when `fsdp` divides its device count and a
  data row spans whole processes when its devices divide `fsdp`. One
  process: `mesh_utils.create_device_mesh` (topology-aware on TPU; on CPU
  and GPU the devices in id order).

  Args:
    data: size of the data axis.
    fsdp: size of the fsdp axis.
    devices: data * fsdp devices.

  Returns:
    An object array of shape [data, fsdp].
  """
  devices = list(devices)
  if len({d.process_index for d in devices}) == 1:
    return mesh_utils.create_device_mesh((data, fsdp), devices)
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  return np.asarray(ordered, dtype=object).reshape(data, fsdp)


def make_data_fsdp_mesh(data: int = 1, fsdp: int = -1,
                        devices: Optional[Sequence[jax.Device]] = None
                        ) -> Mesh:
  """A 2-D mesh with axes (`DATA_AXIS`, `FSDP_AXIS`) of sizes data x fsdp.

  The defaults, 1 x all devices, shard the train state over every device
  like the 1-D `make_mesh`; `data=-1, fsdp=1` is data parallelism with the
  state replicated. On one process with the default devices, row block `d`
  of the global batch lands on `jax.devices()[d]` (on CPU and GPU), as under
  pmap and the 1-D mesh.

  Args:
    data: size of the data axis; -1: the devices `fsdp` leaves.
    fsdp: size of the fsdp axis; -1: the devices `data` leaves.
    devices: the devices (default: every device of every process); their
      order in the mesh is `device_grid`'s.

  Returns:
    The `Mesh`.

  Raises:
    ValueError: sizes that do not fit the devices (`mesh_shape`).
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError('make_data_fsdp_mesh got no devices; pass None for all '
                     'of them.')
  data, fsdp = mesh_shape(data, fsdp, len(devices))
  return Mesh(device_grid(data, fsdp, devices), (DATA_AXIS, FSDP_AXIS))


def _check_axis(mesh: Mesh, axis_name: str) -> str:
  if axis_name not in mesh.axis_names:
    raise ValueError(f'The mesh has no axis {axis_name!r} (axes: '
                     f'{mesh.axis_names}); pass one of them as axis_name=.')
  return axis_name


def data_axis(mesh: Mesh, axis_name: Optional[str]) -> str:
  """`axis_name`, or the mesh's only axis; checks that the mesh has it."""
  if axis_name is None:
    if len(mesh.axis_names) != 1:
      raise ValueError(
          f'The mesh has axes {mesh.axis_names}; pass axis_name= to say which '
          'one is the data axis.')
    return mesh.axis_names[0]
  return _check_axis(mesh, axis_name)


def fsdp_axis(mesh: Mesh, axis_name: Optional[str]) -> str:
  """The axis parameters are split along: `axis_name`, else `FSDP_AXIS` if
  the mesh has it, else the mesh's only axis."""
  if axis_name is None and FSDP_AXIS in mesh.axis_names:
    return FSDP_AXIS
  return data_axis(mesh, axis_name)


def batch_axes(mesh: Mesh,
               axis_name: Optional[str]) -> Union[str, Tuple[str, ...]]:
  """The batch's entry of a `PartitionSpec`: `axis_name`, else every axis of
  the mesh (the name of a 1-D mesh's only axis, a tuple of a 2-D mesh's)."""
  if axis_name is not None:
    return _check_axis(mesh, axis_name)
  names = tuple(mesh.axis_names)
  return names[0] if len(names) == 1 else names


def axis_size(mesh: Mesh, axes: Union[str, Tuple[str, ...]]) -> int:
  """How many shards `axes` (a name or a tuple of names) cut an array into."""
  names = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in names)

"""The device meshes of sharded training and the names of their axes.

`make_mesh()` is 1-D: one axis `DATA_AXIS` splitting both batch and
parameters. `make_data_fsdp_mesh(data, fsdp)` is 2-D (hybrid sharding, as in
big_vision and MaxText): the batch is split over both axes, the train state
along `FSDP_AXIS` only. `batch_axes` and `fsdp_axis` tell `sharding` and
`sharded_step` which axes to use, so the same code serves both meshes.
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

  With the default, row `d` of an input-pipeline batch lands on the same
  device as under pmap.
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError('make_mesh got no devices; pass None for all of them.')
  return Mesh(np.asarray(devices, dtype=object).reshape(-1), (axis_name,))


def mesh_shape(data: int, fsdp: int, device_count: int) -> Tuple[int, int]:
  """The (data, fsdp) sizes of a 2-D mesh over `device_count` devices.

  Either size may be -1 for the devices the other leaves. Raises ValueError
  unless the sizes are valid and their product is `device_count`.
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
  """The [data, fsdp] object array of `devices` for `make_data_fsdp_mesh`.

  Flattened row by row it keeps each process's devices together, as
  `sharding.shard_batch` needs: (process, id) order across processes,
  `mesh_utils.create_device_mesh` (topology-aware on TPU) within one.
  """
  devices = list(devices)
  if len({d.process_index for d in devices}) == 1:
    return mesh_utils.create_device_mesh((data, fsdp), devices)
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  return np.asarray(ordered, dtype=object).reshape(data, fsdp)


def make_data_fsdp_mesh(data: int = 1,
                        fsdp: int = -1,
                        devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 2-D mesh with axes (`DATA_AXIS`, `FSDP_AXIS`) of sizes data x fsdp.

  1 x all devices (the default) shards the state like `make_mesh`;
  `data=-1, fsdp=1` is data parallelism. -1 takes the devices the other size
  leaves; raises ValueError for sizes that do not fit (`mesh_shape`).
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
  """`axis_name`, else `FSDP_AXIS` if the mesh has it, else its only axis."""
  if axis_name is None and FSDP_AXIS in mesh.axis_names:
    return FSDP_AXIS
  return data_axis(mesh, axis_name)


def batch_axes(mesh: Mesh,
               axis_name: Optional[str]) -> Union[str, Tuple[str, ...]]:
  """`axis_name`, else every axis of the mesh (a name or a tuple)."""
  if axis_name is not None:
    return _check_axis(mesh, axis_name)
  names = tuple(mesh.axis_names)
  return names[0] if len(names) == 1 else names


def axis_size(mesh: Mesh, axes: Union[str, Tuple[str, ...]]) -> int:
  """How many shards `axes` (a name or a tuple of names) cut an array into."""
  names = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in names)

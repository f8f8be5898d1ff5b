"""The 1-D device mesh of sharded training and its data axis.

`make_mesh()` puts every device of every process on one axis, `DATA_AXIS`,
along which `sharding` splits the batch and the parameters and
`sharded_step` runs its jitted steps; `data_axis(mesh, axis_name)` is how
they name that axis (the mesh's only one unless told):

  mesh = device_mesh.make_mesh()
  axis = device_mesh.data_axis(mesh, None)  # 'data'
"""

from typing import Optional, Sequence

import jax
from jax.sharding import Mesh
import numpy as np

# The mesh axis the batch and the parameters are split along.
DATA_AXIS = 'data'


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


def data_axis(mesh: Mesh, axis_name: Optional[str]) -> str:
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

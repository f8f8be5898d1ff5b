"""Out of memory: named before a step that cannot fit, and explained after.

`check_batch_fits` compares a lower bound of a step's memory per device
with the device's; `explain` turns XLA's RESOURCE_EXHAUSTED into
`OutOfMemoryError` with the batch, sizes and remedies.
"""

import os
import re
import resource
from typing import Optional, Tuple

import jax

from vit_jax.guards import disk_space

_OOM = re.compile(r'RESOURCE_EXHAUSTED|[Oo]ut of memory')
_BYTES = re.compile(r'allocat\w* (\d+) bytes|(\d+) bytes')


class OutOfMemoryError(MemoryError):
  """The train step needs more memory than a device has."""


def device_memory() -> Tuple[int, str]:
  """(bytes one local device may use, how that was found)."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != 'cpu' else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit']), f'the {device.platform} has'
  ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  have, what = ram // jax.local_device_count(), 'the RAM per device is'
  limit = resource.getrlimit(resource.RLIMIT_AS)[0]
  if limit != resource.RLIM_INFINITY:
    left = (limit - _virtual_size()) // jax.local_device_count()
    if left < have:
      have, what = max(left, 0), 'the process limit (RLIMIT_AS) leaves'
  return have, what


def _virtual_size() -> int:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmSize:'):
        return int(line.split()[1]) * 1024
  return 0


def batch_per_device(config) -> Tuple[int, int]:
  """(images per device per step, per micro-batch of accum_steps)."""
  per_device = config.batch // max(jax.device_count(), 1)
  return per_device, per_device // max(config.get('accum_steps') or 1, 1)


def step_bytes_lower_bound(config, num_params: int) -> int:
  """A lower bound of one train step's memory on one device.

  Parameters, gradients and one optimizer slot in float32, plus per token and
  layer the MLP's hidden units and four vectors of the hidden size.
  """
  total = 4 * num_params * 3
  model = config.model
  transformer = model.get('transformer')
  patches = model.get('patches')
  if transformer is None or patches is None or not model.get('hidden_size'):
    return total
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  height, width = input_pipeline.get_image_size(config)
  grid = (height // patches.size[0]) * (width // patches.size[1])
  per_token = transformer.mlp_dim + 4 * model.hidden_size
  layers = (
      transformer.num_layers if
      (model.get('remat_policy') or 'none') == 'none' else 1)
  itemsize = 2 if model.get('dtype') in ('bfloat16', 'float16') else 4
  return total + (
      batch_per_device(config)[1] * (grid + 1) * per_token * layers * itemsize)


def _remedies(config) -> str:
  return ('Lower --config.batch, raise --config.accum_steps (the same batch '
          f'in smaller pieces; now {config.get("accum_steps") or 1}), train a '
          'smaller model, or compute in bfloat16 '
          '(--config.model.dtype=bfloat16).')


def _batch_words(config) -> str:
  per_device, micro = batch_per_device(config)
  return (f'config.batch={config.batch} is {per_device} images per device '
          f'({jax.device_count()} device(s)' +
          (f', {micro} per micro-batch' if micro != per_device else '') + ')')


def check_batch_fits(config, num_params: int) -> None:
  """Raises OutOfMemoryError where the step obviously cannot fit."""
  need = step_bytes_lower_bound(config, num_params)
  have, what = device_memory()
  if need > have:
    raise OutOfMemoryError(
        f'Out of memory before the first step: {_batch_words(config)}; one '
        f'train step of this model ({num_params:,} parameters) needs at '
        f'least {disk_space.format_bytes(need)} per device, and {what} '
        f'{disk_space.format_bytes(have)}. {_remedies(config)}')


def explain(error: BaseException, config) -> Optional[OutOfMemoryError]:
  """An OutOfMemoryError for `error` if XLA ran out of memory, else None."""
  if isinstance(error, OutOfMemoryError):
    return None
  text = f'{type(error).__name__}: {error}'
  if not _OOM.search(text) or 'Error writing' in text:
    return None
  found = _BYTES.search(text)
  tried = (f'tried to allocate '
           f'{disk_space.format_bytes(int(found.group(1) or found.group(2)))}'
           if found else 'ran out of memory')
  have, what = device_memory()
  return OutOfMemoryError(
      f'Out of memory: the train step {tried}, and {what} '
      f'{disk_space.format_bytes(have)}; {_batch_words(config)}. '
      f'{_remedies(config)}')

"""Where two parameter trees differ, and the error message that lists it.

`vit_jax.checkpoint.inspect_params` and `load_pretrained` compare a
checkpoint's tree with a model's: keys only one of them has, and common keys
whose shapes differ, each listed with its shape (long lists summarised per
top-level module).
"""

import collections
from typing import List

from vit_jax.checkpoints import trees


def _format_list(entries: List[str], limit: int = 30) -> str:
  """Indented lines; long lists summarised per top-level module."""
  if len(entries) > limit:
    groups = collections.defaultdict(list)
    for entry in entries:
      groups[entry.split('/', 1)[0].split(' ', 1)[0]].append(entry)
    entries = []
    for name, members in groups.items():
      if len(members) <= 3:
        entries.extend(members)
      else:
        entries.append(f'{name}/... ({len(members)} parameters, e.g. '
                       f'{members[0]})')
  shown = entries[:limit]
  more = (f'\n    ... and {len(entries) - limit} more'
          if len(entries) > limit else '')
  return ''.join(f'\n    {e}' for e in shown) + more


def _describe_shape(x) -> str:
  shape = trees.shape_of(x)
  return '{}' if shape is None else str(shape)


def differing_keys(params_flat, expected_flat):
  missing = sorted(expected_flat.keys() - params_flat.keys())
  unexpected = sorted(params_flat.keys() - expected_flat.keys())
  mismatched = sorted(
      k for k in params_flat.keys() & expected_flat.keys()
      if trees.shape_of(params_flat[k]) != trees.shape_of(expected_flat[k]))
  return missing, unexpected, mismatched


def differences_lines(params_flat, expected_flat, missing, unexpected,
                      mismatched):
  return ([f'{k} {_describe_shape(expected_flat[k])}' for k in missing],
          [f'{k} {_describe_shape(params_flat[k])}' for k in unexpected], [
              f'{k}: checkpoint {_describe_shape(params_flat[k])}, model '
              f'{_describe_shape(expected_flat[k])}' for k in mismatched
          ])


def differences_message(missing, unexpected, mismatched) -> str:
  parts = ['The checkpoint does not fit the model.']
  if missing:
    parts.append(f'  In the model but not in the checkpoint ({len(missing)}):' +
                 _format_list(missing))
  if unexpected:
    parts.append('  In the checkpoint but not in the model '
                 f'({len(unexpected)}):' + _format_list(unexpected))
  if mismatched:
    parts.append(f'  Shapes differ ({len(mismatched)}):' +
                 _format_list(mismatched))
  parts.append('  Build the model with the configuration the checkpoint was '
               'trained with (`python -m vit_jax.interop.checkpoint_cli '
               'inspect FILE` '
               'shows it).')
  return '\n'.join(parts)

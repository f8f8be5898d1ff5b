"""Writes our ViT parameters as a timm `state_dict` file.

  python -m vit_jax.interop.export_timm IN OUT.safetensors|OUT.pth

IN: an `.npz` or timm file, or a training workdir (its newest checkpoint).
The output loads with `strict=True` into the `timm.create_model` call this
prints; it is written atomically.
"""

import os
import sys
import tempfile
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vit_jax import checkpoint
from vit_jax.checkpoints import timm_layout
from vit_jax.checkpoints import torch_layouts

TORCH_SUFFIXES = ('.pth', '.pt', '.bin')


def save_timm(params: Mapping[str, Any],
              path: str,
              *,
              num_heads: Optional[int] = None) -> timm_layout.TimmModel:
  """Writes `params` as a timm state dict; returns the timm model to create.

  Raises:
    CheckpointError: a model timm cannot build.
  """
  path = os.fspath(path)
  state, timm_model = timm_layout.to_timm(params, num_heads=num_heads)
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, suffix='.tmp')
  os.close(fd)
  try:
    if path.endswith(TORCH_SUFFIXES):
      torch = torch_layouts.import_torch(f'Writing {path}')
      torch.save(
          {
              k: torch.from_numpy(np.ascontiguousarray(v))
              for k, v in state.items()
          }, tmp)
    else:
      from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
      safetensors_numpy.save_file(
          {
              k: np.ascontiguousarray(v) for k, v in state.items()
          },
          tmp,
          metadata={'timm_model': str(timm_model)})
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return timm_model


def _read(source: str):
  if os.path.isdir(source):
    from vit_jax.evaluation import trained_model  # pylint: disable=g-import-not-at-top
    return trained_model.workdir_params(source)[0]
  return checkpoint.load(source)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = list(sys.argv[1:] if argv is None else argv)
  if len(args) != 2:
    print(
        'usage: python -m vit_jax.interop.export_timm IN OUT.safetensors'
        '|OUT.pth  (IN: an .npz, a timm file or a training workdir)',
        file=sys.stderr)
    return 2
  try:
    timm_model = save_timm(_read(args[0]), args[1])
  except (ValueError, FileNotFoundError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'Wrote {args[1]}; load it with\n'
        f'  model = {timm_model}\n'
        f'  model.load_state_dict(state_dict, strict=True)')
  return 0


if __name__ == '__main__':
  sys.exit(main())

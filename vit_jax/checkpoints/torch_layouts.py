"""PyTorch weights -> and <- this project's flax layouts.

Shared by the Hugging Face, torchvision and timm converters: reading a
`.safetensors` or torch file (never executing code) as float32 numpy, and the
per-layer maps. `nn.Linear` weights are (out, in), flax kernels (in, out);
attention projections are (heads*head_dim, D) there, (D, heads, head_dim)
and (heads, head_dim, D) here; convolutions are OIHW there, HWIO here.
"""

import os
from typing import Any, Dict, Mapping, Sequence, Tuple, Union
import zipfile

import numpy as np

from vit_jax.checkpoints.trees import CheckpointError

Params = Dict[str, Any]


def to_numpy(x) -> np.ndarray:
  """A torch tensor, jax or numpy array as a float32 numpy array."""
  if hasattr(x, 'detach'):  # torch; .float() also handles bfloat16.
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, dtype=np.float32)


def dense_from_linear(weight_OxI, bias_O=None) -> Params:
  """`nn.Linear` weight (out, in) -> flax Dense {'kernel', 'bias'} (zeros
  without a bias)."""
  weight_OxI = to_numpy(weight_OxI)
  out = weight_OxI.shape[0]
  bias = np.zeros(out, np.float32) if bias_O is None else to_numpy(bias_O)
  return {'kernel': np.ascontiguousarray(weight_OxI.T), 'bias': bias}


def attention_from_linear(weight,
                          bias,
                          num_heads: int,
                          *,
                          is_out: bool = False) -> Params:
  """One `nn.Linear` of attention -> a flax DenseGeneral of MHA.

  q/k/v (`is_out=False`) give kernel (D, heads, head_dim) and bias (heads,
  head_dim); the output projection gives (heads, head_dim, D) and (D,). A
  None bias becomes zeros.
  """
  dense = dense_from_linear(weight, bias)
  kernel = dense['kernel']
  if is_out:
    hd, d = kernel.shape
    return {
        'kernel': kernel.reshape(num_heads, hd // num_heads, d),
        'bias': dense['bias']
    }
  d, hd = kernel.shape
  return {
      'kernel': kernel.reshape(d, num_heads, hd // num_heads),
      'bias': dense['bias'].reshape(num_heads, hd // num_heads)
  }


def linear_from_dense(
    dense: Mapping[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
  """The inverse of `dense_from_linear`: (weight (out, in), bias (out,))."""
  kernel = np.asarray(dense['kernel'], np.float32)
  return (np.ascontiguousarray(kernel.T), np.asarray(dense['bias'], np.float32))


def conv_from_torch(weight_OxIxHxW, bias_O) -> Params:
  """`nn.Conv2d` OIHW weight -> flax Conv {'kernel': HWIO, 'bias'}."""
  kernel = to_numpy(weight_OxIxHxW).transpose(2, 3, 1, 0)
  return {'kernel': np.ascontiguousarray(kernel), 'bias': to_numpy(bias_O)}


def fold_input_normalization(embedding: Mapping[str, Any], scale_C,
                             offset_C) -> Params:
  """Folds a per-channel affine input map into the patch-embedding conv.

  A model trained on `scale * x + offset` computes on `x` what the returned
  {'kernel', 'bias'} compute, exactly: the patch conv has VALID padding, so
  `conv(x', W) + b = conv(x, W * scale) + (b + sum_hwc W * offset)`.
  """
  kernel = np.asarray(embedding['kernel'], np.float64)
  scale = np.asarray(scale_C, np.float64)
  offset = np.asarray(offset_C, np.float64)
  new_kernel = kernel * scale[None, None, :, None]
  new_bias = (
      np.asarray(embedding['bias'], np.float64) +
      np.einsum('hwcd,c->d', kernel, offset))
  return {
      'kernel': new_kernel.astype(np.float32),
      'bias': new_bias.astype(np.float32)
  }


def linear_from_attention(dense: Mapping[str, Any], *,
                          is_out: bool) -> Tuple[np.ndarray, np.ndarray]:
  """The inverse of `attention_from_linear`: (weight (out, in), bias)."""
  kernel = np.asarray(dense['kernel'], np.float32)
  bias = np.asarray(dense['bias'], np.float32)
  if is_out:  # (heads, head_dim, D) -> (heads*head_dim, D)
    kernel = kernel.reshape(-1, kernel.shape[-1])
  else:  # (D, heads, head_dim) -> (D, heads*head_dim)
    kernel = kernel.reshape(kernel.shape[0], -1)
  return np.ascontiguousarray(kernel.T), bias.reshape(-1)


def read_weights_file(file_path: str) -> Dict[str, np.ndarray]:
  """One `.safetensors` or torch (`.bin`) file -> {name: float32 array}."""
  if file_path.endswith('.safetensors'):
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    try:
      return {
          k: to_numpy(v)
          for k, v in safetensors_numpy.load_file(file_path).items()
      }
    except TypeError:
      # numpy has no bfloat16: read through torch, which has.
      pass
    except Exception as e:  # safetensors raises its own error types.
      raise CheckpointError(
          f'Cannot read {file_path!r}: {e}. Re-download or re-export it.'
      ) from e
    import_torch(f'{file_path} holds bfloat16 tensors; reading them')
    from safetensors import torch as safetensors_torch  # pylint: disable=g-import-not-at-top
    return {
        k: to_numpy(v)
        for k, v in safetensors_torch.load_file(file_path).items()
    }
  torch = import_torch(f'Reading {file_path}')
  try:
    state = torch.load(file_path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises many types for bad files.
    raise CheckpointError(
        f'Cannot read {file_path!r}: {e}. Re-download or re-export it.') from e
  return {k: to_numpy(v) for k, v in state.items()}


def import_torch(what: str):
  """`torch`, or a CheckpointError saying that `what` needs it, and how."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CheckpointError(
        f'{what} needs torch, which is not installed: pip install torch '
        '(or re-save the model as model.safetensors).') from e
  return torch


def is_torch_file(path) -> bool:
  """Whether a local `path` is `.safetensors` or a `torch.save` zip."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    return False
  if path.endswith('.safetensors'):
    return True
  try:
    with zipfile.ZipFile(path) as archive:
      return any(
          n.endswith('/data.pkl') or n == 'data.pkl'
          for n in archive.namelist())
  except (zipfile.BadZipFile, OSError):
    return False


def read_state_dict(
    state_or_path: Union[str, os.PathLike, Mapping[str, Any]],
    *,
    marker: str,
    renames: Sequence[Tuple[str, str]] = ()) -> Dict[str, np.ndarray]:
  """A state dict (or its `.safetensors` / torch file) as float32 numpy.

  A training checkpoint (`{'model' | 'state_dict' | ...: state_dict}`) is
  unwrapped unless it holds `marker`; a `module.` prefix is dropped and the
  `(old, new)` substrings of `renames` are replaced in every name.
  """
  state = state_or_path
  if isinstance(state, (str, os.PathLike)):
    path = os.fspath(state)
    if not os.path.exists(path):
      raise CheckpointError(f'State dict file {path!r} does not exist.')
    if path.endswith('.safetensors'):
      state = read_weights_file(path)
    else:
      torch = import_torch(f'Reading {path}')
      try:
        state = torch.load(path, map_location='cpu', weights_only=True)
      except Exception as e:  # torch raises many types for bad files.
        raise CheckpointError(
            f'Cannot read {path!r} with torch.load(weights_only=True): {e}. '
            'Pass a state dict (`model.state_dict()`) saved with '
            'torch.save.') from e
  if not isinstance(state, Mapping):
    raise CheckpointError(
        f'Expected a state dict (mapping of names to tensors); got '
        f'{type(state).__name__}.')
  if marker not in state:
    for wrapper in ('model', 'state_dict', 'model_ema', 'state_dict_ema'):
      if isinstance(state.get(wrapper), Mapping):
        state = state[wrapper]
        break
  out = {}
  for name, value in state.items():
    if name.startswith('module.'):
      name = name[len('module.'):]
    for old, new in renames:
      name = name.replace(old, new)
    out[name] = to_numpy(value)
  return out

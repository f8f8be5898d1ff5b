"""Matmuls of bfloat16 operands with float32 accumulation, forward and backward.

Used by `VisionTransformer(dtype=jnp.bfloat16)` for its encoder blocks. JAX
alone would upcast the gradient dots to float32, so `_mixed_dot` rounds the
cotangent to bfloat16. XLA:CPU runs bf16 x bf16 -> f32 dots only as plain
[b, m, k] x [b, k, n] matmuls (other layouts fail with "Unsupported element
type for DotThunk::Execute"), so on CPU gradient dots are rewritten as such
(`_batched_matmul`).
"""

import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def is_float32(dtype) -> bool:
  return jnp.dtype(dtype) == jnp.float32


def _einsum_specs(lhs_ndim, rhs_ndim, dimension_numbers):
  """Einsum subscripts (lhs, rhs, out) of a `lax.dot_general`."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  letters = iter('abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ')
  lhs, rhs = [None] * lhs_ndim, [None] * rhs_ndim
  for a, b in list(zip(lhs_batch, rhs_batch)) + list(
      zip(lhs_contract, rhs_contract)):
    lhs[a] = rhs[b] = next(letters)
  lhs = [c or next(letters) for c in lhs]
  rhs = [c or next(letters) for c in rhs]
  # dot_general's output order: batch, lhs free, rhs free.
  out = ([lhs[a] for a in lhs_batch] + [
      c for i, c in enumerate(lhs)
      if i not in lhs_contract and i not in lhs_batch
  ] + [
      c for i, c in enumerate(rhs)
      if i not in rhs_contract and i not in rhs_batch
  ])
  return ''.join(lhs), ''.join(rhs), ''.join(out)


def _batched_matmul(lhs, rhs, lhs_spec, rhs_spec, out_spec):
  """einsum `lhs_spec,rhs_spec->out_spec` as one [b, m, k] x [b, k, n] dot.

  Float32 accumulation; an optimization barrier keeps XLA from folding the
  transposes back into the dot.
  """
  batch = [c for c in lhs_spec if c in rhs_spec and c in out_spec]
  contract = [c for c in lhs_spec if c in rhs_spec and c not in out_spec]
  lhs_free = [c for c in lhs_spec if c not in rhs_spec]
  rhs_free = [c for c in rhs_spec if c not in lhs_spec]
  size = dict(zip(lhs_spec, lhs.shape))
  size.update(zip(rhs_spec, rhs.shape))
  prod = lambda letters: int(np.prod([size[c] for c in letters]))
  lhs_BxMxK = jnp.transpose(
      lhs, [lhs_spec.index(c) for c in batch + lhs_free + contract]).reshape(
          prod(batch), prod(lhs_free), prod(contract))
  rhs_BxKxN = jnp.transpose(
      rhs, [rhs_spec.index(c) for c in batch + contract + rhs_free]).reshape(
          prod(batch), prod(contract), prod(rhs_free))
  lhs_BxMxK, rhs_BxKxN = lax.optimization_barrier((lhs_BxMxK, rhs_BxKxN))
  out_BxMxN = lax.dot_general(
      lhs_BxMxK,
      rhs_BxKxN, (((2,), (1,)), ((0,), (0,))),
      preferred_element_type=jnp.float32)
  order = batch + lhs_free + rhs_free
  out = out_BxMxN.reshape([size[c] for c in order])
  return jnp.transpose(out, [order.index(c) for c in out_spec])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_dot(lhs, rhs, dimension_numbers):
  return lax.dot_general(
      lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32)


def _mixed_dot_fwd(lhs, rhs, dimension_numbers):
  return _mixed_dot(lhs, rhs, dimension_numbers), (lhs, rhs)


def _mixed_dot_bwd(dimension_numbers, residuals, g):
  lhs, rhs = residuals
  l, r, o = _einsum_specs(lhs.ndim, rhs.ndim, dimension_numbers)
  g = g.astype(lhs.dtype)  # Low-precision operands, as in the forward pass.
  if jax.default_backend() == 'cpu':
    d_lhs = _batched_matmul(g, rhs, o, r, l)
    d_rhs = _batched_matmul(lhs, g, l, o, r)
  else:  # GPU/TPU dot kernels take any layout.
    d_lhs = jnp.einsum(
        f'{o},{r}->{l}', g, rhs, preferred_element_type=jnp.float32)
    d_rhs = jnp.einsum(
        f'{l},{o}->{r}', lhs, g, preferred_element_type=jnp.float32)
  return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype)


_mixed_dot.defvjp(_mixed_dot_fwd, _mixed_dot_bwd)


def f32_accumulating_dot_general(lhs,
                                 rhs,
                                 dimension_numbers,
                                 precision=None,
                                 preferred_element_type=None):
  """Drop-in `lax.dot_general` with float32 accumulation and output.

  `precision` set or operands of different dtypes: the plain `lax.dot_general`
  (and JAX's gradient). `preferred_element_type` is ignored.
  """
  del preferred_element_type
  if precision is not None or lhs.dtype != rhs.dtype:
    return lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=jnp.float32)
  # Hashable (static) dimension numbers for custom_vjp.
  dimension_numbers = tuple(
      tuple(tuple(int(d)
                  for d in dims)
            for dims in pair)
      for pair in dimension_numbers)
  return _mixed_dot(lhs, rhs, dimension_numbers)


class F32AccumulatingEinsum:
  """flax MHA's attention einsums (`*_einsum_cls`) for a compute dtype.

  Operands are cast to `dtype` so that float32 softmax probabilities do not
  promote the second einsum to float32.
  """

  def __init__(self, dtype: Dtype):
    self.dtype = dtype

  def __call__(self, spec, *operands, **kwargs):
    operands = [o.astype(self.dtype) for o in operands]
    return jnp.einsum(
        spec,
        *operands,
        preferred_element_type=jnp.float32,
        _dot_general=f32_accumulating_dot_general,
        **kwargs)


def matmul_kwargs(dtype: Dtype) -> dict:
  """`nn.Dense`/`nn.DenseGeneral` kwargs for a compute dtype.

  Empty for float32, which keeps the original's graph bit for bit.
  """
  if is_float32(dtype):
    return {}
  return {'dot_general': f32_accumulating_dot_general}

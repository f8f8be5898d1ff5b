"""Attention implementations for flax's MultiHeadDotProductAttention.

`models_vit.Encoder1DBlock(attention_impl=...)` hands one of these to its
`nn.MultiHeadDotProductAttention` as `attention_fn`; 'reference' is flax's
own `nn.dot_product_attention` (the original's graph). Both compute the
reference's function (tested to 1e-5 in float32 in
`tests/test_speed_equivalence.py`); they differ in how:

  * `fused_attention` ('xla', 'cudnn'): `jax.nn.dot_product_attention`, the
    fused cuDNN flash-attention kernel on NVIDIA GPUs, XLA's elsewhere.
  * `heads_major_attention` ('heads_major'): the reference einsums as
    batched matmuls over leading (batch, head) axes.

Both fall back to the reference when the caller collects the attention
probabilities (`intermediates` mutable), which a fused kernel never forms.
"""

import functools
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.layers import mixed_precision

# `attention_impl` values: flax's attention (the original), its einsums as
# batched matmuls, `jax.nn.dot_product_attention` with XLA's or cuDNN's kernel.
IMPLS = ('reference', 'heads_major', 'xla', 'cudnn')


def fused_attention(query, key, value, *, implementation, dropout_rate=0.,
                    deterministic=True, dtype=None, module=None,
                    force_fp32_for_softmax=False, **unused_kwargs):
  """Attention through `jax.nn.dot_product_attention`, for flax MHA.

  A drop-in `attention_fn` of `nn.MultiHeadDotProductAttention`: inputs
  [batch, len, heads, head_dim], same output, scale 1/sqrt(head_dim).

  Args:
    query: [B, T, N, H].
    key: [B, S, N, H].
    value: [B, S, N, H].
    implementation: 'xla' or 'cudnn' (see `jax.nn.dot_product_attention`).
    dropout_rate: attention dropout; must be 0 unless `deterministic`.
    deterministic: no dropout.
    dtype: computation dtype.
    module: the attention module, passed by flax when the weights are to be
      sown. If its `intermediates` collection is mutable the caller wants the
      attention probabilities, which a fused kernel never forms: we then
      compute attention the reference way (same numbers) so that they exist.
    force_fp32_for_softmax: for the reference fallback.
    **unused_kwargs: other MHA arguments (mask, dropout_rng, ...).

  Returns:
    [B, T, N, H].
  """
  if module is not None and module.is_mutable_collection('intermediates'):
    kw = {}
    if dtype is not None and not mixed_precision.is_float32(dtype):
      einsum = mixed_precision.F32AccumulatingEinsum(dtype)
      kw = dict(qk_attn_weights_einsum=einsum,
                attn_weights_value_einsum=einsum)
    return nn.dot_product_attention(
        query, key, value, dropout_rng=unused_kwargs.get('dropout_rng'),
        dropout_rate=dropout_rate, deterministic=deterministic, dtype=dtype,
        module=module, force_fp32_for_softmax=force_fp32_for_softmax,
        broadcast_dropout=unused_kwargs.get('broadcast_dropout', False), **kw)
  if dropout_rate > 0. and not deterministic:
    raise ValueError(
        f'attention_impl={implementation!r} has no attention dropout, but the '
        f'model trains with attention_dropout_rate={dropout_rate}. Set '
        "attention_dropout_rate=0 or use attention_impl='reference'.")
  if implementation == 'cudnn' and jax.default_backend() != 'gpu':
    raise ValueError(
        "attention_impl='cudnn' is the NVIDIA GPU flash-attention kernel; "
        f'the backend here is {jax.default_backend()!r}. Use '
        "attention_impl='xla'.")
  if dtype is not None:
    query, key, value = (t.astype(dtype) for t in (query, key, value))
  return jax.nn.dot_product_attention(query, key, value,
                                      implementation=implementation)


def heads_major_attention(query, key, value, *, mask=None, dropout_rng=None,
                          dropout_rate=0., broadcast_dropout=True,
                          deterministic=False, dtype=None, precision=None,
                          module=None, force_fp32_for_softmax=False,
                          qk_attn_weights_einsum=None,
                          attn_weights_value_einsum=None):
  """flax's reference attention computed heads-major, for flax MHA.

  A drop-in `attention_fn` of `nn.MultiHeadDotProductAttention`: the same
  operations as `nn.dot_product_attention` (query / sqrt(head_dim), the two
  einsums, softmax, dropout), with q, k, v transposed from [B, T, N, H] to
  [B, N, T, 1, H] first, so that both attention einsums are batched matmuls
  over the leading (batch, head) axes, and the result transposed back. The
  numbers are those of the reference path (equal in float32 to 1e-6, tested;
  the dropout mask is the same); only the layout differs. On XLA:CPU the
  reference einsums, whose batch axes are not leading, run far from the
  matmul peak in float32 (measured by `bench/throughput.py`).

  When the caller collects attention weights (`intermediates` mutable, as
  `models.attention_weights` does) the reference path runs instead, so the
  sown weights keep their [B, N, T, T] shape.
  """
  kw = dict(dropout_rng=dropout_rng, dropout_rate=dropout_rate,
            broadcast_dropout=broadcast_dropout, deterministic=deterministic,
            dtype=dtype, precision=precision,
            force_fp32_for_softmax=force_fp32_for_softmax,
            qk_attn_weights_einsum=qk_attn_weights_einsum,
            attn_weights_value_einsum=attn_weights_value_einsum)
  if module is not None and module.is_mutable_collection('intermediates'):
    return nn.dot_product_attention(query, key, value, mask=mask,
                                    module=module, **kw)
  to_heads_major = lambda t: jnp.swapaxes(t, -3, -2)[..., None, :]
  if mask is not None:  # [..., N, T, S] -> [..., N, 1, T, S]: one "head".
    mask = mask[..., None, :, :]
  out = nn.dot_product_attention(*map(to_heads_major, (query, key, value)),
                                 mask=mask, **kw)
  return jnp.swapaxes(out[..., 0, :], -3, -2)


def attention_kwargs(attention_impl: str, dtype: Any) -> Dict[str, Any]:
  """`nn.MultiHeadDotProductAttention` kwargs of the speed switches.

  Args:
    attention_impl: one of IMPLS.
    dtype: the block's compute dtype; below float32 the projections and both
      einsums accumulate in float32 (`mixed_precision`).

  Returns:
    The kwargs; empty for the original's graph ('reference', float32).
  """
  if attention_impl not in IMPLS:
    raise ValueError(f'Unknown attention_impl {attention_impl!r}; use one of '
                     f'{IMPLS}.')
  kw = {}
  if attention_impl == 'heads_major':
    kw['attention_fn'] = heads_major_attention
  elif attention_impl != 'reference':
    kw['attention_fn'] = functools.partial(fused_attention,
                                           implementation=attention_impl)
  if not mixed_precision.is_float32(dtype):
    kw['qkv_dot_general'] = mixed_precision.f32_accumulating_dot_general
    kw['out_dot_general'] = mixed_precision.f32_accumulating_dot_general
    einsum_cls = functools.partial(mixed_precision.F32AccumulatingEinsum,
                                   dtype)
    kw['qk_attn_weights_einsum_cls'] = einsum_cls
    kw['attn_weights_value_einsum_cls'] = einsum_cls
  return kw

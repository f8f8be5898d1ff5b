"""`attention_fn`s for flax's `nn.MultiHeadDotProductAttention`.

Both compute flax's `nn.dot_product_attention` ('reference'), also with an
additive `bias` (relative position logits, `relative_attention`):
`fused_attention` ('xla', 'cudnn') through `jax.nn.dot_product_attention`,
`heads_major_attention` ('heads_major') as batched matmuls over leading
(batch, head) axes. Both fall back to the reference when the attention
probabilities are collected (`intermediates` mutable).
"""

import functools
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.configs import choices
from vit_jax.layers import mixed_precision


def fused_attention(query,
                    key,
                    value,
                    bias=None,
                    *,
                    implementation,
                    dropout_rate=0.,
                    deterministic=True,
                    dtype=None,
                    module=None,
                    force_fp32_for_softmax=False,
                    **unused_kwargs):
  """Attention through `jax.nn.dot_product_attention`, for flax MHA.

  Args:
    query: [B, T, N, H].
    key: [B, S, N, H].
    value: [B, S, N, H].
    bias: None, or logits added before the softmax, [B, N, T, S].
    implementation: 'xla' or 'cudnn' (see `jax.nn.dot_product_attention`).
    dropout_rate: attention dropout; must be 0 unless `deterministic`.
    module: passed by flax; with `intermediates` mutable the reference path
      runs so that the probabilities exist.
    **unused_kwargs: other MHA arguments (mask, dropout_rng, ...).

  Returns:
    [B, T, N, H].
  """
  if module is not None and module.is_mutable_collection('intermediates'):
    kw = {}
    if dtype is not None and not mixed_precision.is_float32(dtype):
      einsum = mixed_precision.F32AccumulatingEinsum(dtype)
      kw = dict(qk_attn_weights_einsum=einsum, attn_weights_value_einsum=einsum)
    return nn.dot_product_attention(
        query,
        key,
        value,
        bias=bias,
        dropout_rng=unused_kwargs.get('dropout_rng'),
        dropout_rate=dropout_rate,
        deterministic=deterministic,
        dtype=dtype,
        module=module,
        force_fp32_for_softmax=force_fp32_for_softmax,
        broadcast_dropout=unused_kwargs.get('broadcast_dropout', False),
        **kw)
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
  if bias is not None:
    bias = bias.astype(query.dtype)
  return jax.nn.dot_product_attention(
      query, key, value, bias=bias, implementation=implementation)


def heads_major_attention(query,
                          key,
                          value,
                          bias=None,
                          *,
                          mask=None,
                          dropout_rng=None,
                          dropout_rate=0.,
                          broadcast_dropout=True,
                          deterministic=False,
                          dtype=None,
                          precision=None,
                          module=None,
                          force_fp32_for_softmax=False,
                          qk_attn_weights_einsum=None,
                          attn_weights_value_einsum=None):
  """flax's reference attention with q, k, v transposed to [B, N, T, 1, H].

  Same operations and dropout mask as `nn.dot_product_attention`, but both
  einsums become batched matmuls over leading axes, which XLA:CPU runs much
  faster in float32. Collecting `intermediates` runs the reference path.
  """
  kw = dict(
      dropout_rng=dropout_rng,
      dropout_rate=dropout_rate,
      broadcast_dropout=broadcast_dropout,
      deterministic=deterministic,
      dtype=dtype,
      precision=precision,
      force_fp32_for_softmax=force_fp32_for_softmax,
      qk_attn_weights_einsum=qk_attn_weights_einsum,
      attn_weights_value_einsum=attn_weights_value_einsum)
  if module is not None and module.is_mutable_collection('intermediates'):
    return nn.dot_product_attention(
        query, key, value, bias=bias, mask=mask, module=module, **kw)
  to_heads_major = lambda t: jnp.swapaxes(t, -3, -2)[..., None, :]
  # [..., N, T, S] -> [..., N, 1, T, S]: one "head".
  if mask is not None:
    mask = mask[..., None, :, :]
  if bias is not None:
    bias = bias[..., None, :, :]
  out = nn.dot_product_attention(
      *map(to_heads_major, (query, key, value)), bias=bias, mask=mask, **kw)
  return jnp.swapaxes(out[..., 0, :], -3, -2)


def attention_kwargs(attention_impl: str, dtype: Any) -> Dict[str, Any]:
  """`nn.MultiHeadDotProductAttention` kwargs of `attention_impl` and `dtype`.

  Below float32 the projections and einsums accumulate in float32
  (`mixed_precision`); empty for 'reference' in float32 (the original's graph).
  """
  if attention_impl not in choices.ATTENTION_IMPLS:
    raise ValueError(f'Unknown attention_impl {attention_impl!r}; use one of '
                     f'{choices.ATTENTION_IMPLS}.')
  kw = {}
  if attention_impl == 'heads_major':
    kw['attention_fn'] = heads_major_attention
  elif attention_impl != 'reference':
    kw['attention_fn'] = functools.partial(
        fused_attention, implementation=attention_impl)
  if not mixed_precision.is_float32(dtype):
    kw['qkv_dot_general'] = mixed_precision.f32_accumulating_dot_general
    kw['out_dot_general'] = mixed_precision.f32_accumulating_dot_general
    einsum_cls = functools.partial(mixed_precision.F32AccumulatingEinsum, dtype)
    kw['qk_attn_weights_einsum_cls'] = einsum_cls
    kw['attn_weights_value_einsum_cls'] = einsum_cls
  return kw

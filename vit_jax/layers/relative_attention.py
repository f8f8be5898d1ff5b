"""1-D relative position attention of the paper's ablation (Appendix D.4).

Patches are numbered in raster order (row by row); a (query, key) pair of
patches has the offset p_q - p_k, one of 2N-1 for N patches. Every block has
its own table, one embedding per offset, D wide and split into heads as the
keys are: `posembed_relative/rel_embedding` [2N-1, heads, D/heads], row
p_q - p_k + N - 1. The extra attention of the original query against these
embeddings gives logits that are added to the content logits before the
softmax (as Shaw et al. 2018, https://arxiv.org/abs/1803.02155):
  logits[h, q, k] = (q_h . k_h + q_h . r_h[p_q - p_k]) / sqrt(D/heads).
The class token has a learned row of its own, `posembed_relative/
rel_embedding_cls` [heads, D/heads], for every pair it is in: as a key it gets
the bias q . r_cls; as a query its bias is the same for every key, so it
attends by content alone. No absolute embedding is added.
"""

import inspect
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

Array = Any
Initializer = Callable[..., Array]


def offset_index(num_patches: int, num_prefix_tokens: int,
                 num_queries: int) -> np.ndarray:
  """[num_queries, tokens] row of each pair in the table (class row last)."""
  n, p = num_patches, num_prefix_tokens
  patch = np.arange(n)
  index = np.full((p + n, p + n), 2 * n - 1, np.int32)
  index[p:, p:] = patch[:, None] - patch[None, :] + n - 1
  return index[:num_queries]


class RelativePositionEmbedding(nn.Module):
  """One block's offset table, then the class row if any: [2N-1 (+1), H, D/H].

  Attributes:
    num_heads: attention heads.
    num_prefix_tokens: 0, or 1 for a class token.
  """
  num_heads: int
  num_prefix_tokens: int
  posemb_init: Initializer = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, num_tokens: int, hidden: int):
    if self.num_prefix_tokens not in (0, 1):
      raise ValueError("posemb='relative' takes at most one class token; got "
                       f'{self.num_prefix_tokens} prefix tokens.')
    num_patches = num_tokens - self.num_prefix_tokens
    shape = (self.num_heads, hidden // self.num_heads)
    table = self.param('rel_embedding', self.posemb_init,
                       (2 * num_patches - 1,) + shape)
    if self.num_prefix_tokens:
      cls_row = self.param('rel_embedding_cls', self.posemb_init, shape)
      table = jnp.concatenate([table, cls_row[None]], axis=0)
    return table


def relative_logits(query, table, index):
  """The bias [B, H, Tq, T]: (q . r[index[q, k]]) / sqrt(D/H), in float32.

  Args:
    query: [B, Tq, H, D/H], projected and not yet scaled.
    table: [rows, H, D/H] (`RelativePositionEmbedding`).
    index: [Tq, T] (`offset_index`).
  """
  per_row = jnp.einsum(
      '...qhd,jhd->...hqj',
      query,
      table.astype(query.dtype),
      preferred_element_type=jnp.float32)
  per_row = per_row / np.sqrt(query.shape[-1]).astype(np.float32)
  index = jnp.broadcast_to(
      jnp.asarray(index), per_row.shape[:-1] + (index.shape[-1],))
  return jnp.take_along_axis(per_row, index, axis=-1)


def with_relative_bias(attention_fn: Callable[..., Array], table,
                       index: np.ndarray) -> Callable[..., Array]:
  """`attention_fn` (with a `bias` argument) plus the relative logits."""
  accepted = inspect.signature(attention_fn).parameters

  # The keyword arguments flax's MHA passes (it filters by this signature).
  def biased(query,
             key,
             value,
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
    kwargs = dict(
        mask=mask,
        dropout_rng=dropout_rng,
        dropout_rate=dropout_rate,
        broadcast_dropout=broadcast_dropout,
        deterministic=deterministic,
        dtype=dtype,
        precision=precision,
        module=module,
        force_fp32_for_softmax=force_fp32_for_softmax,
        qk_attn_weights_einsum=qk_attn_weights_einsum,
        attn_weights_value_einsum=attn_weights_value_einsum)
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    bias = relative_logits(query, table, index)
    return attention_fn(query, key, value, bias=bias, **kwargs)

  return biased


def biased_attention_fn(attention_fn: Callable[..., Array], *, num_heads: int,
                        num_prefix_tokens: int, num_tokens: int,
                        num_queries: int, hidden: int) -> Callable[..., Array]:
  """`with_relative_bias` of a new `posembed_relative` table (in the calling
  module's compact method) for `num_queries` of `num_tokens` queries."""
  table = RelativePositionEmbedding(
      num_heads=num_heads,
      num_prefix_tokens=num_prefix_tokens,
      name='posembed_relative')(num_tokens, hidden)
  index = offset_index(num_tokens - num_prefix_tokens, num_prefix_tokens,
                       num_queries)
  return with_relative_bias(attention_fn, table, index)

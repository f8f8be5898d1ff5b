"""What `bench.throughput` measures of a jitted call, and how.

Wall time (the median of timed calls after a warm-up, alone or interleaved
with other calls), compile time, peak memory (XLA's buffer assignment), FLOPs
(XLA's count, and the analytic matmul FLOPs of a plain ViT) and the matmul
peak the model FLOPs utilisation divides by:

  seconds = throughput_metrics.median_seconds(lambda: step(x), repeats=9)
  compiled, compile_s = throughput_metrics.compile_timed(fn, *args)
  gib = throughput_metrics.peak_bytes(compiled) / throughput_metrics.GiB
"""

import functools
import statistics
import time
from typing import Any, Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models

GiB = 2**30


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """Median wall time of `fn()` over `repeats` calls after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def median_seconds_interleaved(fns: Sequence[Callable[[], Any]],
                               repeats: int) -> List[float]:
  """Median wall time of each of `fns`, their calls interleaved.

  One warm-up call each, then `repeats` rounds calling every fn once: a
  change of machine load during the run hits all of them alike, so their
  ratios hold better than those of back-to-back `median_seconds`.
  """
  for fn in fns:
    jax.block_until_ready(fn())
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, t in zip(fns, times):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      t.append(time.perf_counter() - t0)
  return [statistics.median(t) for t in times]


def compile_timed(fn, *args, donate_argnums=()):
  """(compiled, seconds for trace + lower + compile)."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
  return compiled, time.perf_counter() - t0


def peak_bytes(compiled) -> Optional[int]:
  """temp + arguments + outputs of a compiled function, aliases counted once."""
  ma = compiled.memory_analysis()
  if ma is None:
    return None
  return (ma.temp_size_in_bytes + ma.argument_size_in_bytes +
          ma.output_size_in_bytes - ma.alias_size_in_bytes)


def xla_flops(compiled) -> Optional[float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return None if not cost or 'flops' not in cost else float(cost['flops'])


def per_image(flops, batch):
  """FLOPs of a batch per image (None stays None)."""
  return None if flops is None else flops / batch


def matmul_gflops(n: int, dtype_name: str, repeats: int) -> float:
  """XLA's rate on an n^3 matmul; bfloat16 means bf16 in, float32 accumulate."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n), np.float32))
  b = jnp.asarray(rng.standard_normal((n, n), np.float32))
  if dtype_name == 'bfloat16':
    a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  matmul = jax.jit(
      functools.partial(jnp.matmul, preferred_element_type=jnp.float32))
  return 2 * n**3 / median_seconds(lambda: matmul(a, b), repeats) / 1e9


def vit_forward_flops(model, image_size: int) -> Optional[float]:
  """Matmul FLOPs of one image through a plain ViT (2 per multiply-add)."""
  if not isinstance(model, models.VisionTransformer):  # E.g. the original's.
    return None
  if model.resnet is not None or model.transformer is None:
    return None
  ph, pw = model.patch_size
  d = model.hidden_size
  t = model.transformer
  n = (image_size // ph) * (image_size // pw)
  tokens = n + int(model.has_class_token)
  flops = 2 * n * ph * pw * 3 * d  # Patch embedding.
  per_layer = (
      2 * tokens * d * 3 * d  # q, k, v projections.
      + 2 * tokens * tokens * d  # q k^T.
      + 2 * tokens * tokens * d  # softmax(.) v.
      + 2 * tokens * d * d  # Output projection.
      + 2 * 2 * tokens * d * t.mlp_dim)  # MLP.
  flops += t.num_layers * per_layer
  if model.token_only_last_block and model.classifier == 'token':
    # The last block: keys and values of every token, the rest for one.
    flops -= per_layer - (2 * tokens * d * 2 * d + 2 * d * d + 4 * tokens * d +
                          2 * d * d + 2 * 2 * d * t.mlp_dim)
  if model.representation_size:
    flops += 2 * d * model.representation_size
  return float(flops + head_flops(model, image_size))


def head_flops(model, image_size: int) -> float:
  """Matmul FLOPs of the `head` Dense layer for one image (0: no head)."""
  if not model.num_classes:
    return 0.
  ph, pw = model.patch_size
  tokens = ((image_size // ph) * (image_size // pw) +
            int(model.has_class_token))
  heads = tokens if model.classifier in ('unpooled', 'token_unpooled') else 1
  width = model.representation_size or model.hidden_size
  return float(2 * heads * width * model.num_classes)


def memory_stats():
  """(bytes_limit, peak_bytes_in_use) of the first device; None if unknown."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get('bytes_limit'), stats.get('peak_bytes_in_use')


def is_out_of_memory(err: Exception) -> bool:
  text = str(err)
  return 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower()

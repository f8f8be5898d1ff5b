"""The matmul ceiling of a function: its matrix products alone, timed.

A training step is matmuls plus everything between them (LayerNorm, GELU,
softmax, casts, transposes, the optimizer). Timing the matmuls alone, at the
shapes, dtypes and dimension numbers the step itself uses, gives the speed
the step would have if everything else were free: an estimate of the
ceiling that no rewrite of the elementwise code can lift.
`bench.throughput --what ceiling` prints it beside the full step.

  ops = matmul_ops(step, *args)      # every dot_general and convolution
  call = dots_only(ops)              # a jitted function of those alone
  seconds = median_seconds(call, 9)

The operations come from the function's jaxpr, after differentiation: the
forward matmuls and the two products each one gives in the backward pass.
Their operands are random arrays of the recorded shapes, made once; the
jitted function takes no arguments and returns every product (so none is
dropped). Nothing orders the products: XLA may run independent ones side by
side, which only makes the ceiling higher; but each reads operands of its
own and every output is kept, so a function whose data stays in cache can
edge past it (docs/speed.md shows one case).
Fused kernels are not `dot_general`s and are left out: with cuDNN attention
(`attention_impl='cudnn'`, GPU) the ceiling lacks the attention matmuls.
"""

import dataclasses
import math
import os
from typing import Any, Callable, List, Sequence

import jax
from jax.extend import core as jex_core
import numpy as np

MATMUL_PRIMITIVES = ('dot_general', 'conv_general_dilated')
# Primitives whose sub-jaxprs do not run exactly once per call.
_UNCOUNTABLE = ('while', 'cond')


@dataclasses.dataclass(frozen=True)
class MatmulOp:
  """One dot_general or convolution of a traced function."""
  primitive: Any
  params: dict
  in_avals: tuple
  out_aval: Any

  @property
  def out_shape(self) -> tuple:
    return tuple(self.out_aval.shape)

  @property
  def name(self) -> str:
    return self.primitive.name

  @property
  def out_dtype(self) -> str:
    return str(self.out_aval.dtype)

  @property
  def flops(self) -> float:
    """2 per multiply-add."""
    out = math.prod(self.out_shape)
    if self.name == 'dot_general':
      (contract, _), _ = self.params['dimension_numbers']
      lhs = self.in_avals[0].shape
      return 2. * out * math.prod(lhs[i] for i in contract)
    # A convolution: each output element sums over the kernel's input
    # features (of its group) and spatial window.
    rhs_spec = self.params['dimension_numbers'].rhs_spec
    kernel = self.in_avals[1].shape
    return 2. * out * math.prod(kernel) / kernel[rhs_spec[0]]


def _sub_jaxprs(params: dict):
  for value in params.values():
    for v in value if isinstance(value, (list, tuple)) else (value,):
      if isinstance(v, jex_core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jex_core.Jaxpr):
        yield v


def _collect(jaxpr, repeat: int, out: List[MatmulOp]):
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in MATMUL_PRIMITIVES:
      op = MatmulOp(eqn.primitive, dict(eqn.params),
                    tuple(v.aval for v in eqn.invars), eqn.outvars[0].aval)
      out.extend([op] * repeat)
      continue
    if name in _UNCOUNTABLE:
      raise NotImplementedError(
          f'matmul_ops: a {name!r} runs its body a data-dependent number of '
          'times (or picks one of several), so its matmuls cannot be '
          'counted; time a function without lax.while_loop or lax.cond (a '
          'scan, or a fori_loop of static length, is counted).')
    times = repeat * (eqn.params['length'] if name == 'scan' else 1)
    for sub in _sub_jaxprs(eqn.params):
      _collect(sub, times, out)


def matmul_ops(fn: Callable[..., Any], *args) -> List[MatmulOp]:
  """Every matmul that `fn(*args)` runs, in program order.

  A scan's body counts `length` times. A custom_vjp's forward counts once
  (its backward appears only in a differentiated function's jaxpr, where it
  is inlined).

  Args:
    fn: a jax-traceable function (e.g. a training step).
    *args: its arguments (arrays or ShapeDtypeStructs).

  Returns:
    MatmulOps; `sum(op.flops for op in ops)` is the function's matmul FLOPs.
  """
  ops: List[MatmulOp] = []
  _collect(jax.make_jaxpr(fn)(*args).jaxpr, 1, ops)
  return ops


def bytes_needed(ops: Sequence[MatmulOp]) -> int:
  """Memory `dots_only(ops)` holds: every op's operands and output."""
  size = lambda aval: math.prod(aval.shape) * np.dtype(aval.dtype).itemsize
  return sum(
      sum(size(a) for a in op.in_avals) + size(op.out_aval) for op in ops)


def memory_budget_bytes(device=None) -> int:
  """Half of the device's memory (the host's RAM for a CPU device)."""
  device = device or jax.devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  # Backend without stats.
    pass
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit']) // 2
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2


def dots_only(ops: Sequence[MatmulOp], seed: int = 0) -> Callable[[], Any]:
  """A jitted, argument-free call of `ops` alone on random operands.

  Repeated ops (a scan's body, identical layers) get operands of their own,
  as in the real function: no product is computed once and reused.
  """
  if not ops:
    raise ValueError('dots_only: no matmuls to time.')
  rng = np.random.default_rng(seed)
  operands = [[
      jax.numpy.asarray(rng.standard_normal(a.shape), a.dtype)
      for a in op.in_avals
  ]
              for op in ops]

  @jax.jit
  def run(operands):
    return [
        op.primitive.bind(*xs, **op.params) for op, xs in zip(ops, operands)
    ]

  return lambda: run(operands)


@dataclasses.dataclass
class ShapeTiming:
  """The ops of one shape and kind, each timed alone."""
  op: MatmulOp  # The first of them.
  count: int
  seconds: float  # One op, median.

  @property
  def gflops_per_s(self) -> float:
    return self.op.flops / self.seconds / 1e9

  def describe(self) -> str:
    """Kind, operand shapes and dtypes, output dtype, dimension numbers."""
    lhs, rhs = self.op.in_avals[:2]
    text = (f'{self.op.name} {lhs.str_short()} x {rhs.str_short()} -> '
            f'{self.op.out_dtype}')
    if self.op.name == 'dot_general':
      (lc, rc), (lb, rb) = self.op.params['dimension_numbers']
      text += f', contract {tuple(lc)}x{tuple(rc)}'
      if lb:
        text += f' batch {tuple(lb)}x{tuple(rb)}'
    return text


def by_shape(ops: Sequence[MatmulOp],
             time_fn: Callable[[Callable[[], Any]], float],
             seed: int = 0) -> List[ShapeTiming]:
  """Each distinct op (kind, shapes, dtypes, parameters) timed on its own.

  Args:
    ops: from `matmul_ops`.
    time_fn: seconds of a call (e.g. a median of repeated calls).
    seed: of the random operands.

  Returns:
    One ShapeTiming per distinct op, the most total time first: where a
    step's matmul time goes, and at what rate each shape runs.
  """
  groups = {}
  for op in ops:
    key = (op.name, tuple((a.shape, str(a.dtype)) for a in op.in_avals),
           repr(sorted(op.params.items())))
    if key in groups:
      groups[key][1] += 1
    else:
      groups[key] = [op, 1]
  timings = [
      ShapeTiming(op, count, time_fn(dots_only([op], seed)))
      for op, count in groups.values()
  ]
  return sorted(timings, key=lambda t: -t.count * t.seconds)

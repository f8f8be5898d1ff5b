"""How the encoder runs its blocks: in turn or as one `nn.scan`, with or
without rematerialisation.

Blocks are named as in the released checkpoints (`encoderblock_{i}`), or
`encoderblock` with a leading layer axis under `scan=True`.
"""

from typing import Any, Callable, Mapping, Optional, Tuple

import flax.linen as nn
import jax

# What each encoder block keeps for the backward pass; the rest is recomputed.
REMAT_POLICIES = {
    'none': None,  # No rematerialisation: everything is kept.
    'full': jax.checkpoint_policies.nothing_saveable,  # Only block inputs.
    # Outputs of the projections and MLP matmuls (not the attention einsums,
    # which have a batch dimension and are the size of L^2).
    'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'save_all_dots': jax.checkpoint_policies.checkpoint_dots,
}


def apply_blocks(make_block: Callable[..., nn.Module],
                 x_BxLxD,
                 *,
                 num_layers: int,
                 train: bool,
                 scan: bool,
                 remat_policy: str,
                 last_block_kwargs: Optional[Mapping[str, Any]] = None,
                 block_args: Tuple[Any, ...] = ()):
  """Runs `num_layers` blocks on the tokens; returns the last block's output.

  Args:
    make_block: `make_block(name=..., **kwargs)` builds one block, called as
      `block(x, *block_args, deterministic=...)`.
    scan: one `nn.scan` body instead of `num_layers` modules.
    remat_policy: a key of REMAT_POLICIES.
    last_block_kwargs: extra fields of the last block (unscanned only).
    block_args: arrays every block gets as they are (e.g. a shared table).
  """
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f'Unknown remat_policy {remat_policy!r}; use one of '
                     f'{tuple(REMAT_POLICIES)}.')
  if scan and last_block_kwargs:
    raise ValueError(
        'last_block_output_tokens needs the unscanned encoder (scan=False): '
        'under nn.scan every block computes the same shapes.')

  def apply_block(module, x, *args):
    return module(x, *args, deterministic=not train)

  if remat_policy != 'none':
    # Inside scan the loop already keeps XLA from merging the recomputation
    # with the forward pass, and prevent_cse would only cost speed (JAX's
    # advice for remat under scan).
    apply_block = nn.remat(
        apply_block, prevent_cse=not scan, policy=REMAT_POLICIES[remat_policy])
  if scan:
    # Per-layer parameters and dropout masks: split the rngs per step.
    x_BxLxD, _ = nn.scan(
        lambda module, carry, args: (apply_block(module, carry, *args), None),
        variable_axes={
            'params': 0,
            'intermediates': 0
        },
        split_rngs={
            'params': True,
            'dropout': True
        },
        in_axes=nn.broadcast,
        length=num_layers,
    )(make_block(name='encoderblock'), x_BxLxD, tuple(block_args))
    return x_BxLxD
  for lyr in range(num_layers):
    last = lyr == num_layers - 1
    x_BxLxD = apply_block(
        make_block(
            name=f'encoderblock_{lyr}',
            **(last_block_kwargs if last and last_block_kwargs else {})),
        x_BxLxD, *block_args)
  return x_BxLxD

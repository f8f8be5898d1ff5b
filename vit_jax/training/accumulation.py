"""Gradient accumulation with one dispatch per micro-batch.

Unlike `utils.accumulate_gradient`'s `lax.fori_loop`, each micro-batch is
its own pmapped call adding into a running sum, which runs faster on XLA:CPU
(docs/main_job.md); the sums follow the loop's order, so the result is the
loop's up to float rounding.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax.training import trainable


def make_update_fn(*, loss_fn: Callable[..., Any], accum_steps: int,
                   tx: optax.GradientTransformation, trainable_mask: Any,
                   axis_name: str) -> Callable[..., Any]:
  """`train.make_update_fn`'s pmapped step for `accum_steps` > 1.

  Returns `update_fn(params, opt_state, batch, rng) -> (params, opt_state,
  loss, new_rng)`; params and opt_state are donated.
  """

  def add_slice(params, acc, batch, index, rng):
    """acc + (loss, grads) of slice `index` of this device's batch."""
    device_rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    train_part, _, merge = trainable.partition(params, trainable_mask)
    size = batch['image'].shape[0] // accum_steps
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, index * size, size)
    loss_i, grads_i = jax.value_and_grad(lambda t: loss_fn(
        merge(t), take(batch['image']), take(batch['label']), device_rng))(
            train_part)
    return jax.tree_util.tree_map(jnp.add, acc, (loss_i, grads_i))

  def apply(params, opt_state, acc, rng):
    loss, grads = jax.tree_util.tree_map(lambda x: x / accum_steps, acc)
    grads = jax.lax.pmean(grads, axis_name=axis_name)
    train_part, _, merge = trainable.partition(params, trainable_mask)
    updates, opt_state = tx.update(grads, opt_state, train_part)
    params = merge(optax.apply_updates(train_part, updates))
    loss = jax.lax.pmean(loss, axis_name=axis_name)
    return params, opt_state, loss, jax.random.split(rng)[1]

  def zeros(params):
    train_part = trainable.partition(params, trainable_mask)[0]
    return jax.tree_util.tree_map(jnp.zeros_like, (jnp.zeros(
        (), jnp.float32), train_part))

  zeros_p = jax.pmap(zeros, axis_name=axis_name)
  add_p = jax.pmap(
      add_slice,
      axis_name=axis_name,
      in_axes=(0, 0, 0, None, 0),
      donate_argnums=(1,))
  apply_p = jax.pmap(apply, axis_name=axis_name, donate_argnums=(0, 1))

  def update_fn(params, opt_state, batch, rng):
    per_device = batch['image'].shape[1]
    if per_device % accum_steps:
      raise ValueError(
          f'The per-device batch {per_device} is not divisible by accum_steps '
          f'{accum_steps}; choose accum_steps dividing it.')
    # Each sum starts from zeros laid out like the sums themselves
    # (0 + x == x), so every micro-batch runs one compiled program.
    acc = zeros_p(params)
    for index in range(accum_steps):
      acc = add_p(params, acc, batch, np.int32(index), rng)
    return apply_p(params, opt_state, acc, rng)

  return update_fn

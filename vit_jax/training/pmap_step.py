"""The data-parallel update step of a loss function, `jax.pmap`ped.

`train.make_update_fn` (the original's step, softmax cross-entropy of a
model's logits) and the train loop's runner (any objective of
`objectives.make_loss_fn`) both build their step here.
"""

from typing import Any, Callable

import jax
import optax

from vit_jax.training import accumulation
from vit_jax.training import trainable


def make_update_fn(*, loss_fn: Callable[..., Any], accum_steps: int,
                   tx: optax.GradientTransformation, trainable_mask: Any,
                   axis_name: str) -> Callable[..., Any]:
  """Returns the pmapped `update_fn(params, opt_state, batch, rng) ->
  (params, opt_state, loss, new_rng)` of `train.make_update_fn`.

  `loss_fn(params, images, labels, rng)` is the loss of one device's batch;
  gradients and loss are averaged over `axis_name`. `accum_steps` > 1 uses
  `accumulation.make_update_fn`.
  """
  if accum_steps and accum_steps > 1:
    return accumulation.make_update_fn(
        loss_fn=loss_fn,
        accum_steps=accum_steps,
        tx=tx,
        trainable_mask=trainable_mask,
        axis_name=axis_name)

  def update_fn(params, opt_state, batch, rng):
    _, new_rng = jax.random.split(rng)
    # Device index across all processes: every device drops out differently.
    device_rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    train_part, _, merge = trainable.partition(params, trainable_mask)

    def loss_wrt(train_part, images, labels):
      return loss_fn(merge(train_part), images, labels, device_rng)

    l, g = jax.value_and_grad(loss_wrt)(train_part, batch['image'],
                                        batch['label'])
    g = jax.lax.pmean(g, axis_name=axis_name)
    updates, opt_state = tx.update(g, opt_state, train_part)
    params = merge(optax.apply_updates(train_part, updates))
    l = jax.lax.pmean(l, axis_name=axis_name)
    return params, opt_state, l, new_rng

  return jax.pmap(update_fn, axis_name=axis_name, donate_argnums=(0, 1))

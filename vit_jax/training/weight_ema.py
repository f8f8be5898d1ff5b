"""An exponential moving average (EMA) of the trained weights.

`with_weight_ema(tx, decay)` wraps an optax optimizer so that its state also
holds the average of the parameters after every update, each update weighted
`decay` times the next one. The average is bias-corrected: after update t it
is

    sum_{s<=t} decay^(t-s) params_s / sum_{s<=t} decay^(t-s),

so it starts at the first update's parameters, not at zero or at the
initialisation. `config.ema_decay` turns it on (`optim.make_optimizer`); the
train loop then evaluates the average, and `averaged_params` /
`checkpoint_params` give it to predict and export. Because it lives in the
optimizer state, train-state checkpoints and every parallelism carry it with
no code of their own.
"""

from typing import Any, Mapping, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from vit_jax.training import trainable


class WeightEmaState(NamedTuple):
  """The wrapped optimizer's state and the average of the parameters."""
  count: jax.Array  # Updates averaged so far (int32 scalar).
  ema_params: Any  # The bias-corrected average; the trained leaves' tree.
  inner: Any  # The wrapped optimizer's state.


def with_weight_ema(tx: optax.GradientTransformation,
                    decay: float) -> optax.GradientTransformation:
  """`tx` whose state also averages the parameters it produces.

  Args:
    tx: the optimizer; its updates are returned unchanged.
    decay: weight of the average against each new update, in (0, 1); the
      average spans about 1 / (1 - decay) updates.

  Returns:
    An optax transformation whose `update` needs `params`.
  """
  if not 0.0 < decay < 1.0:
    raise ValueError(f'config.ema_decay must be in (0, 1), not {decay}; e.g. '
                     '0.999 averages about the last 1,000 updates.')

  def init(params):
    return WeightEmaState(
        count=jnp.zeros([], jnp.int32),
        ema_params=jax.tree_util.tree_map(jnp.array, params),
        inner=tx.init(params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('with_weight_ema needs the parameters in update().')
    updates, inner = tx.update(updates, state.inner, params)
    new_params = optax.apply_updates(params, updates)
    count = state.count + 1
    t = count.astype(jnp.float32)
    # The bias-corrected average's own recursion: 0 at the first update.
    keep = decay * (1 - decay ** (t - 1)) / (1 - decay ** t)
    ema = jax.tree_util.tree_map(
        lambda e, p: (keep * e + (1 - keep) * p).astype(e.dtype),
        state.ema_params, new_params)
    return updates, WeightEmaState(count, ema, inner)

  return optax.GradientTransformation(init, update)


def averaged_params(params: Any, opt_state: Any, mask: Any = None) -> Any:
  """The parameters to evaluate: the average where `opt_state` holds one.

  Args:
    params: the full parameter tree (host or device arrays).
    opt_state: the optimizer state of the trained leaves.
    mask: the trainable mask (`trainable.trainable_mask`), or None.

  Returns:
    `params` with the trained leaves replaced by their average, or `params`
    itself when the optimizer keeps no average.
  """
  if not isinstance(opt_state, WeightEmaState):
    return params
  merge_with_frozen = trainable.partition(params, mask)[2]
  return merge_with_frozen(opt_state.ema_params)


def checkpoint_params(state: Mapping[str, Any]) -> Any:
  """The parameters of a train state restored without a template.

  orbax restores `WeightEmaState` as a dict of its fields; when the state
  holds an average, its leaves replace those of `state['params']` (frozen
  leaves, which are not averaged, stay).
  """
  opt_state = state.get('opt_state')
  if not (isinstance(opt_state, Mapping) and 'ema_params' in opt_state):
    return state['params']
  flat = flax.traverse_util.flatten_dict(state['params'])
  flat.update(flax.traverse_util.flatten_dict(opt_state['ema_params']))
  return flax.traverse_util.unflatten_dict(flat)

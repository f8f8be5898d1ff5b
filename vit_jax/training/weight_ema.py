"""An exponential moving average (EMA) of the trained weights.

Bias-corrected: after update t it is sum_s decay^(t-s) params_s over
sum_s decay^(t-s), starting at the first update's parameters. It lives in
the optimizer state, so checkpoints and every parallelism carry it.
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
  """`tx` whose state also averages the parameters; its updates are unchanged.

  `decay` is in (0, 1); the average spans about 1 / (1 - decay) updates. The
  result's `update` needs `params`.
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
    keep = decay * (1 - decay**(t - 1)) / (1 - decay**t)
    ema = jax.tree_util.tree_map(
        lambda e, p: (keep * e + (1 - keep) * p).astype(e.dtype),
        state.ema_params, new_params)
    return updates, WeightEmaState(count, ema, inner)

  return optax.GradientTransformation(init, update)


def averaged_params(params: Any, opt_state: Any, mask: Any = None) -> Any:
  """`params` with the trained leaves (`mask`) replaced by their average.

  `params` itself when `opt_state` keeps no average.
  """
  if not isinstance(opt_state, WeightEmaState):
    return params
  merge_with_frozen = trainable.partition(params, mask)[2]
  return merge_with_frozen(opt_state.ema_params)


def checkpoint_params(state: Mapping[str, Any]) -> Any:
  """The parameters of a train state restored without a template.

  Averaged leaves replace those of `state['params']` where the state has them.
  """
  opt_state = state.get('opt_state')
  if not (isinstance(opt_state, Mapping) and 'ema_params' in opt_state):
    return state['params']
  flat = flax.traverse_util.flatten_dict(state['params'])
  flat.update(flax.traverse_util.flatten_dict(opt_state['ema_params']))
  return flax.traverse_util.unflatten_dict(flat)

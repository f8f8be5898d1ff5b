"""Optimizers of the paper's recipes (SPEC section 6), built from a config.

Fine-tuning (Appendix B.1.1): SGD with momentum 0.9, the momentum buffer in
bfloat16 as in the original, global-norm clipping before momentum, no weight
decay. Pre-training (Table 3): Adam (0.9, 0.999) with decoupled weight decay.
All of them follow `utils.create_learning_rate_schedule`.
"""

from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vit_jax import utils
from vit_jax.training import weight_ema

OPTIMIZERS = ('sgd_momentum', 'adam', 'adamw')


def _decay_mask(params: Any) -> Any:
  """Decays weight matrices (kernels, embeddings), not biases or LayerNorm."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


LrFn = Callable[[Any], jax.Array]


def make_optimizer(config: ml_collections.ConfigDict
                  ) -> Tuple[optax.GradientTransformation, LrFn]:
  """Builds the optimizer and learning-rate schedule of `config`.

  Fields read: optimizer ('sgd_momentum', 'adam' or 'adamw'), total_steps,
  base_lr, decay_type, warmup_steps, linear_end, grad_norm_clip (0 or None for
  no clipping), momentum, optim_dtype (SGD momentum buffer / Adam first
  moment), adam_b1, adam_b2, weight_decay (adamw; optax multiplies it by the
  learning rate, the paper's "decoupled" kind), ema_decay (0 or None: no
  average of the weights; `weight_ema.with_weight_ema`).

  Args:
    config: the experiment config.

  Returns:
    (tx, lr_fn): the optax transformation and `step -> learning rate`.
  """
  name = config.get('optimizer', 'sgd_momentum')
  if name not in OPTIMIZERS:
    raise ValueError(f'Unknown config.optimizer {name!r}; use one of '
                     f'{OPTIMIZERS}.')
  lr_fn = utils.create_learning_rate_schedule(
      config.total_steps, config.base_lr, config.decay_type,
      config.warmup_steps, linear_end=config.get('linear_end', 1e-5))
  dtype = config.get('optim_dtype', None)
  dtype = jnp.dtype(dtype) if dtype else None
  weight_decay = config.get('weight_decay', 0.0) or 0.0
  if name == 'sgd_momentum':
    if weight_decay:
      raise ValueError(
          'config.weight_decay is not used by sgd_momentum (the paper '
          'fine-tunes without weight decay); set it to 0 or use '
          '--config.optimizer=adamw.')
    opt = optax.sgd(lr_fn, momentum=config.get('momentum', 0.9),
                    accumulator_dtype=dtype)
  elif name == 'adam':
    if weight_decay:
      raise ValueError('config.weight_decay needs --config.optimizer=adamw.')
    opt = optax.adam(lr_fn, b1=config.get('adam_b1', 0.9),
                     b2=config.get('adam_b2', 0.999), mu_dtype=dtype)
  else:
    opt = optax.adamw(lr_fn, b1=config.get('adam_b1', 0.9),
                      b2=config.get('adam_b2', 0.999), mu_dtype=dtype,
                      weight_decay=weight_decay, mask=_decay_mask)
  clip = config.get('grad_norm_clip', None)
  if clip:
    opt = optax.chain(optax.clip_by_global_norm(clip), opt)
  ema_decay = config.get('ema_decay', 0.0)
  if ema_decay:
    opt = weight_ema.with_weight_ema(opt, ema_decay)
  return opt, lr_fn

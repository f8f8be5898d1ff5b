"""Optimizers of the paper's recipes, built from a config.

Fine-tuning (Appendix B.1.1): SGD with momentum 0.9 (bfloat16 buffer as in
the original), global-norm clipping, no weight decay. Pre-training (Table 3):
Adam (0.9, 0.999) with decoupled weight decay.
"""

from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vit_jax import utils
from vit_jax.configs import choices
from vit_jax.training import weight_ema


def _decay_mask(params: Any) -> Any:
  """Decays weight matrices (kernels, embeddings), not biases or LayerNorm."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


LrFn = Callable[[Any], jax.Array]


def make_optimizer(
    config: ml_collections.ConfigDict
) -> Tuple[optax.GradientTransformation, LrFn]:
  """(tx, lr_fn): the optax optimizer and learning-rate schedule of `config`.

  Reads optimizer ('sgd_momentum', 'adam', 'adamw'), the schedule fields,
  grad_norm_clip (0/None: none), momentum, optim_dtype, adam_b1, adam_b2,
  weight_decay (adamw; scaled by the learning rate) and ema_decay (0/None: no
  weight average).
  """
  name = config.get('optimizer', 'sgd_momentum')
  if name not in choices.OPTIMIZERS:
    raise ValueError(f'Unknown config.optimizer {name!r}; use one of '
                     f'{choices.OPTIMIZERS}.')
  lr_fn = utils.create_learning_rate_schedule(
      config.total_steps,
      config.base_lr,
      config.decay_type,
      config.warmup_steps,
      linear_end=config.get('linear_end', 1e-5))
  dtype = config.get('optim_dtype', None)
  dtype = jnp.dtype(dtype) if dtype else None
  weight_decay = config.get('weight_decay', 0.0) or 0.0
  if name == 'sgd_momentum':
    if weight_decay:
      raise ValueError(
          'config.weight_decay is not used by sgd_momentum (the paper '
          'fine-tunes without weight decay); set it to 0 or use '
          '--config.optimizer=adamw.')
    opt = optax.sgd(
        lr_fn, momentum=config.get('momentum', 0.9), accumulator_dtype=dtype)
  elif name == 'adam':
    if weight_decay:
      raise ValueError('config.weight_decay needs --config.optimizer=adamw.')
    opt = optax.adam(
        lr_fn,
        b1=config.get('adam_b1', 0.9),
        b2=config.get('adam_b2', 0.999),
        mu_dtype=dtype)
  else:
    opt = optax.adamw(
        lr_fn,
        b1=config.get('adam_b1', 0.9),
        b2=config.get('adam_b2', 0.999),
        mu_dtype=dtype,
        weight_decay=weight_decay,
        mask=_decay_mask)
  clip = config.get('grad_norm_clip', None)
  if clip:
    opt = optax.chain(optax.clip_by_global_norm(clip), opt)
  ema_decay = config.get('ema_decay', 0.0)
  if ema_decay:
    opt = weight_ema.with_weight_ema(opt, ema_decay)
  return opt, lr_fn

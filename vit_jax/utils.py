"""The original's training helpers: learning-rate schedule, gradient
accumulation and log file, with the original's signatures.
"""

import logging as python_logging
from typing import Any, Callable, Tuple

from absl import logging
import jax
import jax.numpy as jnp

from vit_jax.configs import choices
from vit_jax.data import filesystem


def create_learning_rate_schedule(
    total_steps: int,
    base: float,
    decay_type: str,
    warmup_steps: int,
    linear_end: float = 1e-5) -> Callable[[Any], jax.Array]:
  """Linear warmup, then cosine or linear decay to `linear_end`.

  With `progress = clip((step - warmup) / (total - warmup), 0, 1)`: cosine
  `base * 0.5 * (1 + cos(pi * progress))`, linear `linear_end + (base -
  linear_end) * (1 - progress)`, both times `min(1, step / warmup)`; so the
  first update (step 0) has learning rate 0, as in the original.

  Returns:
    `step -> learning rate` (a float32 scalar), usable as an optax schedule.
  """
  if decay_type not in choices.DECAY_TYPES:
    raise ValueError(f'Unknown decay_type {decay_type!r}; use one of '
                     f'{choices.DECAY_TYPES}.')
  if total_steps < warmup_steps or total_steps <= 0:
    raise ValueError(
        f'total_steps ({total_steps}) must be positive and at least '
        f'warmup_steps ({warmup_steps}); lower --config.warmup_steps or raise '
        '--config.total_steps.')
  # total == warmup (the original's Pets/Flowers presets: 500 and 500) is pure
  # warmup; the original divided by zero there, which only its never-used
  # final step (optax counts 0..total-1) would have seen.
  decay_steps = max(total_steps - warmup_steps, 1)

  def step_fn(step):
    lr = base
    progress = (step - warmup_steps) / float(decay_steps)
    progress = jnp.clip(progress, 0.0, 1.0)
    if decay_type == 'linear':
      lr = linear_end + (lr - linear_end) * (1.0 - progress)
    else:
      lr = lr * 0.5 * (1. + jnp.cos(jnp.pi * progress))
    if warmup_steps:
      lr = lr * jnp.minimum(1., step / warmup_steps)
    return jnp.asarray(lr, dtype=jnp.float32)

  return step_fn


def accumulate_gradient(loss_and_grad_fn: Callable[..., Tuple[jax.Array, Any]],
                        params: Any, images: jax.Array, labels: jax.Array,
                        accum_steps: int) -> Tuple[jax.Array, Any]:
  """Mean loss and gradient over `accum_steps` equal slices of the batch.

  Only one slice's activations live at a time; with equal slices the means
  equal the full batch's.

  Args:
    loss_and_grad_fn: `(params, images, labels) -> (loss, grads)`.
    accum_steps: number of slices; 0 or 1 computes the batch at once.
  """
  if not accum_steps or accum_steps <= 1:
    return loss_and_grad_fn(params, images, labels)
  batch = images.shape[0]
  if batch % accum_steps:
    raise ValueError(
        f'The per-device batch {batch} is not divisible by accum_steps '
        f'{accum_steps}; choose accum_steps dividing it.')
  step_size = batch // accum_steps
  images_AxBx = images.reshape((accum_steps, step_size) + images.shape[1:])
  labels_AxBx = labels.reshape((accum_steps, step_size) + labels.shape[1:])

  def add_slice(i, loss_and_grads):
    loss_i, grads_i = loss_and_grad_fn(params, images_AxBx[i], labels_AxBx[i])
    loss, grads = loss_and_grads
    return loss + loss_i, jax.tree_util.tree_map(jnp.add, grads, grads_i)

  first = loss_and_grad_fn(params, images_AxBx[0], labels_AxBx[0])
  loss, grads = jax.lax.fori_loop(1, accum_steps, add_slice, first)
  return jax.tree_util.tree_map(lambda x: x / accum_steps, (loss, grads))


def add_gfile_logger(workdir: str,
                     *,
                     basename: str = 'train',
                     level: int = python_logging.INFO) -> None:
  """Appends the Python log to `{workdir}/{basename}.log` (local or gs://)."""
  filesystem.makedirs(workdir)
  stream = filesystem.open_file(
      filesystem.join(workdir, f'{basename}.log'), 'a')
  handler = python_logging.StreamHandler(stream)
  handler.setLevel(level)
  handler.setFormatter(logging.PythonFormatter())
  python_logging.getLogger('').addHandler(handler)

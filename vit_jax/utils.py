"""The original's training helpers: learning-rate schedule, accumulation, and
its log file (`add_gfile_logger`).

They keep the original's signatures (SPEC section 8) so code written for
google-research/vision_transformer runs unchanged.
"""

import logging as python_logging
from typing import Any, Callable, Tuple

from absl import logging
import jax
import jax.numpy as jnp

from vit_jax.data import filesystem

DECAY_TYPES = ('cosine', 'linear')


def create_learning_rate_schedule(
    total_steps: int, base: float, decay_type: str, warmup_steps: int,
    linear_end: float = 1e-5) -> Callable[[Any], jax.Array]:
  """Linear warmup, then cosine or linear decay (SPEC section 6).

  `progress = clip((step - warmup) / (total - warmup), 0, 1)`; cosine gives
  `base * 0.5 * (1 + cos(pi * progress))`, linear
  `linear_end + (base - linear_end) * (1 - progress)`; both are multiplied by
  `min(1, step / warmup)`. optax counts updates from 0, so the first update
  uses learning rate 0 when `warmup_steps > 0`, as in the original.

  Args:
    total_steps: number of updates of the run.
    base: peak learning rate.
    decay_type: 'cosine' or 'linear'.
    warmup_steps: steps of linear warmup (0 for none).
    linear_end: final learning rate of the linear decay.

  Returns:
    `step -> learning rate` (a float32 scalar), usable as an optax schedule.
  """
  if decay_type not in DECAY_TYPES:
    raise ValueError(f'Unknown decay_type {decay_type!r}; use one of '
                     f'{DECAY_TYPES}.')
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
                        params: Any,
                        images: jax.Array,
                        labels: jax.Array,
                        accum_steps: int) -> Tuple[jax.Array, Any]:
  """Mean loss and gradient over `accum_steps` equal slices of the batch.

  Trades time for memory: only one slice's activations live at a time. With
  equal slices the averages equal the full batch's loss and gradient (SPEC
  section 6).

  Args:
    loss_and_grad_fn: `(params, images, labels) -> (loss, grads)`, e.g.
      `jax.value_and_grad(loss_fn)`.
    params: the parameters.
    images: [batch, H, W, C].
    labels: [batch, classes].
    accum_steps: number of slices; 0 or 1 computes the batch at once.

  Returns:
    (loss, grads) averaged over the slices.
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


def add_gfile_logger(workdir: str, *, basename: str = 'train',
                     level: int = python_logging.INFO) -> None:
  """Appends the Python log to `{workdir}/{basename}.log` (any path of
  `vit_jax.data.filesystem`, e.g. gs://...), line by line."""
  filesystem.makedirs(workdir)
  stream = filesystem.open_file(
      filesystem.join(workdir, f'{basename}.log'), 'a')
  handler = python_logging.StreamHandler(stream)
  handler.setLevel(level)
  handler.setFormatter(logging.PythonFormatter())
  python_logging.getLogger('').addHandler(handler)

"""What a train step optimises and what an evaluation counts.

`config.objective`: supervised classification, or masked patch prediction
(paper, Section 4.6; `vit_jax.models_mpp`).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import models_mpp

# ------------------------------------------------------------------- losses


def softmax_xent(*, logits, labels):
  """Softmax cross-entropy on one-hot (or soft) labels, mean over examples."""
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.sum(logp * labels, axis=-1))


def sigmoid_xent(*, logits, labels):
  """Per-class sigmoid cross-entropy (multi-label), mean over examples."""
  log_p = jax.nn.log_sigmoid(logits)
  log_not_p = jax.nn.log_sigmoid(-logits)
  return -jnp.mean(jnp.sum(labels * log_p + (1. - labels) * log_not_p, axis=-1))


# The loss of each of choices.LOSS_NAMES.
LOSSES = {'softmax_xent': softmax_xent, 'sigmoid_xent': sigmoid_xent}

# --------------------------------------------------------- train / eval step


def make_loss_fn(model,
                 config: ml_collections.ConfigDict) -> Callable[..., jax.Array]:
  """`loss_fn(params, images, labels, rng) -> mean loss` of config.objective.

  For 'mpp', `labels` carry example indices (`mpp_labels`); the first is
  folded into `rng` so every micro-batch draws its own corruption.
  """
  objective = config.get('objective') or 'classification'
  if objective == 'mpp':

    def mpp_loss(params, images, labels, rng):
      rng = jax.random.fold_in(rng, labels.reshape(-1)[0].astype(jnp.uint32))
      return models_mpp.loss_fn(params, images, rng, model=model)

    return mpp_loss
  return classification_loss_fn(model.apply,
                                config.get('loss') or 'softmax_xent',
                                config.get('label_smoothing') or 0.)


def classification_loss_fn(
    apply_fn: Callable[..., Any],
    loss: str = 'softmax_xent',
    label_smoothing: float = 0.) -> Callable[..., jax.Array]:
  """`loss_fn(params, images, labels, rng)`: label-smoothed `LOSSES[loss]`."""
  if loss not in LOSSES:
    raise ValueError(f'Unknown loss {loss!r}; use one of {sorted(LOSSES)}.')
  loss_of = LOSSES[loss]

  def loss_fn(params, images, labels, rng):
    logits = apply_fn({'params': params},
                      images,
                      train=True,
                      rngs={'dropout': rng})
    if label_smoothing:
      labels = (1. - label_smoothing) * labels + (
          label_smoothing / labels.shape[-1])
    return loss_of(logits=logits, labels=labels)

  return loss_fn


def mpp_labels(batch_shape) -> np.ndarray:
  """Example indices [..., b, 1] (int32): the 'labels' of an MPP batch."""
  *lead, b = batch_shape
  return np.broadcast_to(np.arange(b, dtype=np.int32)[:, None],
                         (*lead, b, 1)).copy()


def top1_counts(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """`counts(params, batch) -> (correct, count)` of top-1 classification.

  Correct: the top-1 class is one of the labels; `batch['mask']` drops padding.
  """

  def counts(params, batch):
    logits = apply_fn({'params': params}, batch['image'], train=False)
    top1 = jnp.argmax(logits, axis=-1)
    hit = jnp.take_along_axis(batch['label'], top1[:, None], axis=-1)[:, 0]
    return jnp.sum((hit > 0) * batch['mask']), jnp.sum(batch['mask'])

  return counts


def top1_confusion(apply_fn: Callable[..., Any],
                   num_classes: int) -> Callable[..., Any]:
  """`confusion(params, batch) -> [classes, classes]` counts of one batch.

  Rows: the true class (label argmax); columns: the top-1 class; padding out.
  """

  def confusion(params, batch):
    logits = apply_fn({'params': params}, batch['image'], train=False)
    true_BxK = jax.nn.one_hot(jnp.argmax(batch['label'], -1), num_classes)
    pred_BxK = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
    return jnp.einsum('bi,bj->ij', true_BxK * batch['mask'][:, None], pred_BxK)

  return confusion


def mpp_counts(model) -> Callable[..., Any]:
  """`counts(params, batch) -> (correct, count)` of masked patch prediction.

  Counts corrupted patches whose 3-bit mean colour is right; the masks use a
  fixed key, so every evaluation sees the same ones.
  """

  def counts(params, batch):
    logits, chosen = model.apply({'params': params},
                                 batch['image'],
                                 train=False,
                                 rngs={'mpp': jax.random.PRNGKey(0)})
    targets = models_mpp.mean_color_targets(batch['image'], model.stride,
                                            model.color_bits)
    weight = chosen * batch['mask'][:, None]
    correct = (jnp.argmax(logits, -1) == targets) * weight
    return jnp.sum(correct), jnp.sum(weight)

  return counts


def make_counts_fn(model, config) -> Callable[..., Any]:
  """The evaluation counts of config.objective."""
  if (config.get('objective') or 'classification') == 'mpp':
    return mpp_counts(model)
  return top1_counts(model.apply)

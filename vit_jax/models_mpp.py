"""Masked patch prediction, the paper's self-supervised pre-training.

Paper Sec. 4.6 and Appendix B.1.2, after BERT: 50% of the patch embeddings
are chosen; of those, 80% become a learnable [mask] embedding, 10% a random
other patch embedding, 10% stay. The model predicts each chosen patch's mean
colour, 3 bits per channel (512 classes), with softmax cross-entropy.

`MaskedPatchPredictor` builds the ViT's parameters under the ViT's names plus
`mask_token` and `mpp_head`, so it fine-tunes like any ViT (no `pre_logits`:
fine-tune with `representation_size=None`). Where the paper is silent: exactly
round(0.5 * N) patches per image; random replacements come from the batch's
clean patch embeddings; corruption acts before the class token and position
embedding; `mask_token` starts normal(0.02); bin = floor(mean / 32).
"""

import functools
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vit_jax import models
from vit_jax import models_vit

Array = Any
Params = Any

MPP_PARAMS = ('mask_token', 'mpp_head')


def num_color_classes(bits: int = 3) -> int:
  return 2**(3 * bits)


def mean_color_targets(images: Array, patch_size, bits: int = 3) -> Array:
  """The mean-colour class of each patch, [B, gh*gw] int32 (row-major grid).

  `images` are floats in [-1, 1] or integer pixels in [0, 255]; `patch_size`
  is (ph, pw) or an int (a hybrid's: `model.stride`). The class is
  r * 2^(2 bits) + g * 2^bits + b, each channel's bin floor(mean / 2^(8-bits)).
  """
  ph, pw = (patch_size,
            patch_size) if isinstance(patch_size, int) else tuple(patch_size)
  b, h, w, c = images.shape
  if c != 3:
    raise ValueError(f'Mean-colour targets need RGB images; got {c} channels.')
  if h % ph or w % pw:
    raise ValueError(f'Image size {h}x{w} is not a multiple of the patch size '
                     f'{ph}x{pw}.')
  if jnp.issubdtype(images.dtype, jnp.integer):
    pixels = images.astype(jnp.float32)
  else:
    pixels = (images.astype(jnp.float32) + 1.0) * 127.5
  means = pixels.reshape(b, h // ph, ph, w // pw, pw, 3).mean(axis=(2, 4))
  levels = 2**bits
  # [-1, 1] -> [0, 255] is inexact in float32 (32 comes back as 31.99999);
  # a 1e-3 pixel nudge puts exact bin edges in the upper bin, as for integers.
  q = jnp.clip(jnp.floor((means + 1e-3) / (256.0 / levels)), 0,
               levels - 1).astype(jnp.int32)
  classes = (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]
  return classes.reshape(b, -1)


def corrupt(rng: jax.Array,
            tokens_BxNxD: Array,
            mask_token: Array,
            *,
            mask_ratio: float = 0.5,
            mask_prob: float = 0.8,
            random_prob: float = 0.1) -> Tuple[Array, Array]:
  """BERT-style corruption of patch embeddings [B, N, D].

  round(mask_ratio * N) patches per image are chosen; each becomes
  `mask_token` with `mask_prob`, a random other patch embedding of the batch
  with `random_prob`, else stays. Returns (corrupted tokens, chosen [B, N]
  bool).
  """
  b, n, d = tokens_BxNxD.shape
  if not 0 <= mask_ratio <= 1 or mask_prob < 0 or random_prob < 0 or (
      mask_prob + random_prob > 1):
    raise ValueError(f'Need 0 <= mask_ratio <= 1 and mask_prob + random_prob '
                     f'<= 1; got {mask_ratio}, {mask_prob}, {random_prob}.')
  if random_prob and b * n < 2:
    raise ValueError('Replacing by a random other patch needs at least two '
                     'patches in the batch.')
  rng_choose, rng_kind, rng_other = jax.random.split(rng, 3)
  num_chosen = int(round(mask_ratio * n))
  # A uniformly random subset of exactly num_chosen patches per image.
  rank_BxN = jnp.argsort(
      jnp.argsort(jax.random.uniform(rng_choose, (b, n)), axis=1), axis=1)
  chosen_BxN = rank_BxN < num_chosen
  u_BxN = jax.random.uniform(rng_kind, (b, n))
  use_mask = chosen_BxN & (u_BxN < mask_prob)
  use_random = chosen_BxN & (u_BxN >= mask_prob) & (
      u_BxN < mask_prob + random_prob)
  # Uniform over the other b*n - 1 patches: draw from b*n - 1 and skip self.
  self_BxN = jnp.arange(b * n).reshape(b, n)
  other_BxN = jax.random.randint(rng_other, (b, n), 0, max(b * n - 1, 1))
  other_BxN = other_BxN + (other_BxN >= self_BxN)
  random_BxNxD = tokens_BxNxD.reshape(b * n, d)[other_BxN]
  out = jnp.where(use_mask[..., None], mask_token.astype(tokens_BxNxD.dtype),
                  tokens_BxNxD)
  out = jnp.where(use_random[..., None], random_BxNxD, out)
  return out, chosen_BxN


class MaskedPatchPredictor(models_vit.VisionTransformer):
  """A ViT with BERT-style corruption and a mean-colour head on every patch.

  Encoder fields mean what they mean in `VisionTransformer`; pooling,
  `pre_logits` and `head` are unused (pass `num_classes=None`).
  `mask_ratio`, `mask_prob` and `random_prob` are `corrupt`'s; `color_bits`
  gives the target's bits per channel.
  """
  mask_ratio: float = 0.5
  mask_prob: float = 0.8
  random_prob: float = 0.1
  color_bits: int = 3

  @nn.compact
  def __call__(self, inputs, *, train: bool, corrupt_patches: bool = True):
    """Mean-colour logits [B, N, classes] and chosen [B, N] for each patch.

    `corrupt_patches=False` feeds clean patches (all chosen), for probing.
    Rngs: 'dropout' when `train`, 'mpp' when corrupting.
    """
    if self.transformer is None:
      raise ValueError('Masked patch prediction needs a transformer.')
    self._check_inputs(inputs)
    # The ViT's own stem and patch embedding (same names, init, dtype path).
    x = models_vit.embed_patches(self, inputs)
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)

    # Corrupt the patch embeddings before the class token and the position
    # embedding are added (paper Sec. 4.6: "corrupting 50% of patch
    # embeddings").
    mask_token = self.param('mask_token', nn.initializers.normal(0.02), (d,))
    if corrupt_patches:
      x, chosen = corrupt(
          self.make_rng('mpp'),
          x,
          mask_token,
          mask_ratio=self.mask_ratio,
          mask_prob=self.mask_prob,
          random_prob=self.random_prob)
    else:
      chosen = jnp.ones((b, gh * gw), bool)

    prefix = int(self.has_class_token)
    if prefix:
      cls = self.param('cls', nn.initializers.zeros, (1, 1, d))
      x = jnp.concatenate([jnp.tile(cls, [b, 1, 1]).astype(x.dtype), x], axis=1)
    x = self.encoder(
        name='Transformer', **self.transformer, **self._encoder_extra_kwargs())(
            x, train=train, grid=(gh, gw), num_prefix_tokens=prefix)
    logits = nn.Dense(
        num_color_classes(self.color_bits),
        dtype=models_vit.EDGE_DTYPE,
        kernel_init=nn.initializers.zeros,
        name='mpp_head')(
            x[:, prefix:])
    return logits.astype(jnp.float32), chosen


def get_model(name: str, **kw) -> MaskedPatchPredictor:
  """The MPP model of zoo model `name` ('ViT-B_16'); `kw` overrides fields."""
  return models.from_config(models.MODEL_CONFIGS[models.canonical_name(name)],
                            MaskedPatchPredictor, **kw)


def to_vit_params(params: Params) -> Params:
  """Drops `mask_token` and `mpp_head`: a VisionTransformer's tree remains."""
  return {k: v for k, v in params.items() if k not in MPP_PARAMS}


def loss_fn(params: Params,
            images: Array,
            rng: jax.Array,
            *,
            model: MaskedPatchPredictor,
            train: bool = True,
            with_accuracy: bool = False):
  """Softmax cross-entropy of the mean colour, over the chosen patches only.

  Returns the batch's mean loss, and with `with_accuracy` also the accuracy
  on the chosen patches; `rng` is split for corruption and dropout.
  """
  rng_mpp, rng_dropout = jax.random.split(rng)
  logits_BxNxC, chosen_BxN = model.apply({'params': params},
                                         images,
                                         train=train,
                                         rngs={
                                             'mpp': rng_mpp,
                                             'dropout': rng_dropout
                                         })
  targets_BxN = mean_color_targets(images, model.stride, model.color_bits)
  ce_BxN = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxNxC, targets_BxN)
  weight = chosen_BxN.astype(jnp.float32)
  count = jnp.maximum(weight.sum(), 1.0)
  loss = (ce_BxN * weight).sum() / count
  if not with_accuracy:
    return loss
  correct = (jnp.argmax(logits_BxNxC, -1) == targets_BxN).astype(jnp.float32)
  return loss, (correct * weight).sum() / count


def make_loss_fn(model: MaskedPatchPredictor, train: bool = True):
  """`loss_fn` bound to `model`: (params, images, rng) -> scalar loss."""
  return functools.partial(loss_fn, model=model, train=train)


def init(model: MaskedPatchPredictor, rng: jax.Array,
         image_size: int) -> Params:
  """Initial parameters for images of `image_size` x `image_size`."""
  rng_params, rng_mpp = jax.random.split(rng)

  @jax.jit
  def init_fn(rng_params, rng_mpp):
    return model.init({
        'params': rng_params,
        'mpp': rng_mpp
    },
                      jnp.zeros((1, image_size, image_size, 3)),
                      train=False)['params']

  return init_fn(rng_params, rng_mpp)

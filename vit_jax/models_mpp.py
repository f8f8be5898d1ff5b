"""Masked patch prediction, the paper's self-supervised pre-training.

Paper Sec. 4.6 and Appendix B.1.2 (SPEC section 7), after BERT's masked
language modelling: 50% of the patch embeddings are chosen for prediction; of
those, 80% are replaced by a learnable [mask] embedding, 10% by a random other
patch embedding and 10% are kept. The model predicts, from each chosen patch's
output token, the patch's 3-bit mean colour: the mean R, G, B in [0, 255],
each quantised to 3 bits, i.e. one of 512 classes. The loss is softmax
cross-entropy over the chosen patches only.

`MaskedPatchPredictor` is a `VisionTransformer` whose forward pass inserts
the corruption; it builds the ViT's own submodules under the ViT's names
(`embedding`, `cls`, `Transformer/...`, and for hybrids the ResNet stem), plus
`mask_token` and `mpp_head`. The tree fine-tunes like any other pre-trained
ViT: `checkpoint.load_pretrained` into a `VisionTransformer` of the same zoo
name ignores the two extras (`to_vit_params` drops them, for files meant for
exchange). As in the paper there is no `pre_logits` layer, so fine-tune with
`representation_size=None`.

Choices where the paper is silent, stated:
  * Exactly round(0.5 * N) patches are chosen per image (a uniformly random
    subset), so every image contributes the same number of targets; the
    80/10/10 split is drawn independently per chosen patch.
  * "A random other patch embedding" is drawn uniformly from all patch
    embeddings of the batch except the patch itself, before corruption.
  * The corruption acts on the patch embeddings (after `embedding`, before
    the class token and the position embedding), so a replaced patch keeps
    its own position.
  * `mask_token` is initialised normal(0.02), like BERT's embeddings.
  * Colour bins: floor(mean / 32), clipped to 0..7; class = 64 r + 8 g + b.
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

  Args:
    images: [B, H, W, 3]: float in [-1, 1] (the model's input, mapped back to
      [0, 255] by (x + 1) * 127.5), or integer pixels in [0, 255].
    patch_size: (ph, pw) in pixels (for a hybrid: `model.stride`), or an int.
    bits: bits per channel (3 -> 512 classes).

  Returns:
    64 r + 8 g + b for 3 bits (r, g, b = floor(mean / 32) in 0..7); in
    general r * 2^(2 bits) + g * 2^bits + b.
  """
  ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(
      patch_size)
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


def corrupt(rng: jax.Array, tokens_BxNxD: Array, mask_token: Array, *,
            mask_ratio: float = 0.5, mask_prob: float = 0.8,
            random_prob: float = 0.1) -> Tuple[Array, Array]:
  """BERT-style corruption of patch embeddings.

  Args:
    rng: PRNG key.
    tokens_BxNxD: patch embeddings.
    mask_token: the learnable [mask] embedding, [D].
    mask_ratio: fraction of patches chosen per image (round(ratio * N)).
    mask_prob: of the chosen, the probability of the [mask] embedding.
    random_prob: of the chosen, the probability of a random other patch
      embedding of the batch (the rest are kept unchanged).

  Returns:
    (corrupted tokens [B, N, D], chosen [B, N] bool): the loss is computed
    where `chosen`.
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
  rank_BxN = jnp.argsort(jnp.argsort(
      jax.random.uniform(rng_choose, (b, n)), axis=1), axis=1)
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
  out = jnp.where(use_mask[..., None],
                  mask_token.astype(tokens_BxNxD.dtype), tokens_BxNxD)
  out = jnp.where(use_random[..., None], random_BxNxD, out)
  return out, chosen_BxN


class MaskedPatchPredictor(models_vit.VisionTransformer):
  """A ViT with BERT-style corruption and a mean-colour head on every patch.

  A `VisionTransformer` subclass, so every field that shapes the encoder
  (patches, transformer, hidden_size, resnet, classifier, posemb, dtype and
  the speed switches) means the same and builds the same parameters; the
  pooling, `pre_logits` and `head` are not used (`num_classes`,
  `representation_size` and `head_bias_init` are ignored; `get_model` sets
  `num_classes=None`, which a direct construction must pass too).

  Attributes (beyond VisionTransformer's):
    mask_ratio, mask_prob, random_prob: see `corrupt`.
    color_bits: bits per channel of the target (3 -> 512 classes).
  """
  mask_ratio: float = 0.5
  mask_prob: float = 0.8
  random_prob: float = 0.1
  color_bits: int = 3

  @nn.compact
  def __call__(self, inputs, *, train: bool, corrupt_patches: bool = True):
    """Predicts mean-colour logits for every patch.

    Args:
      inputs: images [B, H, W, 3] in [-1, 1].
      train: enables dropout (rng 'dropout').
      corrupt_patches: apply the corruption (rng 'mpp'); False feeds the
        clean patches (for probing).

    Returns:
      (logits [B, N, classes] float32, chosen [B, N] bool; all True when not
      corrupting). N = patches (a hybrid's tokens), row-major.
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
      x, chosen = corrupt(self.make_rng('mpp'), x, mask_token,
                          mask_ratio=self.mask_ratio, mask_prob=self.mask_prob,
                          random_prob=self.random_prob)
    else:
      chosen = jnp.ones((b, gh * gw), bool)

    prefix = int(self.has_class_token)
    if prefix:
      cls = self.param('cls', nn.initializers.zeros, (1, 1, d))
      x = jnp.concatenate([jnp.tile(cls, [b, 1, 1]).astype(x.dtype), x],
                          axis=1)
    x = self.encoder(name='Transformer', **self.transformer,
                     **self._encoder_extra_kwargs())(
                         x, train=train, grid=(gh, gw),
                         num_prefix_tokens=prefix)
    logits = nn.Dense(num_color_classes(self.color_bits),
                      dtype=models_vit.EDGE_DTYPE,
                      kernel_init=nn.initializers.zeros,
                      name='mpp_head')(x[:, prefix:])
    return logits.astype(jnp.float32), chosen


def get_model(name: str, **kw) -> MaskedPatchPredictor:
  """The MPP model of zoo model `name` ('ViT-B_16'); `kw` overrides fields."""
  return models.from_config(models.MODEL_CONFIGS[models.canonical_name(name)],
                            MaskedPatchPredictor, **kw)


def to_vit_params(params: Params) -> Params:
  """Drops `mask_token` and `mpp_head`: a VisionTransformer's tree remains."""
  return {k: v for k, v in params.items() if k not in MPP_PARAMS}


def loss_fn(params: Params, images: Array, rng: jax.Array, *,
            model: MaskedPatchPredictor, train: bool = True,
            with_accuracy: bool = False):
  """Softmax cross-entropy of the mean colour, over the chosen patches only.

  Args:
    params: the MPP model's parameters.
    images: [B, H, W, 3] in [-1, 1].
    rng: PRNG key; split into the corruption's and dropout's.
    model: the MaskedPatchPredictor.
    train: dropout on.
    with_accuracy: also return the accuracy on the chosen patches.

  Returns:
    The mean loss over chosen patches of the batch (and the accuracy).
  """
  rng_mpp, rng_dropout = jax.random.split(rng)
  logits_BxNxC, chosen_BxN = model.apply(
      {'params': params}, images, train=train,
      rngs={'mpp': rng_mpp, 'dropout': rng_dropout})
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
    return model.init({'params': rng_params, 'mpp': rng_mpp},
                      jnp.zeros((1, image_size, image_size, 3)),
                      train=False)['params']
  return init_fn(rng_params, rng_mpp)


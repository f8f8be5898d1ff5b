"""The Vision Transformer (Dosovitskiy et al., ICLR 2021), as Flax linen modules.

Module and parameter names are those of Google's original `vit_jax`
(`Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/query/kernel`,
...), so its checkpoints map one to one (SPEC sections 1 and 4). Numerics
follow the original: pre-LayerNorm blocks with eps 1e-6, tanh-approximated
GELU, attention scaled by 1/sqrt(head_dim).

Beyond the original (defaults give the original's graph, bit for bit):
  * `posemb`: the position embeddings of the paper's ablation (Appendix D.4):
    learned 1-D (default), learned 2-D, none; plus fixed 2-D sin-cos
    (`vit_jax.layers.position_embeddings`).
  * Attention weights are sown into the `intermediates` collection, returned
    when the caller makes it mutable (`models.attention_weights`).
  * Bad input (rank, channels, sizes that are not multiples of the patch, a
    token count the position embedding does not have) raises a ValueError
    that names the sizes and the fix (`vit_jax.layers.image_checks`); the
    original silently cropped.
  * Speed switches, tested against the reference graph in
    `tests/test_speed_equivalence.py` and measured in docs/speed.md:
    `dtype=jnp.bfloat16` (bfloat16 matmul operands, float32 accumulation,
    `layers.mixed_precision`; the first and last layers stay `EDGE_DTYPE`),
    `attention_impl` (`layers.attention.IMPLS`), `token_only_last_block`
    (the last block computes the class token only), `scan` (one `nn.scan`
    body; parameters under `Transformer/encoderblock/...` with a layer axis,
    converted by `params.layouts`) and `remat_policy`
    (`layers.block_stack.REMAT_POLICIES`).
"""

import functools
from typing import Any, Callable, Optional, Tuple, Type

import flax.linen as nn
import jax.numpy as jnp

from vit_jax.layers import attention
from vit_jax.layers import block_stack
from vit_jax.layers import image_checks
from vit_jax.layers import mixed_precision
from vit_jax.layers import position_embeddings
from vit_jax import models_resnet

Array = Any
Dtype = Any
Initializer = Callable[..., Array]

CLASSIFIERS = ('token', 'gap', 'unpooled', 'token_unpooled')
POSEMB_TYPES = ('learn', 'learn_2d', 'sincos2d', 'none')
# Compute dtype of the first and last layers (patch embedding, encoder_norm
# output, pre_logits, head) whatever the model's `dtype`: keeping them in
# float32 under bfloat16 measured +0.36 points on the embedded job (5 seeds).
EDGE_DTYPE = jnp.float32


class IdentityLayer(nn.Module):
  """Identity, named so that its output can be captured (e.g. `pre_logits`)."""

  @nn.compact
  def __call__(self, x):
    return x


class AddPositionEmbs(nn.Module):
  """Adds a learned 1-D position embedding (one row per token) to the inputs.

  Attributes:
    posemb_init: initializer of the (1, num_tokens, hidden) table.
    param_dtype: dtype of the table.
  """
  posemb_init: Initializer
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs):
    if inputs.ndim != 3:
      raise ValueError(
          f'AddPositionEmbs expects tokens [batch, len, emb]; got {inputs.shape}')
    pos_emb_shape = (1, inputs.shape[1], inputs.shape[2])
    pe = self.param('pos_embedding', self.posemb_init, pos_emb_shape,
                    self.param_dtype)
    return inputs + pe


class MlpBlock(nn.Module):
  """Transformer MLP: Dense(mlp_dim) -> GELU -> Dropout -> Dense(out) -> Dropout."""

  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  out_dim: Optional[int] = None
  dropout_rate: float = 0.1
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.normal(stddev=1e-6)
  approximate_gelu: bool = True

  @nn.compact
  def __call__(self, inputs, *, deterministic):
    actual_out_dim = inputs.shape[-1] if self.out_dim is None else self.out_dim
    dense = functools.partial(
        nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=self.kernel_init, bias_init=self.bias_init,
        **mixed_precision.matmul_kwargs(self.dtype))
    x = dense(features=self.mlp_dim)(inputs)
    # tanh approximation, as the original (SPEC section 1); exact (erf) GELU
    # for weights trained elsewhere (Hugging Face, torchvision).
    x = nn.gelu(x, approximate=self.approximate_gelu)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    output = dense(features=actual_out_dim)(x)
    output = nn.Dropout(rate=self.dropout_rate)(
        output, deterministic=deterministic)
    return output


class Encoder1DBlock(nn.Module):
  """Transformer encoder block, pre-LayerNorm (paper Eq. 2-3).

  Attributes:
    mlp_dim: dimension of the MLP's hidden layer.
    num_heads: number of attention heads.
    dtype: computation dtype.
    dropout_rate: dropout after attention and in the MLP.
    attention_dropout_rate: dropout on the attention weights.
    attention_impl: one of attention.IMPLS, see the module docstring.
    layernorm_epsilon: LayerNorm epsilon (1e-6; Hugging Face uses 1e-12).
    approximate_gelu: tanh-approximated GELU (the original) or exact.
    output_tokens: None (every token) or n: the block computes its output for
      the first n tokens only; they still attend to every token (keys and
      values of all). Every row of a block depends only on its own query, so
      those n rows are the full block's (see `VisionTransformer.
      token_only_last_block`); the output is [batch, n, emb].
  """

  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  attention_impl: str = 'reference'
  layernorm_epsilon: float = 1e-6
  approximate_gelu: bool = True
  output_tokens: Optional[int] = None

  @nn.compact
  def __call__(self, inputs, *, deterministic):
    if inputs.ndim != 3:
      raise ValueError(
          f'Encoder1DBlock expects [batch, len, emb]; got {inputs.shape}')

    x = nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=self.dtype)(inputs)
    queries, residual = x, inputs
    if self.output_tokens is not None:
      queries = x[:, :self.output_tokens]
      residual = inputs[:, :self.output_tokens]
    x = nn.MultiHeadDotProductAttention(
        **attention.attention_kwargs(self.attention_impl, self.dtype),
        dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        broadcast_dropout=False,
        deterministic=deterministic,
        dropout_rate=self.attention_dropout_rate,
        num_heads=self.num_heads,
        # Softmax in float32 also under a bfloat16 compute dtype; a no-op for
        # float32.
        force_fp32_for_softmax=True,
    )(queries, x, sow_weights=True)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = x + residual

    y = nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=self.dtype)(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype,
                 dropout_rate=self.dropout_rate,
                 approximate_gelu=self.approximate_gelu)(
                     y, deterministic=deterministic)
    return x + y


class Encoder(nn.Module):
  """Position embedding, `num_layers` encoder blocks and the final LayerNorm.

  Attributes:
    num_layers: number of encoder blocks.
    mlp_dim: dimension of the MLP's hidden layer.
    num_heads: number of attention heads.
    dropout_rate: dropout rate.
    attention_dropout_rate: dropout rate of the attention weights.
    add_position_embedding: the original's switch; False is `posemb='none'`.
    posemb: 'learn' (1-D, the paper's default), 'learn_2d', 'sincos2d' or
      'none'.
    dtype: computation dtype.
    attention_impl: one of attention.IMPLS, see the module docstring.
    scan: run the blocks as one `nn.scan` (parameters `encoderblock/...` with
      a leading layer axis instead of `encoderblock_{i}/...`).
    remat_policy: a key of block_stack.REMAT_POLICIES.
    layernorm_epsilon: LayerNorm epsilon of the blocks and `encoder_norm`.
    approximate_gelu: tanh-approximated GELU in the MLPs (the original).
    last_block_output_tokens: None, or n: the last block (and `encoder_norm`)
      computes the first n tokens only (`Encoder1DBlock.output_tokens`), and
      the encoder returns [batch, n, emb]. Needs `scan=False`.
  """

  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  add_position_embedding: bool = True
  posemb: str = 'learn'
  dtype: Dtype = jnp.float32
  attention_impl: str = 'reference'
  scan: bool = False
  remat_policy: str = 'none'
  layernorm_epsilon: float = 1e-6
  approximate_gelu: bool = True
  last_block_output_tokens: Optional[int] = None

  @nn.compact
  def __call__(self, x, *, train, grid=None, num_prefix_tokens=0):
    """Encodes tokens [batch, len, hidden].

    Args:
      x: tokens.
      train: enables dropout.
      grid: (rows, cols) of the patch grid; needed by the 2-D embeddings.
      num_prefix_tokens: tokens in front of the grid (class token).

    Returns:
      The encoded tokens after `encoder_norm`.
    """
    if x.ndim != 3:
      raise ValueError(f'Encoder expects [batch, len, emb]; got {x.shape}')
    x = self._add_position_embedding(x, train, grid, num_prefix_tokens)
    block = functools.partial(
        Encoder1DBlock,
        mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        num_heads=self.num_heads,
        dtype=self.dtype,
        layernorm_epsilon=self.layernorm_epsilon,
        approximate_gelu=self.approximate_gelu,
        **({} if self.attention_impl == 'reference' else
           {'attention_impl': self.attention_impl}))
    last = self.last_block_output_tokens
    x = block_stack.apply_blocks(
        block, x, num_layers=self.num_layers, train=train, scan=self.scan,
        remat_policy=self.remat_policy,
        last_block_kwargs=None if last is None else {'output_tokens': last})
    encoded = nn.LayerNorm(name='encoder_norm', epsilon=self.layernorm_epsilon,
                           dtype=EDGE_DTYPE)(x)
    return encoded

  def _add_position_embedding(self, x, train, grid, num_prefix_tokens):
    """`posembed_input` of the kind `posemb` says, then dropout."""
    if self.posemb not in POSEMB_TYPES:
      raise ValueError(f'Unknown posemb {self.posemb!r}; use one of '
                       f'{POSEMB_TYPES}.')
    posemb = self.posemb if self.add_position_embedding else 'none'
    if posemb in ('learn_2d', 'sincos2d') and grid is None:
      raise ValueError(f'posemb={posemb!r} needs the patch grid: call the '
                       'Encoder with grid=(rows, cols).')
    if posemb == 'none':
      return x
    posemb_init = nn.initializers.normal(stddev=0.02)  # BERT's.
    if posemb == 'learn':
      x = AddPositionEmbs(posemb_init=posemb_init, name='posembed_input')(x)
    else:
      x = position_embeddings.grid_embedding(
          posemb, grid=tuple(grid), num_prefix_tokens=num_prefix_tokens,
          posemb_init=posemb_init, name='posembed_input')(x)
    return nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)


def embed_patches(model: 'VisionTransformer', inputs):
  """The hybrid stem (if any) and the patch embedding: [B, gh, gw, hidden].

  Called inside a compact `__call__` of `VisionTransformer` or a model built on
  its tree (e.g. `masked_patch.MaskedPatchPredictor`): the submodules get the
  released checkpoints' top-level names (`conv_root`, `block1`, `embedding`).
  """
  x = inputs
  if model.resnet is not None:
    x = models_resnet.resnet_stem(
        x, width_factor=model.resnet.width_factor,
        num_layers=tuple(model.resnet.num_layers), dtype=model.dtype)
  return nn.Conv(
      features=model.hidden_size,
      kernel_size=model.patch_size,
      strides=model.patch_size,
      padding='VALID',
      dtype=EDGE_DTYPE,
      name='embedding')(x)


class VisionTransformer(nn.Module):
  """Vision Transformer, optionally with a ResNet stem (hybrid).

  Called as `model.apply({'params': params}, images, train=False)`; `images`
  are NHWC in [-1, 1]. With `train=True` dropout needs `rngs={'dropout': key}`.

  Attributes:
    num_classes: size of the head; 0/None for no head (features out).
    patches: ConfigDict with `size` = (ph, pw).
    transformer: ConfigDict of `Encoder` fields (num_layers, mlp_dim,
      num_heads, dropout_rate, attention_dropout_rate); None for a model
      without transformer (ResNet features only).
    hidden_size: token width D.
    resnet: ConfigDict with `num_layers` (per stage) and `width_factor` for
      hybrids; None for a pure ViT.
    representation_size: size of the tanh `pre_logits` layer (pre-training);
      None for none.
    classifier: 'token', 'gap', 'unpooled' or 'token_unpooled'.
    head_bias_init: initial head bias (-10 for ImageNet-21k pre-training).
    encoder: the encoder module class.
    model_name: zoo name, informational.
    posemb: position embedding, see `Encoder.posemb`.
    dtype: computation dtype; parameters are float32 whatever it is, and so
      are the logits.
    attention_impl: 'reference', 'xla' or 'cudnn'; see the module docstring.
    scan: `nn.scan` over the encoder blocks; see `Encoder.scan`.
    remat_policy: rematerialisation of the encoder blocks, a key of
      block_stack.REMAT_POLICIES.
    layernorm_epsilon: LayerNorm epsilon (the original's 1e-6; 1e-12 for
      Hugging Face weights).
    approximate_gelu: tanh-approximated GELU (the original) or exact (erf,
      Hugging Face and torchvision weights).
    token_only_last_block: with classifier='token', the last encoder block
      computes the class token's row only (its query, attention output, MLP;
      keys and values of every token), since nothing else of it reaches the
      head: about 10/12 of one block's work saved, same logits (to float
      rounding; tested). Not with `scan=True`, and skipped when attention
      weights are collected (`intermediates` mutable) so that the last
      block's weights keep all rows. With dropout the last block draws masks
      of another shape, i.e. other random numbers.
  """

  num_classes: Optional[int]
  patches: Any
  transformer: Any
  hidden_size: int
  resnet: Optional[Any] = None
  representation_size: Optional[int] = None
  classifier: str = 'token'
  head_bias_init: float = 0.
  encoder: Type[nn.Module] = Encoder
  model_name: Optional[str] = None
  posemb: str = 'learn'
  dtype: Dtype = jnp.float32
  attention_impl: str = 'reference'
  scan: bool = False
  remat_policy: str = 'none'
  layernorm_epsilon: float = 1e-6
  approximate_gelu: bool = True
  token_only_last_block: bool = False

  def __post_init__(self):
    for field, valid in (('classifier', CLASSIFIERS), ('posemb', POSEMB_TYPES),
                         ('attention_impl', attention.IMPLS),
                         ('remat_policy', tuple(block_stack.REMAT_POLICIES))):
      if getattr(self, field) not in valid:
        raise ValueError(f'Unknown {field} {getattr(self, field)!r}; use one '
                         f'of {valid}.')
    if self.token_only_last_block and self.scan:
      raise ValueError('token_only_last_block=True needs scan=False (under '
                       'nn.scan every block has the same shapes); set one of '
                       'them off.')
    super().__post_init__()

  @property
  def patch_size(self) -> Tuple[int, int]:
    return tuple(self.patches.size)

  @property
  def stride(self) -> Tuple[int, int]:
    """Pixels per token along (height, width): stem stride times patch size."""
    s = 1
    if self.resnet is not None:
      s = models_resnet.stem_stride(self.resnet.num_layers)
    ph, pw = self.patch_size
    return (s * ph, s * pw)

  @property
  def has_class_token(self) -> bool:
    return self.classifier in ('token', 'token_unpooled')

  def _check_inputs(self, inputs):
    """Fails early, with sizes and the fix, where the original cropped or
    crashed (`image_checks.check_images`)."""
    params = (None if self.is_initializing() or 'params' not in self.variables
              else self.variables['params'])
    image_checks.check_images(
        inputs, patch_size=self.patch_size, stride=self.stride,
        hybrid=self.resnet is not None, params=params,
        num_prefix_tokens=int(self.has_class_token),
        has_encoder=self.transformer is not None)

  @nn.compact
  def __call__(self, inputs, *, train):
    self._check_inputs(inputs)
    x = embed_patches(self, inputs)

    if self.transformer is not None:
      n, gh, gw, c = x.shape
      x = jnp.reshape(x, [n, gh * gw, c])
      if self.has_class_token:
        cls = self.param('cls', nn.initializers.zeros, (1, 1, c))
        cls = jnp.tile(cls, [n, 1, 1]).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1)
      extra = self._encoder_extra_kwargs()
      if (self.token_only_last_block and self.classifier == 'token' and
          not self.is_mutable_collection('intermediates')):
        extra['last_block_output_tokens'] = 1  # Only x[:, 0] is used below.
      x = self.encoder(name='Transformer', **self.transformer, **extra)(
          x, train=train, grid=(gh, gw),
          num_prefix_tokens=int(self.has_class_token))

    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = jnp.mean(x, axis=list(range(1, x.ndim - 1)))  # (1,) or (1, 2)
    # 'unpooled' and 'token_unpooled': the head is applied to every token.

    if self.representation_size is not None:
      x = nn.Dense(features=self.representation_size, dtype=EDGE_DTYPE,
                   name='pre_logits')(x)
      x = nn.tanh(x)
    else:
      x = IdentityLayer(name='pre_logits')(x)

    if self.num_classes:
      x = nn.Dense(
          features=self.num_classes,
          name='head',
          dtype=EDGE_DTYPE,
          kernel_init=nn.initializers.zeros,
          bias_init=nn.initializers.constant(self.head_bias_init))(x)
    return x.astype(jnp.float32)

  def _encoder_extra_kwargs(self):
    """Fields the model passes down unless the transformer config sets them:
    the dtype, and the others only when not at their default, so that a
    custom `encoder` class without these fields keeps working."""
    defaults = {'posemb': 'learn', 'attention_impl': 'reference',
                'scan': False, 'remat_policy': 'none',
                'layernorm_epsilon': 1e-6, 'approximate_gelu': True}
    extra = {k: getattr(self, k) for k, default in defaults.items()
             if getattr(self, k) != default}
    extra['dtype'] = self.dtype
    return {k: v for k, v in extra.items() if k not in self.transformer}

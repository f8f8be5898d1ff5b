"""The Vision Transformer (Dosovitskiy et al., ICLR 2021), as Flax linen modules.

Module and parameter names are those of Google's original `vit_jax`, so its
checkpoints map one to one; numerics follow it too (pre-LayerNorm, eps 1e-6,
tanh GELU). The defaults give the original's graph; beyond it: the position
embeddings of the paper's ablation (Appendix D.4: 1-D, 2-D, relative, none;
at the input, every layer or every layer shared) and fixed sin-cos,
attention weights sown into `intermediates`, input checks that name the fix
(`layers.image_checks`), and speed switches (`dtype`, `attention_impl`,
`token_only_last_block`, `scan`, `remat_policy`) tested against the
reference graph in tests/test_speed_equivalence.py (docs/speed.md).
"""

import dataclasses
import functools
from typing import Any, Callable, Optional, Tuple, Type

import flax.linen as nn
import jax.numpy as jnp

from vit_jax import models_resnet
from vit_jax.configs import choices
from vit_jax.layers import attention
from vit_jax.layers import block_stack
from vit_jax.layers import image_checks
from vit_jax.layers import mixed_precision
from vit_jax.layers import position_embeddings
from vit_jax.layers import relative_attention

Array = Any
Dtype = Any
Initializer = Callable[..., Array]

# Fields of the model that it hands down to its encoder.
_ENCODER_OPTIONS = ('posemb', 'posemb_where', 'attention_impl', 'scan',
                    'remat_policy', 'layernorm_epsilon', 'approximate_gelu')
# Compute dtype of the first and last layers (patch embedding, encoder_norm
# output, pre_logits, head) whatever the model's `dtype` (docs/speed.md).
EDGE_DTYPE = jnp.float32


class IdentityLayer(nn.Module):
  """Identity, named so that its output can be captured (e.g. `pre_logits`)."""

  @nn.compact
  def __call__(self, x):
    return x


# The original's learned 1-D table.
AddPositionEmbs = position_embeddings.AddPositionEmbs
posemb_module = position_embeddings.posemb_module


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> Dropout -> Dense(out_dim) -> Dropout."""

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
        nn.Dense,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=self.kernel_init,
        bias_init=self.bias_init,
        **mixed_precision.matmul_kwargs(self.dtype))
    x = dense(features=self.mlp_dim)(inputs)
    # tanh approximation as the original; exact (erf) for Hugging Face and
    # torchvision weights.
    x = nn.gelu(x, approximate=self.approximate_gelu)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    output = dense(features=actual_out_dim)(x)
    output = nn.Dropout(rate=self.dropout_rate)(
        output, deterministic=deterministic)
    return output


class Encoder1DBlock(nn.Module):
  """Transformer encoder block, pre-LayerNorm (paper Eq. 2-3).

  Attributes:
    attention_impl: one of `choices.ATTENTION_IMPLS`.
    output_tokens: None, or n: only the first n tokens' outputs are computed
      (they still attend to every token), giving [batch, n, emb].
    posemb_every_layer: None, or 'learn' / 'learn_2d': a table of the block's
      own (`posembed`) added to its input.
    relative_posemb: 1-D relative attention (`relative_attention`).
    grid, num_prefix_tokens: the tokens' layout, for the two above.
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
  posemb_every_layer: Optional[str] = None
  relative_posemb: bool = False
  grid: Optional[Tuple[int, int]] = None
  num_prefix_tokens: int = 0

  @nn.compact
  def __call__(self, inputs, shared_posemb=None, *, deterministic):
    """`shared_posemb` [1, tokens, hidden] is added to `inputs` first."""
    if shared_posemb is not None:
      inputs = inputs + shared_posemb
    if self.posemb_every_layer is not None:
      inputs = posemb_module(
          self.posemb_every_layer,
          grid=self.grid,
          num_prefix_tokens=self.num_prefix_tokens,
          name='posembed')(
              inputs)
    x = nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=self.dtype)(inputs)
    queries, residual = x, inputs
    if self.output_tokens is not None:
      queries = x[:, :self.output_tokens]
      residual = inputs[:, :self.output_tokens]
    x = nn.MultiHeadDotProductAttention(
        **self._attention_kwargs(x.shape[1], queries.shape[1], x.shape[2]),
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
    y = MlpBlock(
        mlp_dim=self.mlp_dim,
        dtype=self.dtype,
        dropout_rate=self.dropout_rate,
        approximate_gelu=self.approximate_gelu)(
            y, deterministic=deterministic)
    return x + y

  def _attention_kwargs(self, num_tokens, num_queries, hidden):
    """`attention.attention_kwargs`, with the relative bias if asked for."""
    kw = attention.attention_kwargs(self.attention_impl, self.dtype)
    if self.relative_posemb:
      kw['attention_fn'] = relative_attention.biased_attention_fn(
          kw.get('attention_fn', nn.dot_product_attention),
          num_heads=self.num_heads,
          num_prefix_tokens=self.num_prefix_tokens,
          num_tokens=num_tokens,
          num_queries=num_queries,
          hidden=hidden)
    return kw


class Encoder(nn.Module):
  """Position embedding, `num_layers` encoder blocks and the final LayerNorm.

  Attributes:
    add_position_embedding: the original's switch; False is `posemb='none'`.
    posemb: one of choices.POSEMB_TYPES ('learn' is the paper's 1-D).
    posemb_where: one of choices.POSEMB_WHERE, where the learned tables are added
      (`position_embeddings`).
    scan: the blocks as one `nn.scan`, parameters `encoderblock/...` with a
      leading layer axis.
    remat_policy: a key of `block_stack.REMAT_POLICIES`.
    last_block_output_tokens: `Encoder1DBlock.output_tokens` of the last
      block (needs `scan=False`).
  """

  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  add_position_embedding: bool = True
  posemb: str = 'learn'
  posemb_where: str = 'input'
  dtype: Dtype = jnp.float32
  attention_impl: str = 'reference'
  scan: bool = False
  remat_policy: str = 'none'
  layernorm_epsilon: float = 1e-6
  approximate_gelu: bool = True
  last_block_output_tokens: Optional[int] = None

  @nn.compact
  def __call__(self, x, *, train, grid=None, num_prefix_tokens=0):
    """Encodes tokens [batch, len, hidden]; `grid` (rows, cols) is needed by
    the 2-D embeddings, `num_prefix_tokens` precede it (class token)."""
    posemb = self._posemb(grid)
    where = self.posemb_where
    block_args = ()
    if where == 'input':
      x = self._add_position_embedding(x, posemb, train, grid,
                                       num_prefix_tokens)
    elif where == 'every_layer_shared':
      # The table alone (added to zeros), then added by every block.
      block_args = (posemb_module(
          posemb,
          grid=grid,
          num_prefix_tokens=num_prefix_tokens,
          name='posembed_shared')(jnp.zeros((1,) + x.shape[1:], jnp.float32)),)
    block = functools.partial(
        Encoder1DBlock,
        posemb_every_layer=posemb if where == 'every_layer' else None,
        relative_posemb=posemb == 'relative',
        grid=None if grid is None else tuple(grid),
        num_prefix_tokens=num_prefix_tokens,
        mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        num_heads=self.num_heads,
        dtype=self.dtype,
        layernorm_epsilon=self.layernorm_epsilon,
        approximate_gelu=self.approximate_gelu,
        attention_impl=self.attention_impl)
    last = self.last_block_output_tokens
    x = block_stack.apply_blocks(
        block,
        x,
        num_layers=self.num_layers,
        train=train,
        scan=self.scan,
        remat_policy=self.remat_policy,
        last_block_kwargs=None if last is None else {'output_tokens': last},
        block_args=block_args)
    encoded = nn.LayerNorm(
        name='encoder_norm', epsilon=self.layernorm_epsilon, dtype=EDGE_DTYPE)(
            x)
    return encoded

  def _posemb(self, grid) -> str:
    """`posemb` ('none' without `add_position_embedding`), checked."""
    if self.posemb not in choices.POSEMB_TYPES:
      raise ValueError(f'Unknown posemb {self.posemb!r}; use one of '
                       f'{choices.POSEMB_TYPES}.')
    posemb = self.posemb if self.add_position_embedding else 'none'
    problem = choices.where_problem(posemb, self.posemb_where)
    if problem:
      raise ValueError(problem)
    if posemb in ('learn_2d', 'sincos2d') and grid is None:
      raise ValueError(f'posemb={posemb!r} needs the patch grid: call the '
                       'Encoder with grid=(rows, cols).')
    return posemb

  def _add_position_embedding(self, x, posemb, train, grid, num_prefix_tokens):
    """`posembed_input` of the kind `posemb` says, then dropout."""
    if posemb in ('none', 'relative'):
      return x
    x = posemb_module(
        posemb,
        grid=grid,
        num_prefix_tokens=num_prefix_tokens,
        name='posembed_input')(
            x)
    return nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)


def embed_patches(model: 'VisionTransformer', inputs):
  """The hybrid stem (if any) and the patch embedding: [B, gh, gw, hidden],
  as submodules of `model`'s compact `__call__`."""
  x = inputs
  if model.resnet is not None:
    x = models_resnet.resnet_stem(
        x,
        width_factor=model.resnet.width_factor,
        num_layers=tuple(model.resnet.num_layers),
        dtype=model.dtype)
  return nn.Conv(
      features=model.hidden_size,
      kernel_size=model.patch_size,
      strides=model.patch_size,
      padding='VALID',
      dtype=EDGE_DTYPE,
      name='embedding')(
          x)


class VisionTransformer(nn.Module):
  """Vision Transformer, optionally with a ResNet stem (hybrid).

  `model.apply({'params': params}, images, train=False)`, images NHWC in
  [-1, 1]; `train=True` needs `rngs={'dropout': key}`. Logits are float32.

  Attributes:
    num_classes: size of the head; 0/None for no head (features out).
    transformer: `Encoder` fields; None for ResNet features only.
    resnet: `num_layers` (per stage) and `width_factor` of a hybrid's stem.
    representation_size: width of the tanh `pre_logits` layer, or None.
    classifier: one of choices.CLASSIFIERS.
    dtype: computation dtype; parameters stay float32.
    token_only_last_block: with classifier='token', the last block computes
      the class token's row only (same logits to float rounding); not with
      `scan`, skipped while `intermediates` is mutable; under dropout its
      masks differ.
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
  posemb_where: str = 'input'
  dtype: Dtype = jnp.float32
  attention_impl: str = 'reference'
  scan: bool = False
  remat_policy: str = 'none'
  layernorm_epsilon: float = 1e-6
  approximate_gelu: bool = True
  token_only_last_block: bool = False

  def __post_init__(self):
    for field, valid in (('classifier', choices.CLASSIFIERS),
                         ('posemb', choices.POSEMB_TYPES),
                         ('posemb_where', choices.POSEMB_WHERE),
                         ('attention_impl', choices.ATTENTION_IMPLS),
                         ('remat_policy', tuple(block_stack.REMAT_POLICIES))):
      if getattr(self, field) not in valid:
        raise ValueError(f'Unknown {field} {getattr(self, field)!r}; use one '
                         f'of {valid}.')
    problem = choices.where_problem(self.posemb, self.posemb_where)
    if problem:
      raise ValueError(problem)
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
    """Pixels per token along (height, width)."""
    s = 1
    if self.resnet is not None:
      s = choices.stem_stride(self.resnet.num_layers)
    ph, pw = self.patch_size
    return (s * ph, s * pw)

  @property
  def has_class_token(self) -> bool:
    return self.classifier in ('token', 'token_unpooled')

  def _check_inputs(self, inputs):
    """`image_checks.check_images`: the model's one check of its input."""
    params = (None if self.is_initializing() or 'params' not in self.variables
              else self.variables['params'])
    image_checks.check_images(
        inputs,
        patch_size=self.patch_size,
        stride=self.stride,
        hybrid=self.resnet is not None,
        params=params,
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
      x = self.encoder(
          name='Transformer', **self.transformer, **extra)(
              x,
              train=train,
              grid=(gh, gw),
              num_prefix_tokens=int(self.has_class_token))

    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = jnp.mean(x, axis=list(range(1, x.ndim - 1)))  # (1,) or (1, 2)
    # 'unpooled' and 'token_unpooled': the head is applied to every token.

    if self.representation_size is not None:
      x = nn.Dense(
          features=self.representation_size,
          dtype=EDGE_DTYPE,
          name='pre_logits')(
              x)
      x = nn.tanh(x)
    else:
      x = IdentityLayer(name='pre_logits')(x)

    if self.num_classes:
      x = nn.Dense(
          features=self.num_classes,
          name='head',
          dtype=EDGE_DTYPE,
          kernel_init=nn.initializers.zeros,
          bias_init=nn.initializers.constant(self.head_bias_init))(
              x)
    return x.astype(jnp.float32)

  def _encoder_extra_kwargs(self):
    """The dtype, and the `_ENCODER_OPTIONS` not at `Encoder`'s default (so a
    custom `encoder` without them works), unless `transformer` sets them."""
    defaults = {f.name: f.default for f in dataclasses.fields(Encoder)}
    extra = {
        k: getattr(self, k)
        for k in _ENCODER_OPTIONS
        if getattr(self, k) != defaults[k]
    }
    extra['dtype'] = self.dtype
    return {k: v for k, v in extra.items() if k not in self.transformer}

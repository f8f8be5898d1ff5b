"""The Vision Transformer (Dosovitskiy et al., ICLR 2021), as Flax linen modules.

Module and parameter names are those of Google's original `vit_jax`
(`Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/query/kernel`,
...), so its checkpoints map one to one (SPEC sections 1 and 4). Numerics
follow the original: pre-LayerNorm blocks with eps 1e-6, tanh-approximated
GELU, attention scaled by 1/sqrt(head_dim).

Beyond the original:
  * `posemb` selects the position embedding of the paper's ablation
    (Appendix D.4): learned 1-D (default), learned 2-D, none; plus fixed 2-D
    sin-cos.
  * `dtype` sets the computation dtype (e.g. bfloat16) while parameters stay
    float32; float32 (the default) gives the original's numbers.
  * Attention weights are sown into the `intermediates` collection and are
    returned when the caller makes it mutable (see `models.attention_weights`);
    outputs and the parameter tree are unchanged otherwise.
  * Bad input (rank, channels, sizes that are not multiples of the patch, a
    token count the position embedding does not have) raises a ValueError
    that names the sizes and the fix; the original silently cropped.
"""

import functools
import math
from typing import Any, Callable, Optional, Sequence, Tuple, Type

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vit_jax import models_resnet

Array = Any
Dtype = Any
Initializer = Callable[..., Array]

CLASSIFIERS = ('token', 'gap', 'unpooled', 'token_unpooled')
POSEMB_TYPES = ('learn', 'learn_2d', 'sincos2d', 'none')


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


class AddPositionEmbs2D(nn.Module):
  """Learned 2-D position embedding of the paper's ablation (Appendix D.4).

  Two tables of D/2 each, one indexed by the patch row and one by the column;
  a token's embedding is their concatenation. The class token, when present,
  has a learned row of its own.

  Attributes:
    grid: (rows, cols) of the patch grid.
    num_prefix_tokens: tokens before the grid (1 for the class token, else 0).
    posemb_init: initializer of the tables.
    param_dtype: dtype of the tables.
  """
  grid: Tuple[int, int]
  num_prefix_tokens: int
  posemb_init: Initializer
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs):
    _, n, d = inputs.shape
    if d % 2:
      raise ValueError(f'learn_2d position embedding needs an even hidden size; '
                       f'got {d}.')
    gh, gw = self.grid
    row = self.param('pos_embedding_row', self.posemb_init, (gh, d // 2),
                     self.param_dtype)
    col = self.param('pos_embedding_col', self.posemb_init, (gw, d // 2),
                     self.param_dtype)
    pe_hxwxd = jnp.concatenate([
        jnp.broadcast_to(row[:, None, :], (gh, gw, d // 2)),
        jnp.broadcast_to(col[None, :, :], (gh, gw, d // 2)),
    ], axis=-1)
    pe = pe_hxwxd.reshape(gh * gw, d)
    if self.num_prefix_tokens:
      cls_pe = self.param('pos_embedding_cls', self.posemb_init,
                          (self.num_prefix_tokens, d), self.param_dtype)
      pe = jnp.concatenate([cls_pe, pe], axis=0)
    if pe.shape[0] != n:
      raise ValueError(f'learn_2d position embedding for grid {self.grid} and '
                       f'{self.num_prefix_tokens} prefix tokens has '
                       f'{pe.shape[0]} rows; the input has {n} tokens.')
    return inputs + pe[None]


def posemb_sincos_2d(gh: int, gw: int, dim: int, temperature: float = 10_000.):
  """Fixed 2-D sin-cos table (gh*gw, dim): [sin(x), cos(x), sin(y), cos(y)]."""
  if dim % 4:
    raise ValueError(f'sincos2d position embedding needs a hidden size divisible '
                     f'by 4; got {dim}.')
  y, x = np.mgrid[:gh, :gw]
  omega = 1. / temperature**(np.arange(dim // 4) / (dim // 4))
  y = np.einsum('m,d->md', y.reshape(-1), omega)
  x = np.einsum('m,d->md', x.reshape(-1), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe.astype(np.float32)


class AddSinCosPositionEmbs(nn.Module):
  """Adds the fixed 2-D sin-cos embedding (no parameters); class token gets 0."""
  grid: Tuple[int, int]
  num_prefix_tokens: int

  @nn.compact
  def __call__(self, inputs):
    _, n, d = inputs.shape
    pe = posemb_sincos_2d(*self.grid, d)
    pe = np.concatenate([np.zeros((self.num_prefix_tokens, d), pe.dtype), pe])
    if pe.shape[0] != n:
      raise ValueError(f'sincos2d position embedding for grid {self.grid} has '
                       f'{pe.shape[0]} rows; the input has {n} tokens.')
    return inputs + jnp.asarray(pe, inputs.dtype)[None]


class MlpBlock(nn.Module):
  """Transformer MLP: Dense(mlp_dim) -> GELU -> Dropout -> Dense(out) -> Dropout."""

  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  out_dim: Optional[int] = None
  dropout_rate: float = 0.1
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.normal(stddev=1e-6)

  @nn.compact
  def __call__(self, inputs, *, deterministic):
    actual_out_dim = inputs.shape[-1] if self.out_dim is None else self.out_dim
    dense = functools.partial(
        nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=self.kernel_init, bias_init=self.bias_init)
    x = dense(features=self.mlp_dim)(inputs)
    x = nn.gelu(x)  # tanh approximation, as the original (SPEC section 1).
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
  """

  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, inputs, *, deterministic):
    if inputs.ndim != 3:
      raise ValueError(
          f'Encoder1DBlock expects [batch, len, emb]; got {inputs.shape}')

    x = nn.LayerNorm(dtype=self.dtype)(inputs)
    x = nn.MultiHeadDotProductAttention(
        dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        broadcast_dropout=False,
        deterministic=deterministic,
        dropout_rate=self.attention_dropout_rate,
        num_heads=self.num_heads,
        # Softmax in float32 also under a bfloat16 compute dtype; a no-op for
        # float32.
        force_fp32_for_softmax=True,
    )(x, x, sow_weights=True)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = x + inputs

    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype,
                 dropout_rate=self.dropout_rate)(y, deterministic=deterministic)
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
  """

  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  add_position_embedding: bool = True
  posemb: str = 'learn'
  dtype: Dtype = jnp.float32

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
    if self.posemb not in POSEMB_TYPES:
      raise ValueError(f'Unknown posemb {self.posemb!r}; use one of '
                       f'{POSEMB_TYPES}.')
    posemb = self.posemb if self.add_position_embedding else 'none'
    if posemb in ('learn_2d', 'sincos2d') and grid is None:
      raise ValueError(f'posemb={posemb!r} needs the patch grid: call the '
                       'Encoder with grid=(rows, cols).')
    posemb_init = nn.initializers.normal(stddev=0.02)  # BERT's.
    if posemb == 'learn':
      x = AddPositionEmbs(posemb_init=posemb_init, name='posembed_input')(x)
    elif posemb == 'learn_2d':
      x = AddPositionEmbs2D(grid=tuple(grid), num_prefix_tokens=num_prefix_tokens,
                            posemb_init=posemb_init, name='posembed_input')(x)
    elif posemb == 'sincos2d':
      x = AddSinCosPositionEmbs(grid=tuple(grid),
                                num_prefix_tokens=num_prefix_tokens,
                                name='posembed_input')(x)
    if posemb != 'none':
      x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)

    for lyr in range(self.num_layers):
      x = Encoder1DBlock(
          mlp_dim=self.mlp_dim,
          dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate,
          name=f'encoderblock_{lyr}',
          num_heads=self.num_heads,
          dtype=self.dtype)(x, deterministic=not train)
    encoded = nn.LayerNorm(name='encoder_norm', dtype=self.dtype)(x)
    return encoded


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
    dtype: computation dtype; parameters are float32 whatever it is.
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

  def __post_init__(self):
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'Unknown classifier {self.classifier!r}; use one of '
                       f'{CLASSIFIERS}.')
    if self.posemb not in POSEMB_TYPES:
      raise ValueError(f'Unknown posemb {self.posemb!r}; use one of '
                       f'{POSEMB_TYPES}.')
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
    """Fails early, with sizes and the fix, where the original cropped or crashed."""
    if inputs.ndim != 4:
      raise ValueError(
          f'VisionTransformer expects images [batch, height, width, channels]; '
          f'got an array of shape {tuple(inputs.shape)} (rank {inputs.ndim}). '
          'Add a batch axis for a single image (x[None]).')
    _, h, w, c = inputs.shape
    sh, sw = self.stride
    if h % sh or w % sw:
      what = (f'the patch size {self.patch_size[0]}x{self.patch_size[1]}'
              if self.resnet is None else
              f'{sh}x{sw} (ResNet stem stride x patch size '
              f'{self.patch_size[0]}x{self.patch_size[1]})')
      raise ValueError(
          f'Image size {h}x{w} is not a multiple of {what}. Resize or crop '
          f'the images to a multiple, e.g. {max(h // sh, 1) * sh}x'
          f'{max(w // sw, 1) * sw} or {-(-h // sh) * sh}x{-(-w // sw) * sw}.')
    if self.is_initializing() or 'params' not in self.variables:
      return
    params = self.variables['params']
    first = 'conv_root' if self.resnet is not None else 'embedding'
    if first in params and params[first]['kernel'].shape[2] != c:
      expected = params[first]['kernel'].shape[2]
      raise ValueError(
          f'Images have {c} channels but the model expects {expected} '
          f'({first}/kernel has shape {tuple(params[first]["kernel"].shape)}). '
          + ('Convert grayscale to RGB (repeat the channel) and drop alpha.'
             if expected == 3 else f'Feed {expected}-channel images.'))
    pe = params.get('Transformer', {}).get('posembed_input', {}).get(
        'pos_embedding')
    if pe is not None and self.transformer is not None:
      gh, gw = h // sh, w // sw
      extra = int(self.has_class_token)
      n = gh * gw + extra
      if pe.shape[1] != n:
        g = math.isqrt(pe.shape[1] - extra)
        hint = ''
        if g * g == pe.shape[1] - extra:
          hint = (f' (a {g}x{g} grid, i.e. {g * sh}x{g * sw} images)')
        raise ValueError(
            f'Images of {h}x{w} give a {gh}x{gw} grid of tokens = {n} tokens'
            f'{" with the class token" if extra else ""}, but the position '
            f'embedding has {pe.shape[1]} rows{hint}. Feed images of the '
            'size the model was trained at, or resize the position embedding '
            'with vit_jax.checkpoint.load_pretrained / interpolate_posembed.')

  @nn.compact
  def __call__(self, inputs, *, train):
    self._check_inputs(inputs)
    x = inputs

    if self.resnet is not None:
      x = models_resnet.resnet_stem(
          x, width_factor=self.resnet.width_factor,
          num_layers=tuple(self.resnet.num_layers), dtype=self.dtype)

    x = nn.Conv(
        features=self.hidden_size,
        kernel_size=self.patch_size,
        strides=self.patch_size,
        padding='VALID',
        dtype=self.dtype,
        name='embedding')(x)

    if self.transformer is not None:
      n, gh, gw, c = x.shape
      x = jnp.reshape(x, [n, gh * gw, c])
      if self.has_class_token:
        cls = self.param('cls', nn.initializers.zeros, (1, 1, c))
        cls = jnp.tile(cls, [n, 1, 1]).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1)
      x = self.encoder(name='Transformer', **self.transformer,
                       **self._encoder_extra_kwargs())(
                           x, train=train, grid=(gh, gw),
                           num_prefix_tokens=int(self.has_class_token))

    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = jnp.mean(x, axis=list(range(1, x.ndim - 1)))  # (1,) or (1, 2)
    # 'unpooled' and 'token_unpooled': the head is applied to every token.

    if self.representation_size is not None:
      x = nn.Dense(features=self.representation_size, dtype=self.dtype,
                   name='pre_logits')(x)
      x = nn.tanh(x)
    else:
      x = IdentityLayer(name='pre_logits')(x)

    if self.num_classes:
      x = nn.Dense(
          features=self.num_classes,
          name='head',
          dtype=self.dtype,
          kernel_init=nn.initializers.zeros,
          bias_init=nn.initializers.constant(self.head_bias_init))(x)
    return x.astype(jnp.float32)

  def _encoder_extra_kwargs(self):
    """Fields the model passes down unless the transformer config sets them."""
    extra = {'dtype': self.dtype}
    if self.posemb != 'learn':
      extra['posemb'] = self.posemb
    return {k: v for k, v in extra.items() if k not in self.transformer}

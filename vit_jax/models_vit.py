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
  * Speed switches (defaults give the original's graph, bit for bit):
    - `dtype=jnp.bfloat16`: mixed precision. Parameters stay float32; every
      matmul of the encoder blocks (q/k/v/out projections, the two attention
      einsums, MLP) takes bfloat16 operands and accumulates and returns
      float32, in the backward pass too (`mixed_precision`). The residual
      stream, softmax, GELU, LayerNorm statistics and the logits are
      float32; the blocks' LayerNorm outputs are bfloat16. The first and
      last layers stay float32 (`EDGE_DTYPE`): the patch embedding, the
      `encoder_norm` output, pre_logits and the head, about 2% of a
      ViT-S/16's FLOPs. On the embedded MNIST job that recovered half of
      bfloat16's accuracy loss (README, Results). (On XLA:CPU
      bfloat16 elementwise work is slower than float32, so bfloat16
      activations between the matmuls measured 15% slower.)
    - `attention_impl` (functions in `vit_jax.layers.attention`): 'reference'
      (flax's einsum attention, the original), 'xla' or 'cudnn'
      (`jax.nn.dot_product_attention`; 'cudnn' is the fused
      flash-attention kernel of NVIDIA GPUs and needs bfloat16/float16).
      The fused kernels return no attention probabilities, so when the caller
      asks for them (`intermediates` mutable, as `models.attention_weights`
      does) the block computes attention the reference way instead; same
      numbers, only slower. They also have no attention dropout: training
      with `attention_dropout_rate > 0` and a fused impl raises.
    - `attention_impl='heads_major'`: the reference attention (same numbers)
      with both einsums as batched matmuls over leading (batch, head) axes;
      faster float32 inference on XLA:CPU, slower in bfloat16 there.
    - `token_only_last_block=True`: with the class-token classifier, the last
      block computes the class token's row only (same logits).
    - `scan=True`: the encoder blocks are one `nn.scan` body, so compile time
      does not grow with depth. Parameters then live under
      `Transformer/encoderblock/...` with a leading layer axis; see
      `vit_jax.params.layouts` to convert from and to the per-layer layout of the
      checkpoints.
    - `remat_policy`: rematerialisation of each encoder block in the backward
      pass ('none', 'full', 'save_dots', 'save_all_dots'; see REMAT_POLICIES),
      with or without scan. On XLA:CPU it saves memory only with
      `scan=True`: unrolled, the CPU scheduler runs the recomputation as
      early as the forward pass and keeps its outputs just as long.
"""

import functools
import math
from typing import Any, Callable, Optional, Tuple, Type

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.layers import attention
from vit_jax.layers import mixed_precision
from vit_jax import models_resnet

Array = Any
Dtype = Any
Initializer = Callable[..., Array]

CLASSIFIERS = ('token', 'gap', 'unpooled', 'token_unpooled')
POSEMB_TYPES = ('learn', 'learn_2d', 'sincos2d', 'none')
ATTENTION_IMPLS = ('reference', 'heads_major', 'xla', 'cudnn')
# The attention functions of `attention_impl` (module `attention`).
fused_attention = attention.fused_attention
heads_major_attention = attention.heads_major_attention
# Compute dtype of the first and last layers (patch embedding, encoder_norm
# output, pre_logits, head) whatever the model's `dtype`: keeping them in
# float32 under bfloat16 measured +0.36 points on the embedded job (5 seeds).
EDGE_DTYPE = jnp.float32
# What each encoder block keeps for the backward pass; the rest is recomputed.
REMAT_POLICIES = {
    'none': None,  # No rematerialisation: everything is kept.
    'full': jax.checkpoint_policies.nothing_saveable,  # Only block inputs.
    # Outputs of the projections and MLP matmuls (not the attention einsums,
    # which have a batch dimension and are the size of L^2).
    'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'save_all_dots': jax.checkpoint_policies.checkpoint_dots,
}


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
    attention_impl: one of ATTENTION_IMPLS, see the module docstring.
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
        **self._attention_kwargs(),
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

  def _attention_kwargs(self):
    """MHA kwargs of the speed switches; empty for the original's graph."""
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f'Unknown attention_impl {self.attention_impl!r}; use '
                       f'one of {ATTENTION_IMPLS}.')
    kw = {}
    if self.attention_impl == 'heads_major':
      kw['attention_fn'] = heads_major_attention
    elif self.attention_impl != 'reference':
      kw['attention_fn'] = functools.partial(
          fused_attention, implementation=self.attention_impl)
    if not mixed_precision.is_float32(self.dtype):
      kw['qkv_dot_general'] = mixed_precision.f32_accumulating_dot_general
      kw['out_dot_general'] = mixed_precision.f32_accumulating_dot_general
      einsum_cls = functools.partial(mixed_precision.F32AccumulatingEinsum,
                                     self.dtype)
      kw['qk_attn_weights_einsum_cls'] = einsum_cls
      kw['attn_weights_value_einsum_cls'] = einsum_cls
    return kw


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
    attention_impl: one of ATTENTION_IMPLS, see the module docstring.
    scan: run the blocks as one `nn.scan` (parameters `encoderblock/...` with
      a leading layer axis instead of `encoderblock_{i}/...`).
    remat_policy: a key of REMAT_POLICIES.
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

    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'Unknown remat_policy {self.remat_policy!r}; use one '
                       f'of {tuple(REMAT_POLICIES)}.')
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

    def apply_block(module, x_BxLxD):
      return module(x_BxLxD, deterministic=not train)

    if self.remat_policy != 'none':
      # Inside scan the loop already keeps XLA from merging the recomputation
      # with the forward pass, and prevent_cse would only cost speed (JAX's
      # advice for remat under scan).
      apply_block = nn.remat(apply_block, prevent_cse=not self.scan,
                             policy=REMAT_POLICIES[self.remat_policy])

    if self.scan and self.last_block_output_tokens is not None:
      raise ValueError(
          'last_block_output_tokens needs the unscanned encoder (scan=False): '
          'under nn.scan every block computes the same shapes.')
    if self.scan:
      # Per-layer parameters and dropout masks: split the rngs per step.
      x, _ = nn.scan(
          lambda module, carry, _: (apply_block(module, carry), None),
          variable_axes={'params': 0, 'intermediates': 0},
          split_rngs={'params': True, 'dropout': True},
          length=self.num_layers,
      )(block(name='encoderblock'), x, None)
    else:
      for lyr in range(self.num_layers):
        last = lyr == self.num_layers - 1
        x = apply_block(block(name=f'encoderblock_{lyr}', **(
            {'output_tokens': self.last_block_output_tokens}
            if last and self.last_block_output_tokens is not None else {})), x)
    encoded = nn.LayerNorm(name='encoder_norm', epsilon=self.layernorm_epsilon,
                           dtype=EDGE_DTYPE)(x)
    return encoded


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
      REMAT_POLICIES.
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
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'Unknown classifier {self.classifier!r}; use one of '
                       f'{CLASSIFIERS}.')
    if self.posemb not in POSEMB_TYPES:
      raise ValueError(f'Unknown posemb {self.posemb!r}; use one of '
                       f'{POSEMB_TYPES}.')
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f'Unknown attention_impl {self.attention_impl!r}; use '
                       f'one of {ATTENTION_IMPLS}.')
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'Unknown remat_policy {self.remat_policy!r}; use one '
                       f'of {tuple(REMAT_POLICIES)}.')
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
    """Fields the model passes down unless the transformer config sets them."""
    extra = {'dtype': self.dtype}
    if self.posemb != 'learn':
      extra['posemb'] = self.posemb
    # Passed only when set, so that a custom `encoder` class without these
    # fields keeps working with the defaults.
    if self.attention_impl != 'reference':
      extra['attention_impl'] = self.attention_impl
    if self.scan:
      extra['scan'] = self.scan
    if self.remat_policy != 'none':
      extra['remat_policy'] = self.remat_policy
    if self.layernorm_epsilon != 1e-6:
      extra['layernorm_epsilon'] = self.layernorm_epsilon
    if not self.approximate_gelu:
      extra['approximate_gelu'] = self.approximate_gelu
    return {k: v for k, v in extra.items() if k not in self.transformer}

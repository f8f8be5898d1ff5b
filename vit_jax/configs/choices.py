"""The valid values of the model, optimizer and trainer options, in plain
Python.

vit_jax.run_config.validation checks a config against these before JAX
loads; the modules that build models and train steps read them from here.
"""

from typing import Optional, Sequence

# config.optimizer (vit_jax.training.optim).
OPTIMIZERS = ('sgd_momentum', 'adam', 'adamw')
# config.decay_type: the learning-rate decay after warmup (vit_jax.utils).
DECAY_TYPES = ('cosine', 'linear')
# config.model.classifier (vit_jax.models_vit).
CLASSIFIERS = ('token', 'gap', 'unpooled', 'token_unpooled')
# config.model.posemb ('learn' is the paper's 1-D table).
POSEMB_TYPES = ('learn', 'learn_2d', 'sincos2d', 'relative', 'none')
# config.model.posemb_where: where the learned tables are added
# (vit_jax.layers.position_embeddings).
POSEMB_WHERE = ('input', 'every_layer', 'every_layer_shared')
# The posemb types with a learned table, which posemb_where places.
LEARNED_POSEMBS = ('learn', 'learn_2d')
# config.model.attention_impl (vit_jax.layers.attention): flax's attention
# (the original), its einsums as batched matmuls,
# `jax.nn.dot_product_attention` with XLA's or cuDNN's kernel.
ATTENTION_IMPLS = ('reference', 'heads_major', 'xla', 'cudnn')
# config.model.remat_policy: the keys of
# vit_jax.layers.block_stack.REMAT_POLICIES.
REMAT_POLICY_NAMES = ('none', 'full', 'save_dots', 'save_all_dots')
# config.loss: the keys of vit_jax.training.objectives.LOSSES.
LOSS_NAMES = ('softmax_xent', 'sigmoid_xent')
# config.objective: supervised classification (the paper's pre-training and
# fine-tuning) or masked patch prediction (Sec. 4.6, self-supervised).
OBJECTIVES = ('classification', 'mpp')
# config.trainable: named selections of parameters (vit_jax.training.trainable);
# anything else is taken as a regular expression.
TRAINABLE_PRESETS = {
    'head': r'^head/',
    'head+pre_logits': r'^(head|pre_logits)/',
}
# config.trainable values under which every parameter trains.
TRAINABLE_ALL = (None, '', 'all')


def where_problem(posemb: str, posemb_where: str) -> Optional[str]:
  """None, or why `posemb_where` does not go with `posemb`."""
  if posemb_where not in POSEMB_WHERE:
    return (f'Unknown posemb_where {posemb_where!r}; use one of '
            f'{POSEMB_WHERE}.')
  # A fixed or absent table has nothing to learn per block; 'relative' is in
  # every block's attention already (Table 8: N/A).
  if posemb_where != 'input' and posemb not in LEARNED_POSEMBS:
    return (f'posemb_where={posemb_where!r} places a learned table, so it '
            f"needs posemb 'learn' or 'learn_2d' (paper Appendix D.4, Table "
            f"8); posemb={posemb!r} takes posemb_where='input' only.")
  return None


def stem_stride(num_layers: Sequence[int]) -> int:
  """Total downsampling of a BiT ResNet stem with `num_layers` units per
  stage: 4 for the root, 2 per later stage."""
  return 4 * 2**max(len(num_layers) - 1, 0)


def trainable_pattern(spec: Optional[str]) -> Optional[str]:
  """The regular expression of config.trainable `spec` (None: everything
  trains)."""
  if spec in TRAINABLE_ALL:
    return None
  return TRAINABLE_PRESETS.get(spec, spec)

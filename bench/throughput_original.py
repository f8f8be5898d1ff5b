"""The implementations `bench.throughput` compares against: the original, timm.

`load_original` imports `vit_jax.models_vit` of a clone of
google-research/vision_transformer beside ours; `original_model` builds its
`VisionTransformer` with our model's fields and `check_same_function` makes
sure it computes our logits on our parameters before it is timed.
`timm_inference` times timm's inference (PyTorch):

  module = throughput_original.load_original('../vision_transformer')
  theirs = throughput_original.original_model(module, ours)
  throughput_original.check_same_function(theirs, ours, params, images)
"""

import importlib
import os
import sys
from typing import Dict

import jax
import jax.numpy as jnp

from bench import throughput_metrics
from vit_jax.checkpoints import layouts


def load_original(path: str):
  """`vit_jax.models_vit` of a clone of google-research/vision_transformer.

  The clone's package is also called `vit_jax`: ours is set aside in
  `sys.modules` while the clone's is imported, and put back after, so both
  are usable side by side (the returned module keeps the clone's).
  """
  path = os.path.abspath(path)
  if not os.path.isfile(os.path.join(path, 'vit_jax', 'models_vit.py')):
    raise SystemExit(
        f'--original {path}: there is no vit_jax/models_vit.py in it. Give '
        'the directory of a clone of '
        'https://github.com/google-research/vision_transformer (the one that '
        'holds its vit_jax/ package).')
  is_ours = lambda k: k == 'vit_jax' or k.startswith('vit_jax.')
  ours = {k: m for k, m in sys.modules.items() if is_ours(k)}
  for k in ours:
    del sys.modules[k]
  sys.path.insert(0, path)
  importlib.invalidate_caches()
  try:
    module = importlib.import_module('vit_jax.models_vit')
  finally:
    sys.path.remove(path)
    for k in [k for k in sys.modules if is_ours(k)]:
      del sys.modules[k]
    sys.modules.update(ours)
  if not os.path.abspath(module.__file__).startswith(path + os.sep):
    raise SystemExit(f'--original {path}: imported {module.__file__} instead.')
  return module


def original_model(module, ours):
  """The original's `VisionTransformer` with the fields of our model `ours`."""
  t = ours.transformer
  return module.VisionTransformer(
      num_classes=ours.num_classes,
      patches=ours.patches,
      hidden_size=ours.hidden_size,
      classifier=ours.classifier,
      representation_size=ours.representation_size,
      transformer=dict(
          num_layers=t.num_layers,
          mlp_dim=t.mlp_dim,
          num_heads=t.num_heads,
          dropout_rate=t.dropout_rate,
          attention_dropout_rate=t.attention_dropout_rate))


def check_same_function(original, ours, params, images, scan=False):
  """Fails unless the original gives our float32 logits on `params`."""
  per_layer = layouts.scan_to_layers(params) if scan else params
  abstract = jax.eval_shape(
      lambda x: original.init(jax.random.key(0), x, train=False)['params'],
      images)
  if (jax.tree_util.tree_structure(abstract)
      != jax.tree_util.tree_structure(per_layer)):
    raise SystemExit('--original: its parameter tree differs from ours; is '
                     'it google-research/vision_transformer?')
  apply = lambda m, p: jax.jit(lambda p, x: m.apply(
      {'params': p}, x, train=False))(p, images)
  diff = float(
      jnp.max(jnp.abs(apply(original, per_layer) - apply(ours, params))))
  if diff > 1e-4:
    raise SystemExit(f'--original: logits differ from ours by {diff:.2g}.')
  return diff


TIMM_NAMES = {
    'ViT-Ti_16': 'vit_tiny_patch16_224',
    'ViT-S_16': 'vit_small_patch16_224',
    'ViT-B_16': 'vit_base_patch16_224'
}


def timm_inference(name: str, args) -> Dict[str, float]:
  """timm's inference images/s per dtype (bfloat16: CPU autocast), or {}.

  PyTorch with all cores, batch and image size of the run, random weights,
  `torch.inference_mode()`, median of `args.repeats` after two warm-ups.
  """
  try:
    import timm  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(f'--timm needs PyTorch and timm ({e}); install them '
                     '(pip install torch timm) or leave out --timm.') from e
  if name not in TIMM_NAMES:
    return {}
  torch.set_num_threads(os.cpu_count())
  model = timm.create_model(
      TIMM_NAMES[name],
      pretrained=False,
      num_classes=args.num_classes,
      img_size=args.image_size).eval()
  x = torch.randn(args.batch, 3, args.image_size, args.image_size)
  out = {}
  for d in args.dtypes:

    def call(d=d):
      with torch.inference_mode(), torch.autocast(
          'cpu', dtype=torch.bfloat16, enabled=d == 'bfloat16'):
        return model(x)

    call()  # a second warm-up call beside median_seconds' own
    out[d] = args.batch / throughput_metrics.median_seconds(call, args.repeats)
  return out

r"""Speed of the Vision Transformer: throughput, MFU, compile time, memory.

Command (all sections; about 20 minutes on a 2-core CPU):

  python -m bench.throughput

The issue's comparison, with the original timed in the same run (a clone of
https://github.com/google-research/vision_transformer, not shipped here) and
timm (torch and timm installed):

  python -m bench.throughput --token-only-last-block \
      --original ../vision_transformer --timm

Quick runs while iterating (one model, one dtype, one section):

  python -m bench.throughput --models ViT-S_16 --dtypes bfloat16 \
      --what train --repeats 3
  python -m bench.throughput --models ViT-Ti_16 --dtypes float32 \
      --what frozen --repeats 3

Sections (`--what`, comma-separated):
  peak     the matmul peak as XLA sees it: a square float32 matmul and the same
           with bfloat16 inputs and float32 accumulation (2048^3 on CPU,
           8192^3 on GPU). Model FLOPs utilisation (MFU) divides by these.
  infer    images/s of `model.apply(..., train=False)` under jit.
  train    images/s of one training step as the original fine-tunes: forward,
           backward, global-norm clip 1.0, SGD momentum 0.9 with a bfloat16
           momentum buffer (optax), parameters donated.
  ceiling  with infer and/or train: the same functions' matmuls alone
           (`bench.ceiling`: every dot_general and convolution of the
           jaxpr, backward ones included, at their shapes and dtypes, on
           random operands), timed interleaved with the full calls. The
           images/s a step would reach if everything between its matmuls
           (LayerNorm, GELU, softmax, casts, the optimizer) took no time:
           an estimate of the most that work on anything but the matmuls
           can give (the products read operands of their own, so a call
           whose data stays in cache can edge past it). `--ceiling-shapes N` also times each distinct matmul
           alone and lists the N that take the most time, with their rate.
           Skipped, with the reason, where the products' operands and
           outputs would take over half the device's memory (e.g. ViT-B/16
           training at a GPU batch of 128: lower --batch).
  frozen   frozen-backbone fine-tuning: images/s of the training loop's own
           step (`train.make_update_fn`, pmapped, one device; same optimizer
           and batch as `train`) training every parameter ('train (all)')
           and only the head ('train (head only)': `trainable_mask=
           trainable.trainable_mask(params, 'head')`, optimizer state of the
           head alone, as `config.trainable='head'`), their ratio, compile
           time and peak memory. The head-only step computes no backbone
           gradients: a forward pass plus the head's weight gradient.
  compile  compile time of the ViT-L/16 training step with and without
           `scan=True` (compile only, nothing runs).
  remat    the largest ViT-B/16 training batch whose compiled peak memory fits
           `--budget-gib`, per remat policy (compile only: binary search on
           `compiled.memory_analysis()`).

Every timed number is the median of `--repeats` calls after one warm-up call,
timed with `time.perf_counter` around `jax.block_until_ready`. Compile time is
trace + lower + compile of the jitted function. Peak memory is XLA's buffer
assignment of the compiled function: temp + arguments + outputs, buffers that
outputs alias (donated arguments) counted once. Model FLOPs are counted
analytically (the matmuls and attention einsums, 2 FLOPs per multiply-add;
a training step is 3x the forward pass); XLA's own count
(`cost_analysis()['flops']`, which also counts elementwise work) is printed
beside it.

The tables at the end compare against the original implementation and the
issue's targets (multiples of the original's float32 images/s). With
`--original DIR` the original's model runs in this process on the same
parameters (its logits are checked against ours first), its calls
interleaved with ours: the only comparison that holds across machines.
Without it the reference speeds of the project's shared/MACHINE.md stand in
(marked *), measured on another CPU of the same name, so compare numbers of
one run. `--timm` adds timm's inference (torch and timm installed).

What it prints: the command, jax and jaxlib versions, the device and CPU
line (`bench.machine`), XLA_FLAGS and the batch; then per section its
measurements, and at the end the tables "Throughput (images/s), model FLOPs
utilisation, compile, memory", "Matmul ceiling" (with `ceiling`), "Training
only the head" (with `frozen`) and "Against the original and the targets".
Measured results, with the commands that gave them: docs/speed.md.
"""

import argparse
import functools
import importlib
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ''):  # `python bench/throughput.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.jax_utils  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import ceiling
from bench import machine
from vit_jax.params import layouts
from vit_jax import models
from vit_jax.training import trainable

GiB = 2**30

# the project's shared/MACHINE.md, "Reference speeds on this machine type": Google's
# original vit_jax, jit, batch 8, 224x224, 1000 classes, median of 9, float32,
# images/s on a 2-core AMD EPYC (Zen 5).
ORIGINAL_IMAGES_PER_S = {
    ('infer', 'ViT-Ti_16'): 100.8,
    ('infer', 'ViT-S_16'): 35.6,
    ('infer', 'ViT-B_16'): 9.1,
    ('train', 'ViT-Ti_16'): 23.2,
    ('train', 'ViT-S_16'): 7.8,
}
# Same source: timm (PyTorch 2.13, CPU) inference, float32 / bf16 autocast.
TIMM_IMAGES_PER_S = {
    ('infer', 'ViT-S_16', 'float32'): 18.3,
    ('infer', 'ViT-S_16', 'bfloat16'): 52.5,
    ('infer', 'ViT-B_16', 'float32'): 4.9,
    ('infer', 'ViT-B_16', 'bfloat16'): 14.4,
}
# Same source: XLA on a 2048^3 matmul, GFLOP/s.
MACHINE_MATMUL_GFLOPS = {'float32': 407., 'bfloat16': 892.}
# The targets, as multiples of the original's float32 images/s on the
# same machine (batch 8, 224x224): at least the original for ViT-B/16
# inference in float32, 2x it in bfloat16 (and above timm's bf16 autocast),
# 1.3x (float32) and 2x (bfloat16) the original's ViT-S/16 training step.
TARGET_X_ORIGINAL = {
    ('infer', 'ViT-B_16', 'float32'): 1.0,
    ('infer', 'ViT-B_16', 'bfloat16'): 2.0,
    ('train', 'ViT-S_16', 'float32'): 1.3,
    ('train', 'ViT-S_16', 'bfloat16'): 2.0,
}
TARGET_ABOVE_TIMM = {('infer', 'ViT-B_16', 'bfloat16')}
# Compile-only targets of the issue.
TARGET_REMAT_BATCH_RATIO = 2.0  # remat full vs none, same memory budget.
TARGET_SCAN_COMPILE_RATIO = 1 / 3  # ViT-L/16 train step, scan vs loop.

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
SECTIONS = ('peak', 'infer', 'train', 'ceiling', 'frozen', 'compile',
            'remat')
# The frozen section: `trainable` of each step (train.make_update_fn), and
# the step's name in the tables.
FROZEN_STEPS = ('all', 'head')
FROZEN_LABELS = {'all': 'train (all)', 'head': 'train (head only)'}


# ---------------------------------------------------------------------------
# Measuring.


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """Median wall time of `fn()` over `repeats` calls after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def median_seconds_interleaved(fns: Sequence[Callable[[], Any]],
                               repeats: int) -> List[float]:
  """Median wall time of each of `fns`, their calls interleaved.

  One warm-up call each, then `repeats` rounds calling every fn once: a
  change of machine load during the run hits all of them alike, so their
  ratios hold better than those of back-to-back `median_seconds`.
  """
  for fn in fns:
    jax.block_until_ready(fn())
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, t in zip(fns, times):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      t.append(time.perf_counter() - t0)
  return [statistics.median(t) for t in times]


def compile_timed(fn, *args, donate_argnums=()):
  """(compiled, seconds for trace + lower + compile)."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
  return compiled, time.perf_counter() - t0


def peak_bytes(compiled) -> Optional[int]:
  """temp + arguments + outputs of a compiled function, aliases counted once."""
  ma = compiled.memory_analysis()
  if ma is None:
    return None
  return (ma.temp_size_in_bytes + ma.argument_size_in_bytes +
          ma.output_size_in_bytes - ma.alias_size_in_bytes)


def xla_flops(compiled) -> Optional[float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return None if not cost or 'flops' not in cost else float(cost['flops'])


def matmul_gflops(n: int, dtype_name: str, repeats: int) -> float:
  """XLA's rate on an n^3 matmul; bfloat16 means bf16 in, float32 accumulate."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n), np.float32))
  b = jnp.asarray(rng.standard_normal((n, n), np.float32))
  if dtype_name == 'bfloat16':
    a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  matmul = jax.jit(functools.partial(jnp.matmul,
                                     preferred_element_type=jnp.float32))
  return 2 * n**3 / median_seconds(lambda: matmul(a, b), repeats) / 1e9


def vit_forward_flops(model, image_size: int) -> Optional[float]:
  """Matmul FLOPs of one image through a plain ViT (2 per multiply-add)."""
  if not isinstance(model, models.VisionTransformer):  # E.g. the original's.
    return None
  if model.resnet is not None or model.transformer is None:
    return None
  ph, pw = model.patch_size
  d = model.hidden_size
  t = model.transformer
  n = (image_size // ph) * (image_size // pw)
  tokens = n + int(model.has_class_token)
  flops = 2 * n * ph * pw * 3 * d  # Patch embedding.
  per_layer = (2 * tokens * d * 3 * d     # q, k, v projections.
               + 2 * tokens * tokens * d  # q k^T.
               + 2 * tokens * tokens * d  # softmax(.) v.
               + 2 * tokens * d * d       # Output projection.
               + 2 * 2 * tokens * d * t.mlp_dim)  # MLP.
  flops += t.num_layers * per_layer
  if model.token_only_last_block and model.classifier == 'token':
    # The last block: keys and values of every token, the rest for one.
    flops -= per_layer - (2 * tokens * d * 2 * d + 2 * d * d + 4 * tokens * d
                          + 2 * d * d + 2 * 2 * d * t.mlp_dim)
  if model.representation_size:
    flops += 2 * d * model.representation_size
  return float(flops + head_flops(model, image_size))


def head_flops(model, image_size: int) -> float:
  """Matmul FLOPs of the `head` Dense layer for one image (0: no head)."""
  if not model.num_classes:
    return 0.
  ph, pw = model.patch_size
  tokens = ((image_size // ph) * (image_size // pw) +
            int(model.has_class_token))
  heads = tokens if model.classifier in ('unpooled', 'token_unpooled') else 1
  width = model.representation_size or model.hidden_size
  return float(2 * heads * width * model.num_classes)


# ---------------------------------------------------------------------------
# What is measured.


def build(name: str, dtype_name: str, args, **kw):
  return models.get_model(name, num_classes=args.num_classes,
                          dtype=DTYPES[dtype_name],
                          attention_impl=args.attention_impl,
                          token_only_last_block=args.token_only_last_block,
                          **kw)


def abstract_params(model, batch: int, image_size: int):
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3),
                                jnp.float32)
  return jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False)['params'],
      images)


def make_optimizer():
  """The original's fine-tuning update: clip 1.0, SGD momentum 0.9 (bf16)."""
  return optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.sgd(learning_rate=0.01, momentum=0.9,
                accumulator_dtype=jnp.bfloat16))


def make_train_step(model, tx):
  """(params, opt_state, images, labels, rng) -> (params, opt_state, loss)."""

  def loss_fn(params, images, labels, rng):
    logits = model.apply({'params': params}, images, train=True,
                         rngs={'dropout': rng})
    return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1))

  def train_step(params, opt_state, images, labels, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, images, labels, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def batch_arrays(batch: int, image_size: int, num_classes: int):
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (batch, image_size, image_size, 3))
  labels = np.eye(num_classes, dtype=np.float32)[
      rng.integers(0, num_classes, batch)]
  return jnp.asarray(images, jnp.float32), jnp.asarray(labels)


def prepare_infer(model, params, args) -> Tuple[Callable[[], Any], Dict]:
  """(call, row without images_per_s) of jitted `model.apply(train=False)`."""
  images, _ = batch_arrays(args.batch, args.image_size, args.num_classes)
  infer = lambda p, x: model.apply({'params': p}, x, train=False)
  compiled, compile_s = compile_timed(infer, params, images)
  return (lambda: compiled(params, images)), dict(
      compile_s=compile_s, peak_bytes=peak_bytes(compiled),
      flops=vit_forward_flops(model, args.image_size),
      xla_flops=_per_image(xla_flops(compiled), args.batch),
      traced=(infer, _abstract((params, images))))


def prepare_train(model, params, args) -> Tuple[Callable[[], Any], Dict]:
  """(call, row without images_per_s) of the jitted training step."""
  images, labels = batch_arrays(args.batch, args.image_size, args.num_classes)
  tx = make_optimizer()
  # A copy: the step donates its parameters.
  state = [jax.tree_util.tree_map(jnp.copy, params), tx.init(params)]
  rng = jax.random.key(1)
  train_step = make_train_step(model, tx)
  traced = (train_step, _abstract((*state, images, labels, rng)))
  compiled, compile_s = compile_timed(train_step, *state, images, labels, rng,
                                      donate_argnums=(0, 1))

  def step():
    state[0], state[1], loss = compiled(state[0], state[1], images, labels,
                                        rng)
    return loss

  fwd = vit_forward_flops(model, args.image_size)
  return step, dict(compile_s=compile_s, peak_bytes=peak_bytes(compiled),
                    flops=None if fwd is None else 3 * fwd,
                    xla_flops=_per_image(xla_flops(compiled), args.batch),
                    traced=traced)


def _abstract(tree):
  """ShapeDtypeStructs of `tree`'s arrays (to trace without touching them)."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


PREPARE = {'infer': prepare_infer, 'train': prepare_train}


def measure(what: str, name: str, args,
            original=None) -> Dict[str, Dict[str, Any]]:
  """Images/s of `what` ('infer' or 'train') for each of `args.dtypes`.

  With `original` (the original's `models_vit` module, see `load_original`)
  its float32 model is measured too, on the same parameters, under the key
  'original'. The calls of all variants are interleaved, so that their
  ratios hold on a machine whose speed drifts.

  With 'ceiling' in `args.what`, each of our dtypes also gets its matmul
  ceiling (`bench.ceiling`): the function's dot_generals and convolutions
  alone, at its shapes, timed interleaved with the rest.

  Returns:
    {dtype or 'original': row}; a row has images_per_s, compile_s,
    peak_bytes, flops (analytic, per image) and xla_flops (per image); with
    the ceiling, our rows also have ceiling_images_per_s (the matmuls alone)
    and matmul_flops (theirs, per image, counted from the jaxpr).
  """
  kw = {} if what == 'infer' else dict(remat_policy=args.remat_policy,
                                       scan=args.scan)
  ours = {d: build(name, d, args, **kw) for d in args.dtypes}
  images, _ = batch_arrays(args.batch, args.image_size, args.num_classes)
  first = next(iter(ours.values()))
  params = jax.jit(lambda x: first.init(jax.random.key(0), x, train=False)[
      'params'])(images[:1])  # Jitted: eager init dispatches op by op.
  variants = dict(ours)
  scanned = kw.get('scan', False)
  if original is not None:
    reference = build(name, 'float32', args, **kw)
    variants['original'] = original_model(original, reference)
    check_same_function(variants['original'], reference, params, images[:2],
                        scan=scanned)
  calls, rows = [], {}
  for key, model in variants.items():
    p = params
    if key == 'original' and scanned:  # The original has per-layer names.
      p = layouts.scan_to_layers(params)
    call, rows[key] = PREPARE[what](model, p, args)
    calls.append(call)
  keys = list(variants)
  for key in ours:
    fn, abstract_args = rows[key].pop('traced')
    if 'ceiling' in args.what:
      ops = ceiling.matmul_ops(fn, *abstract_args)
      rows[key]['matmul_flops'] = sum(op.flops for op in ops) / args.batch
      need, budget = ceiling.bytes_needed(ops), ceiling.memory_budget_bytes()
      if need > budget:
        print(f'  {name} {key}: matmul ceiling skipped: its operands and '
              f'outputs take {need / GiB:.1f} GiB, over half the device\'s '
              f'memory ({budget / GiB:.1f} GiB); a smaller --batch fits.')
        continue
      if args.ceiling_shapes:
        rows[key]['matmul_shapes'] = ceiling.by_shape(
            ops, lambda call: median_seconds(call, args.repeats))
      calls.append(ceiling.dots_only(ops))
      keys.append(('ceiling', key))
  if original is not None:  # The original computes every token to the end.
    rows['original'].pop('traced')
    full = models.get_model(name, num_classes=args.num_classes)
    rows['original']['flops'] = (vit_forward_flops(full, args.image_size) *
                                 (1 if what == 'infer' else 3))
  for key, seconds in zip(keys, median_seconds_interleaved(
      calls, args.repeats)):
    if isinstance(key, tuple):
      rows[key[1]]['ceiling_images_per_s'] = args.batch / seconds
    else:
      rows[key]['images_per_s'] = args.batch / seconds
  return rows


def measure_frozen(name, dtype_name, args) -> Dict[str, Dict[str, Any]]:
  """The training loop's step with every parameter trained vs the head only.

  Both are `train.make_update_fn` (the pmapped step of `vit_jax.main`, here
  on one device) with this script's optimizer; 'head' passes
  `trainable_mask=trainable.trainable_mask(params, 'head')` and an optimizer
  state of the head's parameters alone, as `config.trainable='head'` does.
  Without gradients for the backbone the head-only step is a forward pass
  plus the head's weight gradient. The two steps' calls are interleaved.

  Returns:
    {'all': row, 'head': row}, rows with the fields of `prepare_train`'s rows and images_per_s.
  """
  # vit_jax.train imports TensorFlow (input pipeline): only this section
  # pays for it.
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  model = build(name, dtype_name, args, remat_policy=args.remat_policy,
                scan=args.scan)
  images, labels = batch_arrays(args.batch, args.image_size, args.num_classes)
  params = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False)[
      'params'])(images[:1])  # Jitted: eager init dispatches op by op.
  tx = make_optimizer()
  # One device: the leading axis of pmap; replicated with the step's axis
  # name as train.PmapRunner.place does, so the first call does not
  # recompile.
  devices = jax.local_devices()[:1]
  batch = {'image': images[None], 'label': labels[None]}
  rng = jnp.asarray(jax.random.PRNGKey(1))[None]
  fwd = vit_forward_flops(model, args.image_size)
  rows, steps = {}, []
  for trained in FROZEN_STEPS:
    mask = (None if trained == 'all' else
            trainable.trainable_mask(params, trained))
    update = train.make_update_fn(apply_fn=model.apply, accum_steps=1, tx=tx,
                                  trainable_mask=mask)
    state = list(flax.jax_utils.replicate(
        (params, tx.init(trainable.partition(params, mask)[0])),
        devices=devices, axis_name=train.AXIS))
    t0 = time.perf_counter()
    compiled = update.lower(state[0], state[1], batch, rng).compile()
    compile_s = time.perf_counter() - t0

    def step(compiled=compiled, state=state):
      state[0], state[1], loss, _ = compiled(state[0], state[1], batch, rng)
      return loss

    steps.append(step)
    if fwd is None:
      flops = None
    elif trained == 'all':
      flops = 3 * fwd
    else:  # Forward, and the head's weight gradient (as many FLOPs again).
      flops = fwd + head_flops(model, args.image_size)
    rows[trained] = dict(
        compile_s=compile_s, peak_bytes=peak_bytes(compiled), flops=flops,
        xla_flops=_per_image(xla_flops(compiled), args.batch),
        trainable=trainable.count(trainable.partition(params, mask)[0]),
        params=trainable.count(params))
  seconds = median_seconds_interleaved(steps, args.repeats)
  for trained, s in zip(FROZEN_STEPS, seconds):
    rows[trained]['images_per_s'] = args.batch / s
  return rows


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
      num_classes=ours.num_classes, patches=ours.patches,
      hidden_size=ours.hidden_size, classifier=ours.classifier,
      representation_size=ours.representation_size,
      transformer=dict(num_layers=t.num_layers, mlp_dim=t.mlp_dim,
                       num_heads=t.num_heads, dropout_rate=t.dropout_rate,
                       attention_dropout_rate=t.attention_dropout_rate))


def check_same_function(original, ours, params, images, scan=False):
  """Fails unless the original gives our float32 logits on `params`."""
  per_layer = layouts.scan_to_layers(params) if scan else params
  abstract = jax.eval_shape(
      lambda x: original.init(jax.random.key(0), x, train=False)['params'],
      images)
  if (jax.tree_util.tree_structure(abstract) !=
      jax.tree_util.tree_structure(per_layer)):
    raise SystemExit('--original: its parameter tree differs from ours; is '
                     'it google-research/vision_transformer?')
  apply = lambda m, p: jax.jit(lambda p, x: m.apply({'params': p}, x,
                                                    train=False))(p, images)
  diff = float(jnp.max(jnp.abs(apply(original, per_layer) -
                               apply(ours, params))))
  if diff > 1e-4:
    raise SystemExit(f'--original: logits differ from ours by {diff:.2g}.')
  return diff


TIMM_NAMES = {'ViT-Ti_16': 'vit_tiny_patch16_224',
              'ViT-S_16': 'vit_small_patch16_224',
              'ViT-B_16': 'vit_base_patch16_224'}


def timm_inference(name: str, args) -> Dict[str, float]:
  """timm's inference images/s per dtype (bfloat16: CPU autocast), or {}.

  PyTorch with all cores, batch and image size of the run, random weights,
  `torch.inference_mode()`, median of `args.repeats` after two warm-ups.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import timm  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(f'--timm needs PyTorch and timm ({e}); install them '
                     '(pip install torch timm) or leave out --timm.') from e
  if name not in TIMM_NAMES:
    return {}
  torch.set_num_threads(os.cpu_count())
  model = timm.create_model(TIMM_NAMES[name], pretrained=False,
                            num_classes=args.num_classes,
                            img_size=args.image_size).eval()
  x = torch.randn(args.batch, 3, args.image_size, args.image_size)
  out = {}
  for d in args.dtypes:
    def call(d=d):
      with torch.inference_mode(), torch.autocast(
          'cpu', dtype=torch.bfloat16, enabled=d == 'bfloat16'):
        return model(x)
    call()
    call()
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      call()
      times.append(time.perf_counter() - t0)
    out[d] = args.batch / statistics.median(times)
  return out


def _per_image(flops, batch):
  return None if flops is None else flops / batch


def compile_train_step(model, batch, image_size, num_classes):
  """Compiles the training step on abstract inputs; nothing is allocated."""
  params = abstract_params(model, batch, image_size)
  tx = make_optimizer()
  opt_state = jax.eval_shape(tx.init, params)
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3),
                                jnp.float32)
  labels = jax.ShapeDtypeStruct((batch, num_classes), jnp.float32)
  rng = jax.eval_shape(lambda: jax.random.key(1))
  return compile_timed(make_train_step(model, tx), params, opt_state, images,
                       labels, rng, donate_argnums=(0, 1))


def largest_batch_within(model, budget_bytes, image_size, num_classes,
                         log=None) -> Dict[str, Any]:
  """Largest training batch whose compiled peak memory is <= budget_bytes.

  A bracketing search on `compiled.memory_analysis()` (compile only, nothing
  runs): memory is close to affine in the batch, so each probe interpolates
  between the largest batch known to fit and the smallest known not to;
  the bracket still shrinks every probe, so the answer is exact.
  """
  peaks = {}

  def peak(batch):
    if batch not in peaks:
      compiled, seconds = compile_train_step(model, batch, image_size,
                                             num_classes)
      peaks[batch] = peak_bytes(compiled)
      if log:
        log(f'    batch {batch:5d}: peak {peaks[batch] / GiB:7.2f} GiB '
            f'(compiled in {seconds:.1f} s)')
    return peaks[batch]

  if peak(1) > budget_bytes:
    return dict(batch=0, peak_bytes=peaks[1], probes=len(peaks))
  lo, hi = 1, None
  guess = 8
  while hi is None:  # Extrapolate until the budget is exceeded.
    if peak(guess) <= budget_bytes:
      lo = guess
      slope = (peaks[lo] - peaks[1]) / max(lo - 1, 1)
      guess = min(max(2 * lo, int(lo + (budget_bytes - peaks[lo]) /
                                  max(slope, 1) * 1.05) + 1), 16 * lo)
    else:
      hi = guess
  while hi - lo > 1:
    frac = (budget_bytes - peaks[lo]) / (peaks[hi] - peaks[lo])
    mid = min(max(lo + int(frac * (hi - lo)), lo + 1), hi - 1)
    if peak(mid) <= budget_bytes:
      lo = mid
    else:
      hi = mid
  return dict(batch=lo, peak_bytes=peaks[lo], probes=len(peaks))


# ---------------------------------------------------------------------------
# Reporting.


def _fmt(x, spec='.1f', none='-'):
  return none if x is None else format(x, spec)


def print_table(header: Sequence[str], rows: List[Sequence[str]]):
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  line = lambda cells: '| ' + ' | '.join(
      str(c).rjust(w) for c, w in zip(cells, widths)) + ' |'
  print(line(header))
  print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
  for row in rows:
    print(line(row))


def describe_machine() -> str:
  """Device, and the host CPU's name, family, model and wide-vector flags."""
  dev = jax.devices()[0]
  return (f'{dev.platform} / {dev.device_kind} x{jax.device_count()}; host '
          f'{machine.cpu_description()}')


def models_vit_impls():
  from vit_jax import models_vit  # pylint: disable=g-import-not-at-top
  return models_vit.ATTENTION_IMPLS


def parse_args(argv):
  sections = __doc__[__doc__.index('Sections ('):
                     __doc__.index('Every timed number')]
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      epilog=__doc__[__doc__.index('Command ('):__doc__.index('Sections (')]
      + sections,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--models', default='ViT-Ti_16,ViT-S_16,ViT-B_16',
                 help='comma-separated zoo names for infer/train/frozen')
  p.add_argument('--dtypes', default='float32,bfloat16',
                 help='compute dtypes (parameters are always float32)')
  p.add_argument('--batch', type=int, default=None,
                 help='images per call (default 8 on CPU, 128 on GPU)')
  p.add_argument('--repeats', type=int, default=9,
                 help='timed calls per number; the median is reported')
  p.add_argument('--what', default=','.join(SECTIONS),
                 help=f'comma-separated sections of {SECTIONS} (see below); '
                 '\'frozen\' alone: train (all) vs train (head only)')
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--num-classes', type=int, default=1000)
  p.add_argument('--attention-impl', default='reference',
                 choices=models_vit_impls())
  p.add_argument('--token-only-last-block', action='store_true',
                 help='VisionTransformer.token_only_last_block=True: the last '
                 'block computes the class token only (same logits)')
  p.add_argument('--original', default=None, metavar='DIR',
                 help='a clone of google-research/vision_transformer: its '
                 'float32 model is timed too (infer, train), interleaved with '
                 'ours on the same parameters, and the targets are judged '
                 'against it')
  p.add_argument('--ceiling-shapes', type=int, default=0, metavar='N',
                 help='with the ceiling: also time each distinct matmul '
                 'alone and print the N taking the most time per step '
                 '(shape, count, GFLOP/s)')
  p.add_argument('--timm', action='store_true',
                 help='also time timm inference (needs torch and timm)')
  p.add_argument('--scan', action='store_true',
                 help='infer/train/frozen with scan=True')
  p.add_argument('--remat-policy', default='none',
                 help='remat policy of the train and frozen sections')
  p.add_argument('--matmul-size', type=int, default=None,
                 help='n of the n^3 peak matmul (default 2048 CPU, 8192 GPU)')
  p.add_argument('--budget-gib', type=float, default=4.0,
                 help='memory budget of the remat section')
  p.add_argument('--remat-model', default='ViT-B_16')
  p.add_argument('--remat-configs',
                 default='loop:none,loop:full,scan:none,scan:full',
                 help='BLOCKS:POLICY pairs of the remat section; BLOCKS is '
                 'loop or scan')
  p.add_argument('--compile-model', default='ViT-L_16')
  p.add_argument('--compile-repeats', type=int, default=3,
                 help='compiles per variant in the compile section')
  args = p.parse_args(argv)
  args.models = [models.canonical_name(m) for m in args.models.split(',') if m]
  args.dtypes = [d for d in args.dtypes.split(',') if d]
  for d in args.dtypes:
    if d not in DTYPES:
      p.error(f'--dtypes: unknown {d!r}; use {tuple(DTYPES)}')
  args.what = [w for w in args.what.split(',') if w]
  for w in args.what:
    if w not in SECTIONS:
      p.error(f'--what: unknown section {w!r}; use {SECTIONS}')
  if 'ceiling' in args.what and not {'infer', 'train'} & set(args.what):
    p.error('--what: ceiling measures the infer and train sections\' '
            'functions; add infer and/or train (e.g. --what train,ceiling)')
  on_gpu = jax.default_backend() == 'gpu'
  if args.batch is None:
    args.batch = 128 if on_gpu else 8
  if args.matmul_size is None:
    args.matmul_size = 8192 if on_gpu else 2048
  return args


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  program = (['-m', __spec__.name] if globals().get('__spec__') else
             sys.argv[:1])
  print('command:', ' '.join(['python'] + program + argv))
  print(f'jax {jax.__version__}, jaxlib {jax.lib.__version__}, '
        f'backend {jax.default_backend()}')
  print('device:', describe_machine())
  print('XLA_FLAGS:', os.environ.get('XLA_FLAGS', '(unset)'),
        '| default_matmul_precision:', jax.config.jax_default_matmul_precision)
  print(f'batch {args.batch}, {args.image_size}x{args.image_size}, '
        f'{args.num_classes} classes, median of {args.repeats}, '
        f'attention_impl={args.attention_impl}, token_only_last_block='
        f'{args.token_only_last_block}, scan={args.scan}, '
        f'train remat_policy={args.remat_policy}')
  original = None
  if args.original and {'infer', 'train'} & set(args.what):
    original = load_original(args.original)
    print('original:', os.path.dirname(original.__file__))
  sys.stdout.flush()
  log = lambda *a: (print(*a), sys.stdout.flush())

  peak = {}
  if 'peak' in args.what:
    log(f'\n## Matmul peak as XLA sees it ({args.matmul_size}^3)')
    rows = []
    for d in ('float32', 'bfloat16'):
      peak[d] = matmul_gflops(args.matmul_size, d, args.repeats)
      label = 'float32' if d == 'float32' else 'bf16 in, f32 accumulate'
      ref = (MACHINE_MATMUL_GFLOPS[d] if jax.default_backend() == 'cpu'
             else None)
      rows.append([label, f'{peak[d]:.0f}', _fmt(ref, '.0f'),
                   _fmt(None if ref is None else peak[d] / ref, '.2f')])
    print_table(['matmul', 'GFLOP/s', 'MACHINE.md', 'ratio'], rows)

  results, originals, timm = {}, {}, {}
  for what in ('infer', 'train'):
    if what not in args.what:
      continue
    log(f'\n## {"Inference" if what == "infer" else "Training step"}'
        + (' (ours and the original, calls interleaved)' if original else
           ' (dtypes interleaved)'))
    for name in args.models:
      for key, r in measure(what, name, args, original).items():
        if key == 'original':
          originals[what, name] = r
        else:
          results[what, name, key] = r
        log(f'  {name} {key}: {r["images_per_s"]:.1f} img/s, compile '
            f'{r["compile_s"]:.1f} s, peak {_fmt(_gib(r["peak_bytes"]), ".2f")} '
            'GiB')
  if args.timm and 'infer' in args.what:
    log('\n## timm inference (PyTorch, random weights)')
    for name in args.models:
      for d, ips in timm_inference(name, args).items():
        timm[name, d] = ips
        log(f'  {TIMM_NAMES[name]} {d}: {ips:.1f} img/s')

  frozen = {}
  if 'frozen' in args.what:
    log('\n## Frozen backbone: the training loop\'s step '
        '(train.make_update_fn, one device), all parameters vs '
        'trainable=\'head\', calls interleaved')
    for name in args.models:
      for d in args.dtypes:
        frozen[name, d] = measure_frozen(name, d, args)
        for trained, r in frozen[name, d].items():
          results[FROZEN_LABELS[trained], name, d] = r
          log(f'  {name} {d} {FROZEN_LABELS[trained]} ({r["trainable"]:,} of '
              f'{r["params"]:,} parameters): {r["images_per_s"]:.1f} img/s, '
              f'compile {r["compile_s"]:.1f} s, peak '
              f'{_fmt(_gib(r["peak_bytes"]), ".2f")} GiB')

  if results:
    log('\n## Throughput (images/s), model FLOPs utilisation, compile, memory')
    rows = []
    rows_of = list(results.items()) + [
        ((what, name, 'original f32'), r)
        for (what, name), r in originals.items()]
    for (what, name, d), r in rows_of:
      gflop = None if r['flops'] is None else r['flops'] / 1e9
      if d == 'original f32':
        mfu = (None if gflop is None or 'float32' not in peak else
               gflop * r['images_per_s'] / peak['float32'])
      else:
        mfu = (None if gflop is None or d not in peak else
               gflop * r['images_per_s'] / peak[d])
      rows.append([what, name, d, f'{r["images_per_s"]:.1f}',
                   _fmt(gflop, '.2f'), _fmt(_div(r['xla_flops'], 1e9), '.2f'),
                   _fmt(None if mfu is None else 100 * mfu, '.0f'),
                   f'{r["compile_s"]:.1f}', _fmt(_gib(r['peak_bytes']), '.2f')])
    print_table(['step', 'model', 'dtype', 'img/s', 'GFLOP/img',
                 'XLA GFLOP/img', 'MFU %', 'compile s', 'peak GiB'], rows)
    print('GFLOP/img: analytic matmul FLOPs (train = 3x forward; head only = '
          'forward + the head\'s weight gradient); MFU uses it and the '
          'measured peak of the same dtype.')
    if frozen:
      print('train: this script\'s jitted step (as the original\'s numbers); '
            'train (all) / train (head only): train.make_update_fn, the '
            'training loop\'s pmapped step, trainable=None / \'head\'.')

  ceilings = {k: r for k, r in results.items()
              if r.get('ceiling_images_per_s')}
  if ceilings:
    log('\n## Matmul ceiling: the matmuls alone (bench.ceiling), calls '
        'interleaved with the full ones')
    rows = []
    for (what, name, d), r in ceilings.items():
      top = r['ceiling_images_per_s']
      orig, here = _original_images_per_s(originals, what, name)
      target = TARGET_X_ORIGINAL.get((what, name, d))
      gflop = r['matmul_flops'] / 1e9
      rows.append([
          what, name, d, f'{r["images_per_s"]:.1f}', f'{top:.1f}',
          f'{100 * r["images_per_s"] / top:.0f}', f'{gflop:.2f}',
          f'{gflop * top:.0f}',
          _fmt(_div(100 * gflop * top, peak.get(d)), '.0f'),
          _fmt(_div(top, orig), '.2f') + ('' if here or orig is None
                                          else '*'),
          '-' if target is None else f'>= {target:g}'])
    print_table(['step', 'model', 'dtype', 'img/s', 'matmuls alone img/s',
                 '% of ceiling', 'matmul GFLOP/img', 'matmul GFLOP/s',
                 '% of peak', 'ceiling x original', 'target'], rows)
    print('matmuls alone: every dot_general and convolution of the jitted '
          'function (forward and backward), nothing else: an estimate of the '
          'most the full call can reach with these matmuls (it can edge past '
          'it where its data stays in cache). '
          'matmul GFLOP/img: counted from the jaxpr. % of peak: against the '
          'n^3 matmul above. ceiling x original: the matmuls alone over the '
          'original\'s full call (* = MACHINE.md\'s number): a target above '
          'it is out of reach on this machine with these matmuls.')
    for (what, name, d), r in ceilings.items():
      if r.get('matmul_shapes'):
        print_matmul_shapes(f'{what} {name} {d}', r['matmul_shapes'],
                            args.ceiling_shapes, peak.get(d))

  if frozen:
    log('\n## Training only the head (trainable=\'head\') vs all parameters')
    rows = []
    for (name, d), r in frozen.items():
      full, head = r['all'], r['head']
      rows.append([
          name, d, f'{head["trainable"]:,} / {head["params"]:,}',
          f'{full["images_per_s"]:.1f}', f'{head["images_per_s"]:.1f}',
          f'{head["images_per_s"] / full["images_per_s"]:.2f}',
          f'{full["compile_s"]:.1f}', f'{head["compile_s"]:.1f}',
          _fmt(_gib(full['peak_bytes']), '.2f'),
          _fmt(_gib(head['peak_bytes']), '.2f'),
          _fmt(_div(head['peak_bytes'], full['peak_bytes']), '.2f')])
    print_table(['model', 'dtype', 'head params', 'train (all) img/s',
                 'train (head only) img/s', 'x (head/all)',
                 'compile all s', 'compile head s', 'peak all GiB',
                 'peak head GiB', 'peak head/all'], rows)
    print('x (head/all): images/s of the head-only step over the full step, '
          'same batch and dtype, interleaved calls (on a loaded machine only '
          'this ratio is indicative).')

  if any(what in ('infer', 'train') for what, _, _ in results):
    comparable = (jax.default_backend() == 'cpu' and args.batch == 8 and
                  args.image_size == 224 and args.num_classes == 1000)
    log('\n## Against the original and the targets' + (
        '' if comparable else ' -- NOT comparable: other backend or sizes'))
    rows = []
    for (what, name, d), r in results.items():
      ips = r['images_per_s']
      orig, here = _original_images_per_s(originals, what, name)
      timm_ips = timm.get((name, d)) if what == 'infer' else None
      timm_ref = (timm_ips if timm_ips is not None else
                  TIMM_IMAGES_PER_S.get((what, name, d)))
      target = TARGET_X_ORIGINAL.get((what, name, d))
      x_orig = _div(ips, orig)
      met = '-'
      if target is not None and x_orig is not None:
        met = x_orig >= target
        if (what, name, d) in TARGET_ABOVE_TIMM and timm_ref is not None:
          met = met and ips > timm_ref
        met = 'yes' if met else 'NO'
      star = lambda v, measured: _fmt(v) + ('' if measured or v is None
                                            else '*')
      rows.append([
          what, name, d, f'{ips:.1f}', star(orig, here),
          _fmt(x_orig, '.2f'),
          '-' if target is None else f'>= {target:g}' + (
              ' & > timm' if (what, name, d) in TARGET_ABOVE_TIMM else ''),
          met, star(timm_ref, timm_ips is not None),
          _fmt(_div(ips, timm_ref), '.2f')])
    print_table(['step', 'model', 'dtype', 'img/s', 'original f32 img/s',
                 'x original', 'target', 'met', 'timm img/s', 'x timm'], rows)
    print('original: the original vit_jax in float32, measured in this run '
          '(--original) on the same parameters; * = not measured here, the '
          'number of the project\'s shared/MACHINE.md instead (another CPU of the same '
          'name can be half as fast: compare the matmul peaks above). timm: '
          'measured here with --timm (inference), else MACHINE.md (*).')

  if 'compile' in args.what:
    log(f'\n## {args.compile_model} training-step compile time, scan vs loop '
        f'(batch {args.batch}, float32, compile only, median of '
        f'{args.compile_repeats}, alternating)')
    secs = {False: [], True: []}
    for _ in range(args.compile_repeats):
      for scan in (False, True):
        # A new module and step function each time: nothing is cached.
        model = models.get_model(args.compile_model,
                                 num_classes=args.num_classes, scan=scan)
        _, seconds = compile_train_step(model, args.batch, args.image_size,
                                        args.num_classes)
        secs[scan].append(seconds)
        log(f'  scan={scan}: {seconds:.1f} s')
    loop_s, scan_s = (statistics.median(secs[k]) for k in (False, True))
    ratio = scan_s / loop_s
    print_table(['scan=False s', 'scan=True s', 'ratio', 'target', 'met'],
                [[f'{loop_s:.1f}', f'{scan_s:.1f}', f'{ratio:.2f}',
                  f'<= {TARGET_SCAN_COMPILE_RATIO:.2f}',
                  'yes' if ratio <= TARGET_SCAN_COMPILE_RATIO else 'NO']])

  if 'remat' in args.what:
    budget = int(args.budget_gib * GiB)
    log(f'\n## Largest {args.remat_model} training batch within '
        f'{args.budget_gib:g} GiB (compiled peak memory, float32, compile '
        'only)')
    found = {}
    for config in args.remat_configs.split(','):
      layout, policy = config.split(':')
      log(f'  {layout} remat_policy={policy}:')
      model = models.get_model(args.remat_model, num_classes=args.num_classes,
                               remat_policy=policy, scan=layout == 'scan')
      found[layout, policy] = largest_batch_within(
          model, budget, args.image_size, args.num_classes, log=log)
    base = found.get(('loop', 'none'), found.get(('scan', 'none'), {}))
    base = base.get('batch')
    rows = []
    for (layout, policy), r in found.items():
      ratio = _div(r['batch'], base)
      rows.append([layout, policy, r['batch'], f'{r["peak_bytes"] / GiB:.2f}',
                   r['probes'], _fmt(ratio, '.2f'),
                   '-' if policy != 'full' or ratio is None else
                   ('yes' if ratio >= TARGET_REMAT_BATCH_RATIO else 'NO')])
    print_table(['blocks', 'remat_policy', 'max batch', 'peak GiB', 'compiles',
                 'x default', f'>= {TARGET_REMAT_BATCH_RATIO:g}x'], rows)
    print('x default: against the default model (loop, no remat). On XLA:CPU '
          'remat saves memory only under scan: without it the scheduler runs '
          'the recomputation early and keeps its outputs as long as the '
          'forward\'s.')


def print_matmul_shapes(title, timings, top, peak_gflops):
  """The `top` ceiling.ShapeTimings taking the most time, as a table."""
  total = sum(t.count * t.seconds for t in timings)
  shown = timings[:top]
  shown_s = sum(t.count * t.seconds for t in shown)
  print(f'\n### {title}: matmuls by shape, each timed alone ({len(shown)} of '
        f'{len(timings)} shapes, {100 * shown_s / total:.0f}% of their time)')
  print('(Each op timed alone, a few ms: such timings move by up to 2x between '
        'runs on a shared machine; the ceiling above, all in one call, less.)')
  print_table(
      ['ms/step', '% of matmul time', 'count', 'ms each', 'GFLOP/s',
       '% of peak', 'op'],
      [[f'{1e3 * t.count * t.seconds:.1f}',
        f'{100 * t.count * t.seconds / total:.0f}', t.count,
        f'{1e3 * t.seconds:.2f}', f'{t.gflops_per_s:.0f}',
        _fmt(_div(100 * t.gflops_per_s, peak_gflops), '.0f'), t.describe()]
       for t in shown])


def _original_images_per_s(originals, what, name):
  """(images/s, measured in this run?): `originals`, else MACHINE.md."""
  here = originals.get((what, name))
  if here:
    return here['images_per_s'], True
  return ORIGINAL_IMAGES_PER_S.get((what, name)), False


def _gib(n):
  return None if n is None else n / GiB


def _div(a, b):
  return None if a is None or not b else a / b


if __name__ == '__main__':
  main()

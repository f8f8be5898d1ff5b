"""The functions `bench.throughput` times: inference and training steps.

`measure` times a zoo model's `model.apply(..., train=False)` ('infer') or
the original's fine-tuning step ('train': forward, backward, global-norm clip
1.0, SGD momentum 0.9 with a bfloat16 momentum buffer, parameters donated)
per dtype, optionally beside the original's model and the matmul ceiling;
`measure_frozen` the training loop's own step, all parameters vs the head
only; `largest_batch_within` the largest training batch within a memory
budget (compile only):

  args = throughput.parse_args(['--models', 'ViT-S_16', '--what', 'train'])
  rows = throughput_steps.measure('train', 'ViT-S_16', args)
"""

import time
from typing import Any, Callable, Dict, Tuple

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import ceiling
from bench import throughput_metrics
from bench import throughput_original
from vit_jax import models
from vit_jax.checkpoints import layouts
from vit_jax.training import trainable

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# The frozen section: `trainable` of each step (train.make_update_fn), and
# the step's name in the tables.
FROZEN_STEPS = ('all', 'head')
FROZEN_LABELS = {'all': 'train (all)', 'head': 'train (head only)'}


def build(name: str, dtype_name: str, args, **kw):
  return models.get_model(
      name,
      num_classes=args.num_classes,
      dtype=DTYPES[dtype_name],
      attention_impl=args.attention_impl,
      token_only_last_block=args.token_only_last_block,
      **kw)


def abstract_params(model, batch: int, image_size: int):
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False)['params'], images)


def make_optimizer():
  """The original's fine-tuning update: clip 1.0, SGD momentum 0.9 (bf16)."""
  return optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.sgd(
          learning_rate=0.01, momentum=0.9, accumulator_dtype=jnp.bfloat16))


def make_train_step(model, tx):
  """(params, opt_state, images, labels, rng) -> (params, opt_state, loss)."""

  def loss_fn(params, images, labels, rng):
    logits = model.apply({'params': params},
                         images,
                         train=True,
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
  labels = np.eye(
      num_classes, dtype=np.float32)[rng.integers(0, num_classes, batch)]
  return jnp.asarray(images, jnp.float32), jnp.asarray(labels)


def prepare_infer(model, params, args) -> Tuple[Callable[[], Any], Dict]:
  """(call, row without images_per_s) of jitted `model.apply(train=False)`."""
  images, _ = batch_arrays(args.batch, args.image_size, args.num_classes)
  infer = lambda p, x: model.apply({'params': p}, x, train=False)
  compiled, compile_s = throughput_metrics.compile_timed(infer, params, images)
  return (lambda: compiled(params, images)), dict(
      compile_s=compile_s,
      peak_bytes=throughput_metrics.peak_bytes(compiled),
      flops=throughput_metrics.vit_forward_flops(model, args.image_size),
      xla_flops=throughput_metrics.per_image(
          throughput_metrics.xla_flops(compiled), args.batch),
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
  compiled, compile_s = throughput_metrics.compile_timed(
      train_step, *state, images, labels, rng, donate_argnums=(0, 1))

  def step():
    state[0], state[1], loss = compiled(state[0], state[1], images, labels, rng)
    return loss

  fwd = throughput_metrics.vit_forward_flops(model, args.image_size)
  return step, dict(
      compile_s=compile_s,
      peak_bytes=throughput_metrics.peak_bytes(compiled),
      flops=None if fwd is None else 3 * fwd,
      xla_flops=throughput_metrics.per_image(
          throughput_metrics.xla_flops(compiled), args.batch),
      traced=traced)


def _abstract(tree):
  """ShapeDtypeStructs of `tree`'s arrays (to trace without touching them)."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


PREPARE = {'infer': prepare_infer, 'train': prepare_train}


def measure(what: str,
            name: str,
            args,
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
  kw = {} if what == 'infer' else dict(
      remat_policy=args.remat_policy, scan=args.scan)
  ours = {d: build(name, d, args, **kw) for d in args.dtypes}
  images, _ = batch_arrays(args.batch, args.image_size, args.num_classes)
  first = next(iter(ours.values()))
  params = jax.jit(
      lambda x: first.init(jax.random.key(0), x, train=False)['params'])(
          images[:1])  # Jitted: eager init dispatches op by op.
  variants = dict(ours)
  scanned = kw.get('scan', False)
  if original is not None:
    reference = build(name, 'float32', args, **kw)
    variants['original'] = throughput_original.original_model(
        original, reference)
    throughput_original.check_same_function(
        variants['original'], reference, params, images[:2], scan=scanned)
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
              f'outputs take {need / throughput_metrics.GiB:.1f} GiB, over '
              f'half the device\'s memory '
              f'({budget / throughput_metrics.GiB:.1f} GiB); a smaller '
              '--batch fits.')
        continue
      if args.ceiling_shapes:
        rows[key]['matmul_shapes'] = ceiling.by_shape(
            ops,
            lambda call: throughput_metrics.median_seconds(call, args.repeats))
      calls.append(ceiling.dots_only(ops))
      keys.append(('ceiling', key))
  if original is not None:  # The original computes every token to the end.
    rows['original'].pop('traced')
    full = models.get_model(name, num_classes=args.num_classes)
    rows['original']['flops'] = (
        throughput_metrics.vit_forward_flops(full, args.image_size) *
        (1 if what == 'infer' else 3))
  for key, seconds in zip(
      keys, throughput_metrics.median_seconds_interleaved(calls, args.repeats)):
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
    {'all': row, 'head': row}, rows with the fields of `prepare_train`'s
    rows and images_per_s.
  """
  # vit_jax.train imports TensorFlow (input pipeline): only this section
  # pays for it.
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  from vit_jax.parallel import runners  # pylint: disable=g-import-not-at-top
  model = build(
      name, dtype_name, args, remat_policy=args.remat_policy, scan=args.scan)
  images, labels = batch_arrays(args.batch, args.image_size, args.num_classes)
  params = jax.jit(
      lambda x: model.init(jax.random.key(0), x, train=False)['params'])(
          images[:1])  # Jitted: eager init dispatches op by op.
  tx = make_optimizer()
  # One device: the leading axis of pmap; replicated with the step's axis
  # name as runners.PmapRunner.place does, so the first call does not
  # recompile.
  devices = jax.local_devices()[:1]
  batch = {'image': images[None], 'label': labels[None]}
  rng = jnp.asarray(jax.random.PRNGKey(1))[None]
  fwd = throughput_metrics.vit_forward_flops(model, args.image_size)
  rows, steps = {}, []
  for trained in FROZEN_STEPS:
    mask = (None if trained == 'all' else trainable.trainable_mask(
        params, trained))
    update = train.make_update_fn(
        apply_fn=model.apply, accum_steps=1, tx=tx, trainable_mask=mask)
    state = list(
        flax.jax_utils.replicate(
            (params, tx.init(trainable.partition(params, mask)[0])),
            devices=devices,
            axis_name=runners.AXIS))
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
      flops = fwd + throughput_metrics.head_flops(model, args.image_size)
    rows[trained] = dict(
        compile_s=compile_s,
        peak_bytes=throughput_metrics.peak_bytes(compiled),
        flops=flops,
        xla_flops=throughput_metrics.per_image(
            throughput_metrics.xla_flops(compiled), args.batch),
        trainable=trainable.count(trainable.partition(params, mask)[0]),
        params=trainable.count(params))
  seconds = throughput_metrics.median_seconds_interleaved(steps, args.repeats)
  for trained, s in zip(FROZEN_STEPS, seconds):
    rows[trained]['images_per_s'] = args.batch / s
  return rows


def compile_train_step(model, batch, image_size, num_classes):
  """Compiles the training step on abstract inputs; nothing is allocated."""
  params = abstract_params(model, batch, image_size)
  tx = make_optimizer()
  opt_state = jax.eval_shape(tx.init, params)
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch, num_classes), jnp.float32)
  rng = jax.eval_shape(lambda: jax.random.key(1))
  return throughput_metrics.compile_timed(
      make_train_step(model, tx),
      params,
      opt_state,
      images,
      labels,
      rng,
      donate_argnums=(0, 1))


def largest_batch_within(model,
                         budget_bytes,
                         image_size,
                         num_classes,
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
      peaks[batch] = throughput_metrics.peak_bytes(compiled)
      if log:
        log(f'    batch {batch:5d}: peak '
            f'{peaks[batch] / throughput_metrics.GiB:7.2f} GiB '
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
      guess = min(
          max(2 * lo,
              int(lo + (budget_bytes - peaks[lo]) / max(slope, 1) * 1.05) + 1),
          16 * lo)
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

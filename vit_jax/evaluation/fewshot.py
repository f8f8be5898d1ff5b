"""Few-shot linear evaluation, the paper's cheap probe of a representation.

Paper Sec. 4.1 and Appendix B.3: freeze the model, fit a closed-form
regularised least-squares regression from the representation of `k` training
images per class to {-1, 1}^K targets, and report test accuracy, averaged
over random draws. `features` extracts the representation, `fewshot_probe`
fits the probes, `fewshot_data` reads the images. Command line:

  python -m vit_jax.evaluation.fewshot --model ViT-B_16 \
      --checkpoint ViT-B_16.npz --dataset embedded_mnist --shots 1,5,10
"""

import argparse
import sys
import time
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import checkpoint
from vit_jax import models
from vit_jax.evaluation import features
from vit_jax.evaluation import fewshot_data
from vit_jax.evaluation import fewshot_probe
from vit_jax.evaluation import trained_model

Params = Any

# ------------------------------------------------------------ evaluate


def _default_image_size(model, params):
  size = trained_model.image_size_from_params(model, params)
  if size is None:
    raise ValueError('Cannot infer the image size from the position '
                     'embedding; pass image_size.')
  return size


def evaluate(model,
             params: Params,
             dataset_name_or_arrays: Union[str, Sequence, Dict[str, Any]],
             *,
             shots: Sequence[int] = fewshot_probe.DEFAULT_SHOTS,
             seeds: Sequence[int] = fewshot_probe.DEFAULT_SEEDS,
             l2_reg: float = fewshot_probe.DEFAULT_L2_REG,
             l2_regs: Optional[Sequence[float]] = None,
             image_size: Optional[int] = None,
             train_split: str = 'train',
             test_split: str = 'test',
             max_per_class: Optional[int] = None,
             max_test_examples: Optional[int] = None,
             batch_size: int = features.DEFAULT_BATCH_SIZE,
             data_dir: Optional[str] = None,
             return_per_seed: bool = False) -> Dict[int, Any]:
  """Few-shot linear evaluation of a model's frozen representation.

  Args:
    model: a VisionTransformer.
    params: its parameters (unreplicated).
    dataset_name_or_arrays: a dataset name for `vit_jax.input_pipeline`, or
      `(train_images, train_labels, test_images, test_labels)` (a tuple or a
      dict with those keys), images float32 [N, H, W, 3] in [-1, 1].
    shots: k values.
    seeds: draws per k.
    l2_reg: ridge strength; `l2_regs`, if given, a sweep to choose it per
      draw (`fewshot_probe.fewshot_accuracies`).
    image_size: for dataset names; default from the position embedding.
    max_per_class: cap of the training pool per class (default: all).
    max_test_examples: cap of the test split, balanced over classes.
    return_per_seed: return {k: [accuracy per seed]} instead of means.

  Returns:
    {k: mean accuracy over seeds}.
  """
  shots = tuple(int(k) for k in shots)
  feature_fn = features.make_feature_fn(model, batch_size)
  if isinstance(dataset_name_or_arrays, str):
    data = _dataset_features(
        model,
        params,
        feature_fn,
        dataset_name_or_arrays,
        shots=shots,
        l2_regs=l2_regs,
        image_size=image_size,
        train_split=train_split,
        test_split=test_split,
        max_per_class=max_per_class,
        max_test_examples=max_test_examples,
        batch_size=batch_size,
        data_dir=data_dir)
  else:
    data = _array_features(
        params,
        feature_fn,
        dataset_name_or_arrays,
        shots=shots,
        l2_regs=l2_regs)
  per_seed = fewshot_probe.fewshot_accuracies(
      data.train_x,
      data.train_y,
      data.test_x,
      data.test_y,
      shots=shots,
      seeds=seeds,
      l2_reg=l2_reg,
      l2_regs=l2_regs,
      num_classes=data.num_classes,
      class_names=data.class_names)
  if return_per_seed:
    return per_seed
  return {k: float(np.mean(v)) for k, v in per_seed.items()}


class _Features(NamedTuple):
  """Features and labels of the training pool and the test split."""
  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int
  class_names: Optional[Sequence[str]]


def _dataset_features(model, params, feature_fn, dataset, *, shots, l2_regs,
                      image_size, train_split, test_split, max_per_class,
                      max_test_examples, batch_size, data_dir) -> _Features:
  """`_Features` of a dataset read through `fewshot_data` (args: `evaluate`)."""
  info = fewshot_data.dataset_info(dataset, train_split, data_dir)
  num_classes, class_names = info['num_classes'], info.get('int2str')
  image_size = image_size or _default_image_size(model, params)

  def features_of(split, **caps):
    feats, labels = [], []
    for images, y in fewshot_data.capped(
        fewshot_data.iter_split(
            dataset,
            split,
            image_size=image_size,
            batch_size=batch_size,
            data_dir=data_dir),
        num_classes=num_classes,
        **caps):
      feats.append(feature_fn(params, images))
      labels.append(y)
    if not feats:
      raise ValueError(f'{dataset} split {split!r} yielded no examples.')
    return np.concatenate(feats), np.concatenate(labels)

  train_x, train_y = features_of(train_split, max_per_class=max_per_class)
  # Fail before the (longer) test pass if a class is short.
  fewshot_probe.check_shots(
      train_y,
      shots,
      num_classes,
      class_names=class_names,
      extra_per_class=5 if l2_regs else 0,
      where=f' in {dataset} split {train_split!r}' +
      (f' with max_per_class={max_per_class}' if max_per_class else ''))
  test_x, test_y = features_of(test_split, max_examples=max_test_examples)
  return _Features(train_x, train_y, test_x, test_y, num_classes, class_names)


def _array_features(params, feature_fn, data, *, shots, l2_regs) -> _Features:
  """`_Features` of in-memory arrays (a 4-tuple or a dict; see `evaluate`)."""
  if isinstance(data, dict):
    data = tuple(data[k] for k in ('train_images', 'train_labels',
                                   'test_images', 'test_labels'))
  if len(data) != 4:
    raise ValueError('Arrays must be (train_images, train_labels, '
                     'test_images, test_labels).')
  train_images, train_y, test_images, test_y = data
  train_y = fewshot_probe.int_labels(train_y)
  test_y = fewshot_probe.int_labels(test_y)
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  fewshot_probe.check_shots(
      train_y, shots, num_classes, extra_per_class=5 if l2_regs else 0)
  train_x = feature_fn(params, train_images)
  test_x = feature_fn(params, test_images)
  return _Features(train_x, train_y, test_x, test_y, num_classes, None)


# ------------------------------------------------------- during training


def _unreplicate_if_needed(params, reference_shapes):
  """Device 0's copy of pmap-replicated params (one extra leading axis)."""
  leaf = params['embedding']['kernel']
  ref = reference_shapes['embedding']['kernel'].shape
  if tuple(leaf.shape) == tuple(ref):
    return params
  if tuple(leaf.shape[1:]) == tuple(ref):
    return jax.tree_util.tree_map(lambda x: x[0], params)
  raise ValueError(f'embedding/kernel has shape {tuple(leaf.shape)}; the model '
                   f'expects {tuple(ref)}.')


class _EvaluatorSettings(NamedTuple):
  """What `make_fewshot_evaluator` reads from the config, defaults filled."""
  dataset: str
  image_size: int
  shots: tuple
  seeds: tuple
  l2_reg: float
  batch_size: int
  train_split: str
  test_split: str
  max_per_class: Optional[int]
  max_test: Optional[int]
  data_dir: Optional[str]


def _evaluator_settings(config) -> _EvaluatorSettings:
  """`config.fewshot`'s fields, None ones replaced by their defaults."""
  fs = config.get('fewshot') or {}
  get = lambda key, default: (
      fs.get(key) if fs.get(key) is not None else default)
  dataset = get('dataset', config.get('dataset') or 'embedded_mnist')
  image_size = get('image_size', None)
  if image_size is None:
    from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    height, width = input_pipeline.get_image_size(config)
    if height != width:
      raise ValueError(f'Few-shot evaluation uses square images; set '
                       f'config.fewshot.image_size (pp.crop is '
                       f'{height}x{width}).')
    image_size = height
  return _EvaluatorSettings(
      dataset=dataset,
      image_size=int(image_size),
      shots=tuple(int(k) for k in get('shots', fewshot_probe.DEFAULT_SHOTS)),
      seeds=tuple(int(s) for s in get('seeds', fewshot_probe.DEFAULT_SEEDS)),
      l2_reg=float(get('l2_reg', fewshot_probe.DEFAULT_L2_REG)),
      batch_size=int(
          get('batch_size',
              config.get('batch_eval') or features.DEFAULT_BATCH_SIZE)),
      train_split=get('train_split', 'train'),
      test_split=get('test_split', 'test'),
      max_per_class=get('max_per_class', None),
      max_test=get('max_test_examples', None),
      data_dir=config.get('tfds_data_dir'))


def _model_from_config(config):
  """The VisionTransformer of `config.model`, else of `config.model_name`."""
  if config.get('model') is not None:
    fields = {k: v for k, v in config.model.items() if k != 'num_classes'}
    return models.VisionTransformer(num_classes=None, **fields)
  return models.get_model(config.model_name)


def _load_images(s: _EvaluatorSettings) -> dict:
  """{'num_classes', 'train': (images, labels), 'test': (images, labels)}."""
  info = fewshot_data.dataset_info(s.dataset, s.train_split, s.data_dir)
  train = fewshot_data.load_split(
      s.dataset,
      s.train_split,
      image_size=s.image_size,
      max_per_class=s.max_per_class,
      batch_size=s.batch_size,
      data_dir=s.data_dir)
  fewshot_probe.check_shots(
      train[1],
      s.shots,
      info['num_classes'],
      class_names=info.get('int2str'),
      where=f' in {s.dataset} split {s.train_split!r}')
  test = fewshot_data.load_split(
      s.dataset,
      s.test_split,
      image_size=s.image_size,
      max_examples=s.max_test,
      batch_size=s.batch_size,
      data_dir=s.data_dir)
  return {'num_classes': info['num_classes'], 'train': train, 'test': test}


def make_fewshot_evaluator(config,
                           *,
                           model=None) -> Callable[[Params], Dict[str, float]]:
  """A periodic few-shot evaluation for a training loop.

  Reads `config.fewshot` (dataset, splits, shots, seeds, l2_reg, image_size,
  max_per_class, max_test_examples, batch_size; unset fields default to the
  run's dataset, crop and eval batch, or this package's defaults). Images
  are loaded at the first call and kept in memory. `model` defaults to one
  built from `config.model` or `config.model_name`.

  Returns:
    `evaluator(params) -> {'fewshot/{k}shot': mean accuracy}`; params may be
    pmap-replicated.
  """
  s = _evaluator_settings(config)
  if model is None:
    model = _model_from_config(config)
  feature_fn = features.make_feature_fn(model, s.batch_size)
  reference = jax.eval_shape(lambda: features.feature_model(model).init(
      jax.random.key(0),
      jnp.zeros((1, s.image_size, s.image_size, 3)),
      train=False))['params']
  cache = {}

  def evaluator(params):
    if not cache:
      cache.update(_load_images(s))
    params = _unreplicate_if_needed(params, reference)
    train_x = feature_fn(params, cache['train'][0])
    test_x = feature_fn(params, cache['test'][0])
    per_seed = fewshot_probe.fewshot_accuracies(
        train_x,
        cache['train'][1],
        test_x,
        cache['test'][1],
        shots=s.shots,
        seeds=s.seeds,
        l2_reg=s.l2_reg,
        num_classes=cache['num_classes'])
    return {f'fewshot/{k}shot': float(np.mean(v)) for k, v in per_seed.items()}

  return evaluator


# ---------------------------------------------------------------- main


def _parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m vit_jax.evaluation.fewshot',
      description='Few-shot linear evaluation of a ViT checkpoint.')
  parser.add_argument('--model', required=True, help='zoo name, e.g. ViT-B_16')
  parser.add_argument(
      '--checkpoint',
      default=None,
      help='.npz checkpoint; omitted = random initialisation')
  parser.add_argument(
      '--dataset',
      default='embedded_mnist',
      help='embedded_mnist | TFDS name | image folder')
  parser.add_argument(
      '--shots', default='1,5,10,25', help='comma-separated k values')
  parser.add_argument(
      '--seeds',
      type=int,
      default=3,
      help='number of draws per k (seeds 0..N-1)')
  parser.add_argument(
      '--l2-reg', type=float, default=fewshot_probe.DEFAULT_L2_REG)
  parser.add_argument(
      '--select-l2',
      action='store_true',
      help='choose l2 per draw from 2^-10..2^20 on held-out '
      'pool images')
  parser.add_argument(
      '--image-size',
      type=int,
      default=None,
      help='default: from the checkpoint position embedding')
  parser.add_argument('--train-split', default='train')
  parser.add_argument('--test-split', default='test')
  parser.add_argument('--max-per-class', type=int, default=None)
  parser.add_argument(
      '--max-test-examples',
      type=int,
      default=None,
      help='first N test images, balanced over classes')
  parser.add_argument(
      '--batch-size', type=int, default=features.DEFAULT_BATCH_SIZE)
  parser.add_argument('--data-dir', default=None, help='TFDS data dir')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = _parse_args(argv)
  try:
    shots = [int(k) for k in args.shots.split(',') if k.strip()]
    if args.checkpoint:
      model, params = trained_model.load_model(args.model, args.checkpoint)
      image_size = (
          args.image_size or
          trained_model.image_size_from_params(model, params))
      if image_size is None:
        raise ValueError('Cannot infer the image size from the checkpoint; '
                         'pass --image-size.')
      trained_model.check_params_fit(model, params, image_size)
    else:
      model = models.get_model(args.model)
      image_size = args.image_size or 224
      params = jax.jit(lambda: model.init(
          jax.random.key(0),
          jnp.zeros((1, image_size, image_size, 3)),
          train=False)['params'])()
    start = time.time()
    result = evaluate(
        model,
        params,
        args.dataset,
        shots=shots,
        seeds=range(args.seeds),
        l2_reg=args.l2_reg,
        l2_regs=fewshot_probe.L2_REG_SWEEP if args.select_l2 else None,
        image_size=image_size,
        train_split=args.train_split,
        test_split=args.test_split,
        max_per_class=args.max_per_class,
        max_test_examples=args.max_test_examples,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        return_per_seed=True)
  except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'{args.model} on {args.dataset} ({args.test_split}), '
        f'{args.seeds} seed(s), {time.time() - start:.1f}s:')
  for k, accs in result.items():
    print(f'  {k:3d}-shot accuracy: {np.mean(accs):.4f} '
          f'+- {np.std(accs):.4f}')
  return 0


if __name__ == '__main__':
  sys.exit(main())

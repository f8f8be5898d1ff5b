"""Inference: classify image files with a ViT checkpoint and print the top-k.

  python -m vit_jax.predict --model ViT-B_16 --checkpoint ViT-B_16.npz \
      cat.jpg dog.png [--topk 5] [--image-size 384] [--labels imagenet2012]
  python -m vit_jax.predict --workdir=/tmp/vit_mnist digit.png
  python -m vit_jax.predict --config configs/embedded.py \
      --checkpoint /tmp/mnist.npz digit.png

One of `--model` (a zoo name), `--workdir` (a finished training run) or
`--config` (its config file) names the architecture; `--checkpoint` is an
`.npz` (`vit_jax.checkpoints.export`), by default a workdir's newest train
state. Images get the evaluation preprocessing of `vit_jax.input_pipeline`.
`--labels` takes `imagenet2012`, a `.json` or `.txt` file, or a dataset name
(default: the run's names, else `class_names.json` next to the checkpoint,
else ImageNet's for 1000 classes, else indices).

For each readable image the path is printed, then `--topk` lines
`  <probability>  <class>` (also to `--output FILE`). Unreadable files are
reported on stderr and skipped. Exit code: 1 if any file failed, 2 for a bad
command line, checkpoint, workdir or config, else 0.
"""

import argparse
import os
import sys
from typing import Any, List, Optional, Sequence, Tuple, Union
import warnings

if __name__ == '__main__':
  # The command line's output is the predictions: no TensorFlow start-up
  # lines (its oneDNN notice and C++ log preamble). TensorFlow only decodes
  # and resizes images here, which oneDNN does not touch.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
from vit_jax.configs import experiments  # pylint: disable=g-import-not-at-top
from vit_jax.data import filesystem  # pylint: disable=g-import-not-at-top
from vit_jax.data import tf_import  # pylint: disable=g-import-not-at-top
from vit_jax.evaluation import label_names  # pylint: disable=g-import-not-at-top
from vit_jax.evaluation import trained_model  # pylint: disable=g-import-not-at-top

Params = Any
ImageLike = Union[str, os.PathLike, np.ndarray, Any]  # path, array or PIL image

SKIP_PREFIX = 'Skipping'
ZERO_HEAD_MESSAGE = (
    "this checkpoint's head is all zeros (an ImageNet-21k pre-training "
    'checkpoint?); fine-tune it first')


class ImageError(ValueError):
  """An image file that cannot be read or decoded."""


# ------------------------------------------------------------------ images


def load_image(path: Union[str, os.PathLike]) -> np.ndarray:
  """Decodes an image file to uint8 RGB [H, W, 3], as the input pipeline does.

  Grayscale is repeated, alpha dropped, animations give their first frame;
  PIL reads what TensorFlow cannot. Raises ImageError naming the file.
  """
  tf = tf_import.import_tensorflow()
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ImageError(f'{path}: no such file.')
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise ImageError(f'{path}: cannot read the file ({e}).') from e
  try:
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return image.numpy()
  except (tf.errors.OpError, ValueError) as tf_error:
    tf_reason = str(tf_error).strip().splitlines()[0] if str(tf_error) else ''
  # TensorFlow reads JPEG, PNG, GIF and BMP; PIL covers WebP, TIFF, ...
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(path) as im:
      return np.asarray(im.convert('RGB'))
  except Exception as e:  # pylint: disable=broad-except
    raise ImageError(
        f'{path}: not a readable image (TensorFlow: {tf_reason}; PIL: {e}). '
        'Check that the file is a complete JPEG/PNG/GIF/BMP/WebP image.') from e


def _as_uint8_rgb(image, name: str = 'image') -> np.ndarray:
  """Array or PIL image -> uint8 [H, W, 3]; gray repeated, alpha dropped."""
  if hasattr(image, 'convert') and not isinstance(image, np.ndarray):  # PIL
    return np.asarray(image.convert('RGB'))
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ImageError(f'{name}: expected an image [H, W], [H, W, 1], [H, W, 3] '
                     f'or [H, W, 4]; got an array of shape {image.shape}.')
  if image.dtype != np.uint8:
    raise ImageError(f'{name}: arrays must be uint8 pixels in [0, 255]; got '
                     f'{image.dtype}. Convert with np.clip(x, 0, 255)'
                     '.astype(np.uint8) (or pass file paths).')
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image[..., :3]


def preprocess(image_uint8: np.ndarray, image_size) -> np.ndarray:
  """The evaluation preprocessing: plain bilinear resize to `image_size`
  (side or (height, width)), then float32 in [-1, 1]."""
  tf = tf_import.import_tensorflow()
  size = trained_model.as_hw(image_size)
  # The same ops as input_pipeline's eval path (and the original's), in the
  # same order: x / 127.5 - 1 differs from it in the last bit for some x.
  image = tf.image.resize(tf.convert_to_tensor(image_uint8), size)
  return ((tf.cast(image, tf.float32) - 127.5) / 127.5).numpy()


# ---------------------------------------------------------------- classify

_JITTED = {}  # id(model) -> (model, jitted fn); modules are unhashable


def _probabilities_fn(model):
  """The jitted softmax(model(x)), compiled once per model object."""
  cached = _JITTED.get(id(model))
  if cached is None or cached[0] is not model:
    fn = jax.jit(lambda p, x: jax.nn.softmax(
        model.apply({'params': p}, x, train=False), axis=-1))
    if len(_JITTED) > 8:
      _JITTED.clear()
    cached = _JITTED[id(model)] = (model, fn)
  return cached[1]


def classify(model,
             params: Params,
             images_or_paths: Sequence[ImageLike],
             *,
             image_size: Union[None, int, Tuple[int, int]] = None,
             labels: Union[None, str, Sequence[str]] = None,
             topk: int = 5,
             batch_size: int = 32,
             on_error: str = 'skip') -> List[Optional[List[Tuple[str, float]]]]:
  """Top-k classes with probabilities for each image.

  Args:
    model: a VisionTransformer with a head.
    params: its parameters.
    images_or_paths: file paths, uint8 arrays [H, W(, C)] or PIL images.
    image_size: side or (height, width); default from the position embedding.
    labels: see `label_names.load_labels`.
    topk: classes per image.
    batch_size: images per forward pass.
    on_error: 'skip' (warn, give None for that input) or 'raise'.

  Returns:
    Per input, `[(label, probability), ...]` most probable first, or None.
  """
  if on_error not in ('skip', 'raise'):
    raise ValueError(f"on_error must be 'skip' or 'raise'; got {on_error!r}.")
  if not model.num_classes or 'head' not in params:
    raise ValueError('classify needs a model with a head (num_classes > 0) '
                     'and a checkpoint that has one; for features use '
                     'vit_jax.evaluation.features.extract_features.')
  num_classes = int(params['head']['kernel'].shape[-1])
  if trained_model.head_is_zero(params):
    warnings.warn(ZERO_HEAD_MESSAGE, UserWarning, stacklevel=2)
  if image_size is None:
    image_size = trained_model.image_size_from_params(model, params)
    if image_size is None:
      raise ValueError('Cannot infer the image size from the checkpoint; '
                       'pass image_size (--image-size).')
  names = label_names.load_labels(labels, num_classes)
  topk = max(1, min(int(topk), num_classes))

  apply = _probabilities_fn(model)
  results = [None] * len(images_or_paths)
  pending = []  # (index, preprocessed image)

  def flush():
    if not pending:
      return
    batch = np.stack([x for _, x in pending])
    n = len(batch)
    if n < batch_size:  # one compiled shape for every batch
      batch = np.concatenate(
          [batch,
           np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)])
    probs = np.asarray(apply(params, batch))[:n]
    for (i, _), p in zip(pending, probs):
      order = np.argsort(-p, kind='stable')[:topk]
      results[i] = [(names[c], float(p[c])) for c in order]
    pending.clear()

  for i, item in enumerate(images_or_paths):
    try:
      if isinstance(item, (str, os.PathLike)):
        pixels = load_image(item)
      else:
        pixels = _as_uint8_rgb(item, name=f'image {i}')
    except ImageError as e:
      if on_error == 'raise':
        raise
      warnings.warn(f'{SKIP_PREFIX} {e}', UserWarning, stacklevel=2)
      continue
    pending.append((i, preprocess(pixels, image_size)))
    if len(pending) == batch_size:
      flush()
  flush()
  return results


# -------------------------------------------------------------------- main


def _parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m vit_jax.predict',
      description='Classify images with a ViT checkpoint; prints the top-k '
      'classes with probabilities.')
  parser.add_argument(
      'images',
      nargs='+',
      metavar='IMAGE',
      help='image files (JPEG, PNG, GIF, BMP, WebP, ...)')
  arch = parser.add_mutually_exclusive_group(required=True)
  arch.add_argument(
      '--model', help='zoo name, e.g. ViT-B_16 (see vit_jax.models)')
  arch.add_argument(
      '--workdir',
      help='a training workdir: model, image size and class '
      'names from its summary.json and class_names.json')
  arch.add_argument(
      '--config',
      metavar='FILE.py|NAME[:ARG]',
      help='the training config file (its config.model, '
      'config.pp.crop and dataset)')
  parser.add_argument(
      '--checkpoint',
      default=None,
      help='.npz checkpoint (python -m '
      'vit_jax.checkpoints.export writes '
      'one from a workdir); with --workdir it defaults '
      'to the newest train-state checkpoint there')
  parser.add_argument('--topk', type=int, default=5)
  parser.add_argument(
      '--image-size',
      type=int,
      default=None,
      help='default: --workdir/--config pp.crop, else from '
      'the checkpoint position embedding')
  parser.add_argument(
      '--labels',
      default=None,
      help='imagenet2012 | FILE.json | FILE.txt | dataset name')
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument(
      '--num-classes',
      type=int,
      default=None,
      help='checked against the checkpoint head')
  parser.add_argument(
      '--output',
      default=None,
      help='also write the predictions to this file '
      '(missing folders are created)')
  parser.add_argument(
      '--data-dir', default=None, help='TFDS data dir for --labels DATASET')
  return parser.parse_args(argv)


def _load(args):
  """(model, params, image size, class names) of the command line's flags.

  Raises:
    ValueError, FileNotFoundError, checkpoint.CheckpointError: with the
      message the command prints.
  """
  trained_names = None
  if args.model:
    model, params = trained_model.load_model(
        args.model, args.checkpoint, num_classes=args.num_classes)
    if model.num_classes is None:
      raise ValueError(f'{args.checkpoint} has no head, so it cannot '
                       'classify; fine-tune it first.')
    image_size = (
        args.image_size or trained_model.image_size_from_params(model, params))
    if image_size is None:
      raise ValueError('Cannot infer the image size from the checkpoint '
                       '(no learned position embedding); pass '
                       '--image-size, or --workdir/--config of the run.')
    trained_model.check_params_fit(model, params, image_size)
  else:
    if args.workdir:
      trained = trained_model.load_model_from_workdir(
          args.workdir, args.checkpoint, num_classes=args.num_classes)
    else:
      trained = trained_model.load_model_from_config_file(
          experiments.resolve(args.config),
          args.checkpoint,
          num_classes=args.num_classes)
    model, params = trained.model, trained.params
    image_size = args.image_size or trained.image_size
    trained_names = trained.class_names
  if args.labels is None and trained_names is not None:
    names = trained_names
  else:
    names = label_names.load_labels(
        args.labels,
        model.num_classes,
        checkpoint_dir=os.path.dirname(os.path.abspath(args.checkpoint or '.')),
        data_dir=args.data_dir)
  return model, params, image_size, names


def _report(args, results) -> int:
  """Prints (and writes to --output) the top-k lines; the exit status."""
  failed = [p for p, r in zip(args.images, results) if r is None]
  lines = []
  for path, result in zip(args.images, results):
    if result is not None:
      lines += [path] + [f'  {prob:.4f}  {name}' for name, prob in result]
  if lines:
    print('\n'.join(lines))
  if args.output:
    try:
      filesystem.write_text_atomically(args.output, '\n'.join(lines) + '\n')
    except OSError as e:
      print(
          f'error: cannot write --output={args.output}: {e.strerror}.',
          file=sys.stderr)
      return 2
  if failed:
    print(
        f'{len(failed)} of {len(args.images)} image(s) could not be read: '
        f'{", ".join(failed)}',
        file=sys.stderr)
    return 1
  return 0


def main(argv=None) -> int:
  args = _parse_args(argv)
  if args.checkpoint is None and not args.workdir:
    print(
        'error: --checkpoint FILE.npz is required with --model and '
        '--config (only --workdir has checkpoints of its own).',
        file=sys.stderr)
    return 2
  try:
    model, params, image_size, names = _load(args)
  except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if trained_model.head_is_zero(params):
    print(f'warning: {ZERO_HEAD_MESSAGE}', file=sys.stderr)

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always', UserWarning)
    try:
      results = classify(
          model,
          params,
          args.images,
          image_size=image_size,
          labels=names,
          topk=args.topk,
          batch_size=args.batch_size)
    except ValueError as e:  # e.g. --image-size the position embedding lacks
      print(f'error: {e}', file=sys.stderr)
      return 2
  for w in caught:
    if str(w.message).startswith(SKIP_PREFIX):
      print(f'error: {w.message}', file=sys.stderr)
    elif not str(w.message).startswith(ZERO_HEAD_MESSAGE):  # printed above
      print(f'warning: {w.message}', file=sys.stderr)
  return _report(args, results)


if __name__ == '__main__':
  sys.exit(main())

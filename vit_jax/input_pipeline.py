"""Input pipelines: TFDS datasets, image folders and an embedded offline MNIST.

Every source (`vit_jax.data.sources.Source`) gives this process's shard of
undecoded `(image, label)` examples and a `decode` function; decoding happens
after shuffling, as in the original vit_jax, so shuffle buffers hold bytes or
paths, not pixels.

The train stream is a concatenation of epochs, each shuffled with a seed
from `(config.seed, epoch)`, and augmentation is seeded by `(config.seed,
global example number)`: the batch of step `s` is a function of the seed,
`s` and the process index, so `start_step` resumes exactly.

Image folders are `<dir>/{train,test}/<class>/*` or a single `<dir>/<class>/*`
tree split per class by `config.val_fraction` and `config.split_seed`
(`vit_jax.data.folder_split`).
"""

import dataclasses
import math
import os
from typing import Optional

import flax.jax_utils
import jax

from vit_jax.data import affine
from vit_jax.data import embedded_mnist
from vit_jax.data import folder_split
from vit_jax.data import image_folders
from vit_jax.data import sources
from vit_jax.data import tf_import
from vit_jax.data import tfds_source
from vit_jax.data import torch_transforms

tf = tf_import.import_tensorflow()

# `config.dataset` of the embedded digits (`vit_jax.data.embedded_mnist`).
EMBEDDED_MNIST = embedded_mnist.NAME
_AUGMENTS = ('inception_crop', 'shift', 'affine', 'random_resized_crop', 'none')


class _ClassNames(list):
  """A list of class names that can also be called like tfds' `int2str`."""

  def __call__(self, index):
    return self[int(index)]


# ------------------------------------------------------------------ public API


def get_dataset_info(dataset: str,
                     split: str,
                     *,
                     data_dir=None,
                     val_fraction: float = folder_split.DEFAULT_VAL_FRACTION,
                     split_seed: int = folder_split.DEFAULT_SPLIT_SEED) -> dict:
  """Describes one split of a dataset without building a pipeline.

  `dataset` is 'embedded_mnist', a TFDS name or an image folder; a
  single-tree folder has splits 'train' and 'val' (alias 'test'), split by
  `val_fraction` and `split_seed`.

  Returns:
    Dict with `num_examples`, `num_classes`, `int2str` (class names, also
    callable) and, for folders, `num_skipped` (unreadable files) and
    `layout` ('train_test' or 'single_tree').
  """
  if dataset == EMBEDDED_MNIST:
    return dict(
        num_examples=len(embedded_mnist.split_indices(split)),
        num_classes=10,
        int2str=_ClassNames(str(i) for i in range(10)))
  if image_folders.is_folder(dataset):
    root = os.path.expanduser(dataset)
    paths, _, classes, skipped = image_folders.list_folder(
        root, split, val_fraction, split_seed)
    return dict(
        num_examples=len(paths),
        num_classes=len(classes),
        int2str=_ClassNames(classes),
        num_skipped=skipped,
        layout=folder_split.detect_layout(root))
  builder = tfds_source.prepared_builder(dataset, data_dir)
  label = builder.info.features['label']
  return dict(
      num_examples=builder.info.splits[split].num_examples,
      num_classes=label.num_classes,
      int2str=_ClassNames(label.names))


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
      (translation, zero padding), 'affine' (rotation, zoom and translation;
      digits), 'random_resized_crop' (torchvision's) or 'none'.
    shift_pad: max translation of 'shift' and 'affine', pixels.
    rotate: max rotation of 'affine', degrees.
    zoom: max relative zoom of 'affine'.
    flip: random horizontal flip after the augmentation.
    eval_resize: evaluation resizes the short side to this and centre-crops;
      None: a plain resize (the original's).
  """
  kind: str = 'inception_crop'
  shift_pad: float = 2
  rotate: float = 0.
  zoom: float = 0.
  flip: bool = False
  eval_resize: Optional[int] = None

  @classmethod
  def from_config(cls, config) -> 'Augment':
    pp = config.get('pp', {})
    augment = cls(
        kind=pp.get('augment', cls.kind),
        shift_pad=pp.get('shift_pad', cls.shift_pad),
        rotate=pp.get('rotate', cls.rotate) or 0.,
        zoom=pp.get('zoom', cls.zoom) or 0.,
        flip=bool(pp.get('flip', False)),
        eval_resize=pp.get('eval_resize'))
    if augment.kind not in _AUGMENTS:
      raise ValueError(f'config.pp.augment={augment.kind!r}; use one of '
                       f'{_AUGMENTS}.')
    if augment.flip and augment.kind == 'inception_crop':
      raise ValueError('config.pp.flip=True with pp.augment=inception_crop, '
                       'which flips already; set one of them otherwise.')
    if augment.eval_resize and augment.eval_resize < max(
        get_image_size(config)):
      raise ValueError(
          f'config.pp.eval_resize={augment.eval_resize} is smaller than '
          f'pp.crop={pp.get("crop")}; the centre crop must fit (the '
          'tutorials: 256 for 224).')
    return augment


def _inception_crop(image, size, seed):
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=2))
  # The original's crop: 5-100% of the area, aspect 3/4..4/3, no object.
  begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image),
      bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
      seed=crop_seed,
      min_object_covered=0.0,
      aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.05, 1.0),
      use_image_if_no_bounding_boxes=True)
  image = tf.slice(image, begin, crop)
  image.set_shape([None, None, 3])  # tf.slice forgets the channel count
  image = tf.image.resize(image, size)
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def _random_affine(image, size, augment: Augment, seed):
  """`affine.warp` of one image, its parameters drawn from `seed`."""
  u = tf.random.stateless_uniform([4], seed, minval=-1., maxval=1.)
  return affine.warp(
      tf.image.resize(image, size)[None], size, *_affine_draw(u[None],
                                                              augment))[0]


def _affine_draw(u, augment: Augment):
  return affine.draw(
      u, rotate=augment.rotate, zoom=augment.zoom, shift_pad=augment.shift_pad)


def _preprocess(image, size, augment: Augment, seed=None):
  """Decoded uint8 image -> normalized float32 crop (augmented if `seed`)."""
  if seed is None and augment.eval_resize:
    image = torch_transforms.resize_short_center_crop(image, size,
                                                      augment.eval_resize)
  elif seed is None or augment.kind == 'none':
    image = tf.image.resize(image, size)  # eval: plain resize, no centre crop
  elif augment.kind == 'inception_crop':
    image = _inception_crop(image, size, seed)
  elif augment.kind == 'affine':
    image = _random_affine(image, size, augment, seed)
  elif augment.kind == 'random_resized_crop':
    image = torch_transforms.random_resized_crop(image, size, seed)
  else:  # 'shift'
    # Random translation by up to `shift_pad` pixels; zero (black) padding is
    # the background of digits. No flip: mirrored digits are other digits.
    image = tf.image.resize(image, size)
    p = int(augment.shift_pad)
    image = tf.pad(image, [[p, p], [p, p], [0, 0]])
    image = tf.image.stateless_random_crop(image, [*size, 3], seed=seed)
  if seed is not None and augment.flip:
    image = torch_transforms.random_flip(image, seed)
  return _normalize(image)


def _traced(fn):
  """`fn` for tf.data, traced as written, without autograph's conversion.

  The pipeline's functions branch on Python values only; converting their
  source took about a tenth of a short run's time.
  """
  return tf.autograph.experimental.do_not_convert(fn)


def _normalize(image):
  """uint8-range pixels -> float32 in [-1, 1]."""
  return (tf.cast(image, tf.float32) - 127.5) / 127.5


def _source(config, split, process_index, process_count,
            train) -> sources.Source:
  """This process's shard of a split of `config.dataset`, any source."""
  dataset = config.get('dataset', EMBEDDED_MNIST)
  if dataset == EMBEDDED_MNIST:
    return embedded_mnist.make_source(split, process_index, process_count)
  if image_folders.is_folder(dataset):
    return image_folders.make_source(dataset, split,
                                     process_index, process_count,
                                     *_folder_split_params(config))
  builder = tfds_source.prepared_builder(dataset, config.get('tfds_data_dir'),
                                         config.get('tfds_manual_dir'),
                                         config.get('tfds_download', False))
  return tfds_source.make_source(builder, split, process_index, process_count,
                                 train,
                                 config.get('seed') or 0)


def _folder_split_params(config):
  """(val_fraction, split_seed) of a single-tree folder; None = default."""
  val_fraction = config.get('val_fraction')
  split_seed = config.get('split_seed')
  return (folder_split.DEFAULT_VAL_FRACTION
          if val_fraction is None else val_fraction,
          folder_split.DEFAULT_SPLIT_SEED if split_seed is None else split_seed)


def _split_names(config):
  pp = config.get('pp', {})  # old vit_jax configs kept the splits in pp
  return (config.get('train_split', pp.get('train', 'train')),
          config.get('test_split', pp.get('test', 'test')))


def get_datasets(config,
                 *,
                 start_step: int = 0,
                 process_index: Optional[int] = None,
                 process_count: Optional[int] = None):
  """Builds the train and eval pipelines of `config` for this process.

  Reads `dataset`, `train_split`, `test_split`, `batch`, `batch_eval`,
  `shuffle_buffer` (TFDS only), `seed`, `pp.*` (crop and `Augment`), the
  `tfds_*` fields and, for single-tree folders, `val_fraction` and
  `split_seed`. `start_step` is the first train step to yield (resuming).

  Returns:
    (ds_train, ds_test) of batches `{'image': [devices, b, H, W, 3] float32
    in [-1, 1], 'label': [devices, b, classes] one-hot, 'mask': [devices,
    b]}`; ds_train repeats forever, ds_test is one pass padded with mask 0.
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
  local_eval, dev_eval = _local_batch(
      config.get('batch_eval') or batch, 'batch_eval', pc, devices)
  options = tf.data.Options()
  options.deterministic = True
  # No autotuning (AUTOTUNE takes TensorFlow's fixed defaults): freeing an
  # iterator waits for the autotuning thread, which can sleep out its period
  # (up to a minute) after training or an evaluation (docs/style.md).
  options.autotune.enabled = False

  # ---- train: epochs of seeded shuffles, numbered, skipped, then decoded.
  src = _source(config, train_split, pi, pc, train=True)
  if src.num_examples == 0:
    raise ValueError(f'Process {pi} of {pc} got no training examples.')
  ds = _numbered_train_stream(
      src, config.get('shuffle_buffer'), seed, first=start_step * local_train)
  ds = _train_batches(
      ds,
      src,
      size,
      augment,
      seed, (pi, pc),
      local_train,
      batched=_batchable(src, augment))
  ds_train = _to_devices(ds, devices, dev_train, options)

  # ---- eval: one pass, padded so every process runs the same number of full
  # batches (hosts must agree on the step count) and masks mark real examples.
  src = _source(config, test_split, pi, pc, train=False)
  ds_test = _padded_eval_examples(src, size, augment, local_eval).batch(
      local_eval, drop_remainder=True)
  ds_test = _to_devices(ds_test, devices, dev_eval, options)
  return ds_train, ds_test


def _numbered_train_stream(src: sources.Source, shuffle_buffer, seed, first):
  """`(count, (image, label))` of the endless train stream from `first` on.

  Epoch `e` is the local shard shuffled with a seed drawn from `(seed, e)`;
  `count` is an element's position in the stream. Elements before `first`
  are skipped undecoded.
  """
  n = src.num_examples
  base = src.make().take(n)  # take: trust the metadata count (and mocks)
  # Paths and digits are small: in-memory shards are shuffled completely.
  buffer = n if src.in_memory else min(shuffle_buffer or 50_000, n)
  tf_seed = tf.constant(seed, tf.int64)

  def epoch(e):
    e_seed = tf.random.stateless_uniform([],
                                         seed=tf.stack([tf_seed, e]),
                                         minval=0,
                                         maxval=2**31 - 1,
                                         dtype=tf.int64)
    return base.shuffle(buffer, seed=e_seed, reshuffle_each_iteration=False)

  first_epoch = first // n
  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(_traced(epoch))
  return ds.enumerate(start=first_epoch * n).skip(first - first_epoch * n)


def _batchable(src: sources.Source, augment: Augment) -> bool:
  """Whether a batch of `src` can be decoded and augmented at once."""
  return (src.batch_decode and augment.kind in ('affine', 'none') and
          not augment.flip)


def _train_batches(ds, src: sources.Source, size, augment: Augment, seed,
                   process, local_batch, *, batched: bool):
  """`(count, (image, label))` -> batches of augmented train examples.

  Augmentation is seeded by `(seed, global example number)`, unique across
  processes; `batched` decodes and augments whole batches, same seeds.
  """
  tf_seed = tf.constant(seed, tf.int64)
  process_index, process_count = process
  seeds = lambda count: tf.stack([
      tf.broadcast_to(tf_seed, tf.shape(count)), count * process_count +
      process_index
  ],
                                 axis=-1)

  def train_pp(count, example):
    image, label = example
    return {
        'image': _preprocess(src.decode(image), size, augment, seeds(count)),
        'label': tf.one_hot(label, src.num_classes),
        'mask': tf.constant(1.0)
    }

  def batch_pp(counts, example):
    images, labels = example
    images = tf.image.resize(src.decode(images), size)
    if augment.kind == 'affine':
      u = affine.uniforms(seeds(counts))
      images = affine.warp(images, size, *_affine_draw(u, augment))
    return {
        'image': _normalize(images),
        'label': tf.one_hot(labels, src.num_classes),
        'mask': tf.ones(tf.shape(labels), tf.float32)
    }

  if batched:
    return ds.batch(
        local_batch, drop_remainder=True).map(
            _traced(batch_pp), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(_traced(train_pp), num_parallel_calls=tf.data.AUTOTUNE)
  if src.may_fail_decode:
    # Last resort for files whose header was fine but pixels are damaged; the
    # drop is deterministic but shifts later examples by one.
    ds = ds.ignore_errors(log_warning=True)
  return ds.batch(local_batch, drop_remainder=True)


def _padded_eval_examples(src: sources.Source, size, augment: Augment,
                          local_batch):
  """One pass over the eval shard, padded to the largest shard's batches.

  Padding examples are zeros with mask 0; every process gets
  `ceil(max shard size / local_batch)` full batches.
  """

  def eval_pp(image, label):
    return {
        'image': _preprocess(src.decode(image), size, augment),
        'label': tf.one_hot(label, src.num_classes),
        'mask': tf.constant(1.0)
    }

  ds = src.make().take(src.num_examples).map(
      _traced(eval_pp), num_parallel_calls=tf.data.AUTOTUNE)
  if src.may_fail_decode:
    ds = ds.ignore_errors(log_warning=True)
  pad = tf.data.Dataset.from_tensors({
      'image': tf.zeros([*size, 3]),
      'label': tf.zeros([src.num_classes]),
      'mask': tf.constant(0.0)
  }).repeat()
  num_batches = math.ceil(max(src.shard_sizes) / local_batch)
  return ds.concatenate(pad).take(num_batches * local_batch)


def _to_devices(ds, devices, per_device, options):
  """Local batches reshaped to `[devices, per_device, ...]`, prefetched."""

  def to_devices(b):
    return {
        k: tf.reshape(v, [devices, per_device, *v.shape[1:]])
        for k, v in b.items()
    }

  return ds.map(_traced(to_devices)).prefetch(
      tf.data.AUTOTUNE).with_options(options)


def prefetch(dataset, n_prefetch: int):
  """Iterates a `get_datasets` dataset's batches as numpy or, with
  `n_prefetch` > 0, as jax arrays on the local devices, that many in
  flight."""
  it = dataset.as_numpy_iterator()
  if n_prefetch:
    it = flax.jax_utils.prefetch_to_device(it, n_prefetch)
  return it

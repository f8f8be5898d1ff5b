"""Tests of vit_jax.input_pipeline: all offline, on the embedded MNIST digits,
tiny image folders written here, and TFDS mocked with local metadata."""

import io
import itertools
import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import compile_settings
from vit_jax import input_pipeline
from vit_jax.data import affine as vit_affine
from vit_jax.data import embedded_mnist
from vit_jax.data import tf_import

tf = tf_import.import_tensorflow()  # TensorFlow without Keras

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  config = ml_collections.ConfigDict(
      dict(
          dataset='embedded_mnist',
          train_split='train',
          test_split='test',
          batch=32,
          batch_eval=96,
          shuffle_buffer=1000,
          seed=0,
          prefetch=0,
          pp=dict(crop=28, augment='shift')))
  for k, v in overrides.items():
    if k == 'pp':
      config.pp.update(v)
    else:
      config[k] = v
  return config


def _take(ds, n):
  return list(itertools.islice(ds.as_numpy_iterator(), n))


def _assert_batch(batch, lead, size, num_classes):
  assert batch['image'].shape == (*lead, *size, 3)
  assert batch['image'].dtype == np.float32
  assert batch['image'].min() >= -1 and batch['image'].max() <= 1
  assert batch['label'].shape == (*lead, num_classes)
  assert batch['mask'].shape == lead
  np.testing.assert_array_equal(batch['label'].sum(-1),
                                batch['mask'])  # one-hot (padding: all zero)


# ------------------------------------------------------------------ embedded


def test_embedded_split_is_fixed_stratified_and_disjoint():
  train_x, train_y = embedded_mnist.load_split('train')
  test_x, test_y = embedded_mnist.load_split('test')
  assert train_x.shape == (4000, 28, 28, 1) and train_x.dtype == np.uint8
  assert test_x.shape == (1000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(train_y), [400] * 10)
  np.testing.assert_array_equal(np.bincount(test_y), [100] * 10)
  train_idx = embedded_mnist.split_indices('train')
  test_idx = embedded_mnist.split_indices('test')
  assert not set(train_idx) & set(test_idx)
  assert not {x.tobytes() for x in train_x} & {x.tobytes() for x in test_x}
  np.testing.assert_array_equal(
      embedded_mnist.split_indices('train'),
      train_idx)  # the same on every call
  # Pin the split itself: a change of seed or algorithm would move these.
  np.testing.assert_array_equal(test_idx[:5], [9, 25, 28, 31, 32])

  info = input_pipeline.get_dataset_info('embedded_mnist', 'test')
  assert info['num_examples'] == 1000 and info['num_classes'] == 10
  assert info['int2str'][3] == '3' and info['int2str'](7) == '7'


def test_embedded_slices_are_balanced_subsets():
  _, y = embedded_mnist.raw_digits()
  train = set(embedded_mnist.split_indices('train'))
  for split, n in (('train[:250]', 250), ('train[3500:]', 500),
                   ('test[:20%]', 200), ('train[:4000]', 4000)):
    idx = embedded_mnist.split_indices(split)
    np.testing.assert_array_equal(np.bincount(y[idx]), [n // 10] * 10)
  counts = np.bincount(y[embedded_mnist.split_indices('train[10:25]')])
  np.testing.assert_array_equal(counts, [2] * 5 + [1] * 5)
  # Disjoint slices that make up the split; a prefix of a longer prefix.
  head = set(embedded_mnist.split_indices('train[:3500]'))
  assert head | set(embedded_mnist.split_indices('train[3500:]')) == train
  assert set(embedded_mnist.split_indices('train[:250]')) < head
  np.testing.assert_array_equal(
      embedded_mnist.split_indices('train[:4000]'),
      embedded_mnist.split_indices('train'))
  info = input_pipeline.get_dataset_info('embedded_mnist', 'test[:200]')
  assert info['num_examples'] == 200
  for bad, words in (('train[4000:]', 'is empty'), ('val', 'has splits'),
                     ('train[:a]', 'has splits')):
    with pytest.raises(ValueError, match=words):
      embedded_mnist.split_indices(bad)


def test_embedded_batches_and_padded_eval():
  ds_train, ds_test = input_pipeline.get_datasets(_config())
  for batch in _take(ds_train, 2):
    _assert_batch(batch, (1, 32), (28, 28), 10)
    assert batch['mask'].min() == 1
  batches = list(ds_test.as_numpy_iterator())
  assert len(batches) == 11  # ceil(1000 / 96)
  for batch in batches:
    _assert_batch(batch, (1, 96), (28, 28), 10)
  mask = np.concatenate([b['mask'].ravel() for b in batches])
  labels = np.concatenate([b['label'].reshape(-1, 10) for b in batches])
  assert mask.sum() == 1000 and mask[:1000].min() == 1
  np.testing.assert_array_equal(labels[mask == 1].sum(0), [100] * 10)


def test_resume_equals_continuation_and_seed_matters():
  config = _config(batch=16, pp=dict(crop=20, augment='inception_crop'))
  full = _take(input_pipeline.get_datasets(config)[0], 5)
  resumed = _take(input_pipeline.get_datasets(config, start_step=3)[0], 2)
  for a, b in zip(full[3:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  other = _take(
      input_pipeline.get_datasets(
          _config(batch=16, seed=1, pp=dict(crop=20,
                                            augment='inception_crop')))[0], 1)
  assert not np.array_equal(other[0]['label'], full[0]['label'])


def _image_set(batches):
  return {(im.tobytes(), int(lab.argmax()))
          for b in batches
          for im, lab, m in zip(b['image'].reshape(-1, 28, 28, 3),
                                b['label'].reshape(-1, 10), b['mask'].ravel())
          if m}


def test_process_shards_are_disjoint_and_cover_train():
  config = _config(batch=200, pp=dict(augment='none'))
  shards = [
      _image_set(
          _take(
              input_pipeline.get_datasets(
                  config, process_index=i, process_count=2)[0], 20))
      for i in range(2)
  ]
  assert len(shards[0]) == len(shards[1]) == 2000  # one epoch, no repeats
  assert not shards[0] & shards[1]
  x, y = embedded_mnist.load_split('train')
  full = {
      (((np.repeat(im, 3, -1).astype(np.float32) - 127.5) / 127.5).tobytes(),
       int(lab)) for im, lab in zip(x, y)
  }
  assert shards[0] | shards[1] == full


def test_uneven_eval_shards_run_equal_steps():
  config = _config(batch=30, batch_eval=30)
  sums, steps = [], []
  for i in range(3):
    batches = list(
        input_pipeline.get_datasets(config, process_index=i,
                                    process_count=3)[1].as_numpy_iterator())
    steps.append(len(batches))
    sums.append(sum(b['mask'].sum() for b in batches))
  assert steps == [34] * 3  # ceil(334 / 10) everywhere
  assert sums == [334, 333, 333]


def test_batch_not_divisible_by_processes():
  with pytest.raises(ValueError, match=r'batch=6.*4.*multiple of 4'):
    input_pipeline.get_datasets(
        _config(batch=6), process_count=4, process_index=0)


def test_prefetch():
  ds_train, _ = input_pipeline.get_datasets(_config())
  batch = next(input_pipeline.prefetch(ds_train, 0))
  assert isinstance(batch['image'], np.ndarray)
  batch = next(input_pipeline.prefetch(ds_train, 2))
  assert isinstance(batch['image'], jax.Array)
  assert batch['image'].shape == (1, 32, 28, 28, 3)


def test_eight_devices_layout_in_subprocess_without_keras():
  script = textwrap.dedent("""
      import sys
      import jax, ml_collections, pytest
      from vit_jax import input_pipeline
      assert jax.local_device_count() == 8
      c = ml_collections.ConfigDict(dict(dataset='embedded_mnist', batch=16,
          batch_eval=64, pp=dict(crop=28, augment='shift')))
      ds_train, ds_test = input_pipeline.get_datasets(c)
      b = next(input_pipeline.prefetch(ds_train, 1))
      assert b['image'].shape == (8, 2, 28, 28, 3), b['image'].shape
      assert len(b['image'].sharding.device_set) == 8
      b = next(ds_test.as_numpy_iterator())
      assert b['label'].shape == (8, 8, 10) and b['mask'].shape == (8, 8)
      c.batch = 12
      with pytest.raises(ValueError, match='12.*8 local devices.*of 8'):
        input_pipeline.get_datasets(c)
      # TensorFlow came in through vit_jax.data.tf_import: without Keras,
      # which tf.keras still loads on first use.
      assert not {'keras', 'sklearn'} & set(sys.modules), 'keras imported'
      from vit_jax.data import tf_import
      assert tf_import.import_tensorflow().keras.layers.Dense
      assert 'keras' in sys.modules
      print('SUBPROCESS OK')
  """)
  env = dict(
      os.environ,
      XLA_FLAGS=compile_settings.xla_flags(8),
      JAX_PLATFORMS='cpu',
      TF_CPP_MIN_LOG_LEVEL='2')
  out = subprocess.run([sys.executable, '-c', script],
                       cwd=REPO,
                       env=env,
                       capture_output=True,
                       text=True,
                       timeout=120)
  assert 'SUBPROCESS OK' in out.stdout, out.stderr[-3000:]


# ------------------------------------------------------------- image folders


def _save(path, array, fmt):
  Image.fromarray(array).save(path, fmt)


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('folder')
  rng = np.random.RandomState(0)
  for split, per_class in (('train', 6), ('test', 2)):
    for c in 'abc':
      d = root / split / c
      d.mkdir(parents=True)
      for i in range(per_class):
        h, w = 20 + 7 * i, 30 - 3 * i  # different sizes and aspects
        if i == 1:
          _save(d / f'{i}.png', rng.randint(0, 256, (h, w), np.uint8), 'PNG')
        elif i == 2:
          _save(d / f'{i}.png', rng.randint(0, 256, (h, w, 4), np.uint8), 'PNG')
        else:
          _save(d / f'{i}.jpg', rng.randint(0, 256, (h, w, 3), np.uint8),
                'JPEG')
  (root / 'train' / 'b' / 'corrupt.jpg').write_bytes(b'not an image ' * 20)
  (root / 'train' / 'c' / 'notes.txt').write_text('ignored: not an image')
  # Valid header, damaged pixels: passes the listing check, fails decoding.
  buf = io.BytesIO()
  Image.fromarray(rng.randint(0, 256, (32, 32, 3), np.uint8)).save(buf, 'JPEG')
  (root / 'test' / 'a' / 'truncated.jpg').write_bytes(
      buf.getvalue()[:len(buf.getvalue()) // 2])
  return str(root)


def test_folder_info_skips_corrupt_file(image_folder):
  info = input_pipeline.get_dataset_info(image_folder, 'train')
  assert info['num_examples'] == 18 and info['num_skipped'] == 1
  assert info['num_classes'] == 3 and list(info['int2str']) == ['a', 'b', 'c']


def test_folder_batches_resume_across_epochs(image_folder):
  config = _config(
      dataset=image_folder,
      batch=4,
      batch_eval=4,
      pp=dict(crop=16, augment='inception_crop'))
  ds_train, ds_test = input_pipeline.get_datasets(config)
  full = _take(ds_train, 8)  # 32 examples: crosses the 18-example epoch
  for batch in full:
    _assert_batch(batch, (1, 4), (16, 16), 3)
  labels = np.concatenate([b['label'].reshape(-1, 3) for b in full])
  np.testing.assert_array_equal(labels[:18].sum(0), [6, 6, 6])  # one epoch
  for start in (3, 5):
    resumed = _take(
        input_pipeline.get_datasets(config, start_step=start)[0], 8 - start)
    for a, b in zip(full[start:], resumed):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
  # Test split: 7 files, one truncated JPEG dropped at decode time, no crash.
  batches = list(ds_test.as_numpy_iterator())
  assert len(batches) == 2
  for batch in batches:
    _assert_batch(batch, (1, 4), (16, 16), 3)
  assert sum(b['mask'].sum() for b in batches) == 6


def test_folder_layout_errors(tmp_path):
  flat = tmp_path / 'flat' / 'train'
  flat.mkdir(parents=True)
  _save(flat / 'x.png', np.zeros((8, 8, 3), np.uint8), 'PNG')
  with pytest.raises(ValueError, match=r'no class subfolders.*<dir>/train/'):
    input_pipeline.get_dataset_info(str(tmp_path / 'flat'), 'train')
  empty = tmp_path / 'empty' / 'train' / 'cat'
  empty.mkdir(parents=True)
  (empty / 'bad.jpg').write_bytes(b'garbage')
  with pytest.raises(ValueError, match='no readable'):
    input_pipeline.get_dataset_info(str(tmp_path / 'empty'), 'train')
  with pytest.raises(ValueError, match='does not exist'):
    input_pipeline.get_dataset_info(str(tmp_path / 'missing'), 'train')


# ---------------------------------------------------------------------- TFDS


def _write_cifar10_metadata(data_dir, train, test):
  """Writes dataset_info.json so mock_data knows the split sizes."""
  builder = tfds.builder('cifar10', data_dir=data_dir)
  builder.info.set_splits(
      tfds.core.SplitDict([
          tfds.core.SplitInfo(name='train', shard_lengths=[train], num_bytes=0),
          tfds.core.SplitInfo(name='test', shard_lengths=[test], num_bytes=0)
      ]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)


def test_tfds_mocked_cifar10(tmp_path):
  _write_cifar10_metadata(str(tmp_path), train=24, test=10)
  config = _config(
      dataset='cifar10',
      tfds_data_dir=str(tmp_path),
      train_split='train[:50%]',
      batch=8,
      batch_eval=4,
      pp=dict(crop=24, augment='inception_crop'))
  with tfds.testing.mock_data(
      num_examples=24,
      data_dir=str(tmp_path),
      policy=tfds.testing.MockPolicy.USE_FILES):
    info = input_pipeline.get_dataset_info(
        'cifar10', 'train', data_dir=str(tmp_path))
    assert info['num_examples'] == 24 and info['num_classes'] == 10
    ds_train, ds_test = input_pipeline.get_datasets(config)
    full = _take(ds_train, 3)  # 12-example shard: crosses an epoch
    for batch in full:
      _assert_batch(batch, (1, 8), (24, 24), 10)
    resumed = _take(input_pipeline.get_datasets(config, start_step=2)[0], 1)
    np.testing.assert_array_equal(full[2]['image'], resumed[0]['image'])
    batches = list(ds_test.as_numpy_iterator())
  assert len(batches) == 3
  assert sum(b['mask'].sum() for b in batches) == 10


class TinyImagesForPipeline(tfds.core.GeneratorBasedBuilder):
  """A real (not mocked) TFDS dataset, prepared offline in a test folder."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    features = tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3)),
        'label': tfds.features.ClassLabel(names=['x', 'y', 'z'])
    })
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {
        'train': self._generate_examples(30, 0),
        'test': self._generate_examples(7, 1)
    }

  def _generate_examples(self, n, seed):
    rng = np.random.RandomState(seed)
    for i in range(n):
      yield i, {
          'image': rng.randint(0, 256, (10 + i, 12, 3), np.uint8),
          'label': i % 3
      }


def test_tfds_prepared_dataset_sharded_and_resumed(tmp_path):
  TinyImagesForPipeline(data_dir=str(tmp_path)).download_and_prepare()
  info = input_pipeline.get_dataset_info(
      'tiny_images_for_pipeline', 'train[:50%]', data_dir=str(tmp_path))
  assert info['num_examples'] == 15 and list(info['int2str']) == ['x', 'y', 'z']
  config = _config(
      dataset='tiny_images_for_pipeline',
      tfds_data_dir=str(tmp_path),
      batch=4,
      batch_eval=4,
      shuffle_buffer=8,
      pp=dict(crop=8, augment='inception_crop'))
  eval_counts = []
  for pi in range(2):
    ds_train, ds_test = input_pipeline.get_datasets(
        config, process_index=pi, process_count=2)
    full = _take(ds_train, 12)  # 24 examples of a 15-example shard
    labels = np.concatenate([b['label'].reshape(-1, 3) for b in full])
    assert labels[:15].sum() == 15
    resumed = _take(
        input_pipeline.get_datasets(
            config, start_step=9, process_index=pi, process_count=2)[0], 3)
    for a, b in zip(full[9:], resumed):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    batches = list(ds_test.as_numpy_iterator())
    assert len(batches) == 2  # both processes: ceil(4 / 2)
    eval_counts.append(sum(b['mask'].sum() for b in batches))
  assert eval_counts == [4, 3]


def test_tfds_not_prepared_raises_without_download(tmp_path, monkeypatch):

  def no_download(*args, **kwargs):
    raise AssertionError('must not download')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                      no_download)
  with pytest.raises(
      FileNotFoundError,
      match=r"'cifar10' is not prepared.*tfds build cifar10"):
    input_pipeline.get_dataset_info('cifar10', 'train', data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    input_pipeline.get_datasets(
        _config(dataset='cifar10', tfds_data_dir=str(tmp_path)))
  with pytest.raises(FileNotFoundError, match='tfds_manual_dir'):
    input_pipeline.get_datasets(
        _config(dataset='imagenet2012', tfds_data_dir=str(tmp_path)))


def _bilinear(image, y, x):
  """image[y, x] at real coordinates, zero outside (numpy reference)."""
  out = 0.
  for yy, wy in ((np.floor(y), 1 - (y - np.floor(y))), (np.floor(y) + 1,
                                                        y - np.floor(y))):
    for xx, wx in ((np.floor(x), 1 - (x - np.floor(x))), (np.floor(x) + 1,
                                                          x - np.floor(x))):
      if 0 <= yy < image.shape[0] and 0 <= xx < image.shape[1]:
        out = out + wy * wx * image[int(yy), int(xx)]
  return out


def test_affine_augment_geometry():
  """'affine' with no range is the identity; a quarter turn about the centre
  is np.rot90 (clockwise on screen); a shift of one pixel moves every column by one; a zoom of 2
  samples the input at centre + (output - centre) / 2; the draw is a pure
  function of the seed."""
  rng = np.random.RandomState(0)
  image = tf.constant(rng.randint(0, 256, (28, 28, 3)).astype(np.uint8))
  pixels = image.numpy().astype(np.float32)
  plain = input_pipeline._preprocess(image, (28, 28),
                                     input_pipeline.Augment('none'))
  still = input_pipeline.Augment('affine', shift_pad=0)
  seed = tf.constant([0, 7], tf.int64)
  np.testing.assert_array_equal(
      input_pipeline._preprocess(image, (28, 28), still, seed), plain)
  affine = lambda *a: vit_affine.warp(
      image[None],
      (28, 28), *(tf.constant([v], tf.float32) for v in a))[0].numpy()
  np.testing.assert_allclose(
      affine(np.pi / 2, 1., 0., 0.),
      np.rot90(pixels, k=-1, axes=(0, 1)),
      atol=1e-3)
  shifted = affine(0., 1., 1., 0.)
  np.testing.assert_allclose(shifted[:, 1:], pixels[:, :-1], atol=1e-3)
  assert not shifted[:, 0].any()  # zero fill
  zoomed = affine(0., 2., 0., 0.)
  for y, x in ((0, 0), (5, 20), (13, 14), (27, 3)):
    want = _bilinear(pixels, 13.5 + (y - 13.5) / 2, 13.5 + (x - 13.5) / 2)
    np.testing.assert_allclose(zoomed[y, x], want, atol=1e-2)
  busy = input_pipeline.Augment('affine', shift_pad=3, rotate=15, zoom=0.1)
  draw = lambda s: input_pipeline._preprocess(image, (
      28, 28), busy, tf.constant([0, s], tf.int64)).numpy()
  np.testing.assert_array_equal(draw(7), draw(7))
  assert np.abs(draw(7) - draw(8)).max() > 0.1


@pytest.mark.parametrize('kind', ['affine', 'none'])
def test_batched_train_examples_equal_one_by_one(kind):
  """The embedded digits are decoded and augmented a batch at a time; the
  batches equal those of the example-by-example path (same seeds), also
  past an epoch boundary and from a resumed position."""
  src = embedded_mnist.make_source('train', 1, 2)  # process 1 of 2: 2,000
  augment = input_pipeline.Augment(kind, shift_pad=3, rotate=15, zoom=0.15)
  assert input_pipeline._batchable(src, augment)

  def batches(batched, first, augment=augment):
    ds = input_pipeline._numbered_train_stream(src, None, 5, first=first)
    return _take(
        input_pipeline._train_batches(
            ds, src, (28, 28), augment, 5, (1, 2), 64, batched=batched), 3)

  # Resumed at example 1984 of the shard's 2,000: the three batches of 64
  # cross the epoch boundary (one run covers both; a run from 0 adds no case).
  one_by_one, batched = batches(False, 1984), batches(True, 1984)
  for want, got in zip(one_by_one, batched):
    assert got['image'].shape == (64, 28, 28, 3)
    np.testing.assert_array_equal(got['label'], want['label'])
    np.testing.assert_array_equal(got['mask'], want['mask'])
    np.testing.assert_allclose(got['image'], want['image'], rtol=0, atol=1e-5)
  if kind == 'affine':  # really augmented
    plain = batches(True, 0, input_pipeline.Augment('none'))[0]['image']
    assert np.abs(batches(True, 0)[0]['image'] - plain).max() > 0.5

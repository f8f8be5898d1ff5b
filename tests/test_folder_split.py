"""Tests of single-tree image folders: vit_jax.data.folder_split (the seeded,
stratified train/val split) and its use by vit_jax.input_pipeline
(get_dataset_info, get_datasets, write_dataset_report). All offline, on tiny
PNG folders written here."""

import hashlib
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from vit_jax import input_pipeline
from vit_jax.data import folder_split
from vit_jax.data import image_folders
from vit_jax.reporting import dataset_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Class folder -> the colour channel its images are saturated in. Not in
# sorted order, so a label that followed the colour instead of the folder
# name would be caught.
CHANNEL = {'daisy': 2, 'roses': 0, 'tulips': 1}
PER_CLASS = 10


def _files(n, prefix=''):
  # Listed in reverse: the split must not depend on the order given.
  return [f'{prefix}img_{i:03d}.jpg' for i in reversed(range(n))]


# ----------------------------------------------------------- the split alone


def test_split_is_stratified_disjoint_covering_and_seeded():
  sizes = {'a': 10, 'b': 7, 'c': 23, 'd': 1, 'e': 2, 'f': 5}
  files = {c: _files(n, f'{c}/') for c, n in sizes.items()}
  parts = folder_split.split_files(files, val_fraction=0.2, split_seed=0)
  # round(0.2 n): 2, 1 (1.4), 5 (4.6); 'd': a lone file trains; 'e': 0.4
  # rounds to 0, raised to 1; 'f': 1.
  assert {
      c: len(v) for c, (_, v) in parts.items()
  } == dict(
      a=2, b=1, c=5, d=0, e=1, f=1)
  for c, (train, val) in parts.items():
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(files[c])
    assert train == sorted(train) and val == sorted(val)
  assert parts['d'] == (['d/img_000.jpg'], [])
  # Deterministic, whatever order the files come in.
  shuffled = {c: list(reversed(f)) for c, f in files.items()}
  assert folder_split.split_files(
      shuffled, val_fraction=0.2, split_seed=0) == parts
  other = folder_split.split_files(files, val_fraction=0.2, split_seed=1)
  assert other != parts
  assert {
      c: len(v) for c, (_, v) in other.items()
  } == {
      c: len(v) for c, (_, v) in parts.items()
  }  # same counts, other files
  # Fraction 0.5 of 7 = 3.5 -> Python's round gives 4; 0.9 of 2 is capped at
  # n - 1 so the class still trains.
  assert folder_split.num_val(7, 0.5) == 4
  assert folder_split.num_val(2, 0.9) == 1
  assert folder_split.num_val(100, 0.25) == 25


def test_split_follows_the_documented_recipe():
  # Re-derive class 'sunflowers' with hashlib + RandomState, as the module
  # docstring tells a user of another framework to do.
  names = sorted(_files(13))
  key = hashlib.sha256('7/sunflowers'.encode('utf-8')).digest()[:4]
  order = np.random.RandomState(int.from_bytes(key, 'big')).permutation(13)
  expected_val = sorted(names[i] for i in order[:3])  # round(0.2 * 13) = 3
  train, val = folder_split.split_class_files(
      'sunflowers', _files(13), val_fraction=0.2, split_seed=7)
  assert val == expected_val
  assert train == [n for n in names if n not in expected_val]


def test_split_independent_of_location_and_python_hash():
  # The same files under two different roots give the same split...
  a = folder_split.split_files({'x': [f'/data/one/x/{f}' for f in _files(20)]},
                               split_seed=3,
                               root='/data/one')
  b = folder_split.split_files(
      {'x': [f'/mnt/other/place/x/{f}' for f in _files(20)]},
      split_seed=3,
      root='/mnt/other/place')
  assert [os.path.basename(p) for p in a['x'][1]
         ] == [os.path.basename(p) for p in b['x'][1]]
  # ...and so do fresh interpreters with different str hash seeds.
  script = textwrap.dedent("""
      import json
      from vit_jax.data import folder_split
      files = {c: [f'{c}/{i}.png' for i in range(30)] for c in 'pqrs'}
      print(json.dumps(folder_split.split_files(files, split_seed=5)))
  """)
  outs = []
  for hash_seed in ('1', '2'):
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    out = subprocess.run([sys.executable, '-c', script],
                         cwd=REPO,
                         env=env,
                         capture_output=True,
                         text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    outs.append(json.loads(out.stdout))
  here = folder_split.split_files(
      {c: [f'{c}/{i}.png' for i in range(30)] for c in 'pqrs'}, split_seed=5)
  assert outs[0] == outs[1] == json.loads(json.dumps(here))


def test_bad_split_parameters():
  for fraction in (0, 1, 1.5, -0.1, 'a lot', None):
    with pytest.raises(ValueError, match='val_fraction.*between 0 and 1'):
      folder_split.check_params(fraction, 0)
  with pytest.raises(ValueError, match='split_seed.*integer'):
    folder_split.check_params(0.2, 1.5)
  with pytest.raises(ValueError, match=r"'validate'.*'train', or 'val'"):
    folder_split.resolve_split('validate')
  assert [folder_split.resolve_split(s) for s in ('train', 'val', 'test')
         ] == ['train', 'val', 'val']


def test_detect_layout(tmp_path):
  (tmp_path / 'tree' / 'cats').mkdir(parents=True)
  (tmp_path / 'split' / 'train' / 'cats').mkdir(parents=True)
  (tmp_path / 'test_only' / 'test' / 'cats').mkdir(parents=True)
  assert folder_split.detect_layout(str(tmp_path / 'tree')) == 'single_tree'
  assert folder_split.detect_layout(str(tmp_path / 'split')) == 'train_test'
  assert folder_split.detect_layout(str(tmp_path / 'test_only')) == 'train_test'
  with pytest.raises(ValueError, match='does not exist'):
    folder_split.detect_layout(str(tmp_path / 'nope'))


# ---------------------------------------------------- a folder of flower PNGs


def _pixel(name, i):
  """Image i of class `name`: grey level 10 i + 5, one channel saturated."""
  rgb = [10 * i + 5] * 3
  rgb[CHANNEL[name]] = 250
  return rgb


def _write_png(path, rgb, h, w):
  Image.fromarray(np.full((h, w, 3), rgb, np.uint8)).save(path, 'PNG')


@pytest.fixture(scope='module')
def flowers(tmp_path_factory):
  root = tmp_path_factory.mktemp('flowers')
  for name in CHANNEL:
    (root / name).mkdir()
    for i in range(PER_CLASS):
      _write_png(root / name / f'{i:02d}.png', _pixel(name, i), 9 + i % 4,
                 11 + i % 3)
  (root / 'roses' / 'broken.png').write_bytes(b'\x89PNG but not really')
  (root / 'LICENSE.txt').write_text('the flower photos licence')
  (root / '.ipynb_checkpoints').mkdir()  # hidden: not a class
  return str(root)


def _config(root, **overrides):
  config = ml_collections.ConfigDict(
      dict(
          dataset=root,
          train_split='train',
          test_split='val',
          val_fraction=0.2,
          split_seed=0,
          batch=8,
          batch_eval=4,
          seed=0,
          pp=dict(crop=8, augment='none')))
  config.update(overrides)
  return config


def _identify(batches):
  """[(folder of the colour, image number, label index)] of real examples."""
  by_channel = {ch: name for name, ch in CHANNEL.items()}
  found = []
  for b in batches:
    for image, label, mask in zip(b['image'].reshape(-1, 8, 8, 3),
                                  b['label'].reshape(-1, 3), b['mask'].ravel()):
      if not mask:
        continue
      rgb = image.reshape(-1, 3).mean(0) * 127.5 + 127.5
      grey = int(round((np.sort(rgb)[0] - 5) / 10))
      found.append((by_channel[int(rgb.argmax())], grey, int(label.argmax())))
  return found


def test_single_tree_info_and_split(flowers):
  info = {
      s: input_pipeline.get_dataset_info(flowers, s)
      for s in ('train', 'val', 'test')
  }
  assert [info[s]['num_examples'] for s in ('train', 'val', 'test')
         ] == [24, 6, 6]
  assert list(info['train']['int2str']) == ['daisy', 'roses', 'tulips']
  assert info['val']['num_skipped'] == 1  # broken.png
  assert info['val']['layout'] == 'single_tree'

  train, train_labels, _, _ = image_folders.list_folder(flowers, 'train')
  val, val_labels, _, _ = image_folders.list_folder(flowers, 'val')
  readable = {
      os.path.join(flowers, n, f'{i:02d}.png')
      for n in CHANNEL
      for i in range(PER_CLASS)
  }
  assert not set(train) & set(val)
  assert set(train) | set(val) == readable
  np.testing.assert_array_equal(np.bincount(val_labels), [2, 2, 2])
  np.testing.assert_array_equal(np.bincount(train_labels), [8, 8, 8])
  for paths, labels in ((train, train_labels), (val, val_labels)):
    assert [os.path.basename(os.path.dirname(p)) for p in paths
           ] == [['daisy', 'roses', 'tulips'][k] for k in labels]
  assert image_folders.list_folder(flowers, 'val')[0] == val  # same again
  assert image_folders.list_folder(flowers, 'test')[0] == val  # alias
  other = image_folders.list_folder(flowers, 'val', 0.2, 1)[0]
  assert sorted(other) != sorted(val) and len(other) == 6
  wider = input_pipeline.get_dataset_info(flowers, 'val', val_fraction=0.35)
  assert wider['num_examples'] == 12  # round(3.5) = 4 per class


def test_single_tree_batches_match_class_names(flowers, tmp_path, caplog):
  config = _config(flowers)
  caplog.set_level(logging.INFO)
  report = dataset_report.write_dataset_report(config, str(tmp_path))
  with open(tmp_path / 'class_names.json') as f:
    names = json.load(f)
  assert names == ['daisy', 'roses', 'tulips']

  ds_train, ds_test = input_pipeline.get_datasets(config)
  train = list(itertools.islice(ds_train.as_numpy_iterator(), 3))  # 1 epoch
  test = list(ds_test.as_numpy_iterator())
  for b in train:
    assert b['image'].shape == (1, 8, 8, 8, 3)
    assert b['label'].shape == (1, 8, 3) and b['mask'].shape == (1, 8)
  assert len(test) == 2 and test[0]['image'].shape == (1, 4, 8, 8, 3)
  assert sum(b['mask'].sum() for b in test) == 6
  seen = {}
  for split, batches in (('train', train), ('val', test)):
    found = _identify(batches)
    for folder, _, label in found:
      assert names[label] == folder  # label index -> the image's folder
    seen[split] = {(folder, i) for folder, i, _ in found}
  expected = {
      split: {
          (os.path.basename(os.path.dirname(p)), int(os.path.basename(p)[:2]))
          for p in image_folders.list_folder(flowers, split)[0]
      } for split in ('train', 'val')
  }
  assert seen == expected
  assert len(seen['train']) == 24  # one epoch: each train image once

  # The report of the same config: counts, seed, files, logged table.
  with open(tmp_path / 'split.json') as f:
    split = json.load(f)
  assert split['kind'] == 'folder single_tree'
  assert split['val_fraction'] == 0.2 and split['split_seed'] == 0
  assert split['splits'] == {'train': 'train', 'val': 'val'}
  assert split['per_class'] == {n: {'train': 8, 'val': 2} for n in names}
  assert split['num_examples'] == {'train': 24, 'val': 6}
  assert split['num_skipped'] == 1 and split['dropped_classes'] == []
  val_lines = sorted(f'{folder}/{i:02d}.png' for folder, i in seen['val'])
  assert split['val_files_sha256'] == hashlib.sha256(
      '\n'.join(val_lines).encode()).hexdigest()
  with Image.open(tmp_path / 'split_counts.png') as im:
    assert im.format == 'PNG' and im.size[0] > 200 and im.size[1] > 200
  assert report['files']['chart'] == str(tmp_path / 'split_counts.png')
  logged = '\n'.join(r.getMessage() for r in caplog.records)
  for name in names:
    assert re.search(rf'\d\s+{name}\s+8\s+2$', logged, re.M), logged
  assert re.search(r'total\s+24\s+6$', logged, re.M)


def test_single_tree_process_shards(flowers):
  config = _config(flowers, batch=8, batch_eval=4)  # 4 and 2 per process
  shards = {'train': [], 'val': []}
  for pi in range(2):
    ds_train, ds_test = input_pipeline.get_datasets(
        config, process_index=pi, process_count=2)
    shards['train'].append({(f, i) for f, i, _ in _identify(
        itertools.islice(ds_train.as_numpy_iterator(), 3))})  # its 12
    test = list(ds_test.as_numpy_iterator())
    assert len(test) == 2  # ceil(3 / 2) on both processes
    shards['val'].append({(f, i) for f, i, _ in _identify(test)})
  for split, (a, b) in shards.items():
    assert not a & b
    assert len(a | b) == {'train': 24, 'val': 6}[split]


def test_report_of_other_dataset_kinds(tmp_path):
  report = dataset_report.write_dataset_report(
      ml_collections.ConfigDict(dict(dataset='embedded_mnist')),
      str(tmp_path / 'mnist'))
  with open(tmp_path / 'mnist' / 'class_names.json') as f:
    assert json.load(f) == [str(i) for i in range(10)]
  assert report['per_class']['3'] == {'train': 400, 'val': 100}
  assert report['splits'] == {'train': 'train', 'val': 'test'}
  assert report['val_fraction'] is None
  assert os.path.isfile(tmp_path / 'mnist' / 'split_counts.png')

  root = tmp_path / 'tt'
  for split, n in (('train', 3), ('test', 1)):
    for name in ('b', 'a'):
      (root / split / name).mkdir(parents=True)
      for i in range(n if name == 'a' else 2 * n):
        _write_png(root / split / name / f'{i}.png', [i, 0, 0], 5, 5)
  report = dataset_report.write_dataset_report(
      ml_collections.ConfigDict(dict(dataset=str(root), test_split='test')),
      str(tmp_path / 'tt_work'))
  assert report['kind'] == 'folder train_test'
  assert report['per_class'] == {
      'a': {
          'train': 3,
          'val': 1
      },
      'b': {
          'train': 6,
          'val': 2
      }
  }
  with open(tmp_path / 'tt_work' / 'split.json') as f:
    assert json.load(f)['class_names'] == ['a', 'b']


class TinyFlowersForReport(tfds.core.GeneratorBasedBuilder):
  """A real TFDS dataset with named classes, prepared offline in a test."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    features = tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3)),
        'label': tfds.features.ClassLabel(names=['iris', 'lily', 'rose'])
    })
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {
        'train': self._generate_examples(12),
        'test': self._generate_examples(5)
    }

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'image': np.full((4, 4, 3), i, np.uint8), 'label': i % 3}


def test_report_of_tfds_has_sizes_without_per_class_counts(tmp_path):
  TinyFlowersForReport(data_dir=str(tmp_path)).download_and_prepare()
  config = ml_collections.ConfigDict(
      dict(
          dataset='tiny_flowers_for_report',
          tfds_data_dir=str(tmp_path),
          train_split='train[:50%]',
          test_split='test'))
  report = dataset_report.write_dataset_report(config, str(tmp_path / 'work'))
  assert report['kind'] == 'tfds' and report['per_class'] is None
  assert report['num_examples'] == {'train': 6, 'val': 5}
  with open(tmp_path / 'work' / 'class_names.json') as f:
    assert json.load(f) == ['iris', 'lily', 'rose']
  assert report['files']['chart'] is None
  assert not os.path.exists(tmp_path / 'work' / 'split_counts.png')
  assert 'not computed' in report['table']


# ------------------------------------------------------------- awkward trees


def _tree(root, counts):
  for name, n in counts.items():
    (root / name).mkdir(parents=True)
    for i in range(n):
      _write_png(root / name / f'{i}.png', [30 * i, 0, 0], 6, 6)
  return str(root)


def test_class_with_one_image_trains_and_warns(tmp_path, caplog):
  root = _tree(tmp_path / 'd', {'lone': 1, 'many': 5})
  caplog.set_level(logging.WARNING)
  train = input_pipeline.get_dataset_info(root, 'train')
  val = input_pipeline.get_dataset_info(root, 'val')
  assert (train['num_examples'], val['num_examples']) == (5, 1)
  assert list(train['int2str']) == ['lone', 'many']
  assert re.search(r"\['lone'\].*single image.*Add images",
                   caplog.text), caplog.text
  labels = image_folders.list_folder(root, 'val')[1]
  np.testing.assert_array_equal(labels, [1])  # 'many' keeps its index
  only_one = _tree(tmp_path / 'e', {'x': 1, 'y': 1})
  with pytest.raises(ValueError, match="'val' split.*is empty.*at least 2"):
    input_pipeline.get_dataset_info(only_one, 'val')


def test_empty_class_folder_is_dropped_with_warning(tmp_path, caplog):
  root = _tree(tmp_path / 'd', {'ant': 4, 'bee': 0, 'cow': 4})
  (tmp_path / 'd' / 'bee' / 'bad.jpg').write_bytes(b'not a jpeg')
  caplog.set_level(logging.WARNING)
  info = input_pipeline.get_dataset_info(root, 'train')
  assert list(info['int2str']) == ['ant', 'cow'] and info['num_classes'] == 2
  assert re.search(r"Dropping 1 class folder.*\['bee'\].*class_names.json",
                   caplog.text), caplog.text
  report = dataset_report.write_dataset_report(
      ml_collections.ConfigDict(dict(dataset=root, test_split='test')),
      str(tmp_path / 'work'))
  assert report['dropped_classes'] == ['bee']
  assert report['per_class'] == {
      'ant': {
          'train': 3,
          'val': 1
      },
      'cow': {
          'train': 3,
          'val': 1
      }
  }


def test_folder_without_class_subfolders(tmp_path):
  loose = tmp_path / 'loose'
  loose.mkdir()
  for i in range(3):
    _write_png(loose / f'{i}.png', [0, 0, 0], 4, 4)
  with pytest.raises(
      ValueError,
      match=r'no class subfolders \(3 image\(s\) '
      r'lie directly in it.*<dir>/<class>/\*\.jpg.*one '
      r'subfolder per class'):
    input_pipeline.get_dataset_info(str(loose), 'train')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='no class subfolders'):
    input_pipeline.get_dataset_info(str(tmp_path / 'empty'), 'train')
  unreadable = _tree(tmp_path / 'bad', {'a': 0})
  (tmp_path / 'bad' / 'a' / 'x.png').write_bytes(b'nope')
  with pytest.raises(ValueError, match='no readable'):
    input_pipeline.get_dataset_info(unreadable, 'train')
  ok = _tree(tmp_path / 'ok', {'a': 3})
  with pytest.raises(ValueError, match=r"'holdout'.*test_split"):
    input_pipeline.get_dataset_info(ok, 'holdout')
  with pytest.raises(ValueError, match='val_fraction=1.0'):
    input_pipeline.get_datasets(
        _config(ok, val_fraction=1.0, batch=1, batch_eval=1))

"""The flower-photos workflow of configs/flowers.py, end to end, offline.

What the PyTorch tutorials do (a folder of flower photos, split 80/20 at
random, an ImageNet-21k ViT-B/16 with its backbone frozen, a new head
trained for 10 epochs), run by the command a user types (parsed in this
process as vit_jax.main parses it: one start of the interpreter fewer; the
command itself runs in tests/test_flowers_tutorial.py), on a generated
folder: five flower classes of uneven size, 32x32 PNGs whose colour depends
on the class, and a tiny "pre-trained" ViT with a representation layer saved
as a released-format `.npz`. Only the model's size and the resolution are
overridden on the command line; data split, steps (10 epochs, counted from
the folder), optimizer and frozen parameters are the preset's.
"""

import contextlib
import hashlib
import io
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import flowers
from test_original_commands import parse_main_command
from test_train import set_fields  # (also puts the repository root on path)
from vit_jax import checkpoint
from vit_jax import models
from vit_jax import train
from vit_jax.checkpoints import train_checkpoint
from vit_jax.checkpoints import trees
from vit_jax.data import folder_split
from vit_jax.reporting import dataset_report
from vit_jax.run_config import validation
from vit_jax.training import trainable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Class folder -> (images, base RGB). Uneven like the real flower photos
# (633 to 898 per class); the colours are far apart, so that the random
# features of a tiny frozen ViT separate them after a few head updates.
CLASSES = {
    'daisy': (21, (245, 245, 245)),
    'dandelion': (30, (245, 225, 20)),
    'roses': (24, (210, 20, 40)),
    'sunflowers': (26, (40, 170, 60)),
    'tulips': (28, (200, 40, 210)),
}
SIZE = 32  # pixels; 8x8 patches -> a 4x4 grid

# The tiny "pre-trained" model: the fields of config.model the command line
# overrides (ViT-B_16's otherwise), with a representation layer as the
# ImageNet-21k checkpoints have.
TINY_MODEL = {
    'hidden_size': 16,
    'patches.size': (8, 8),
    'transformer.mlp_dim': 32,
    'transformer.num_heads': 2,
    'transformer.num_layers': 1,
    'representation_size': 16,
}
PRETRAINED_CLASSES = 21  # a head the fine-tuning run must replace


def _write_flowers(root):
  rng = np.random.RandomState(0)
  for name, (n, rgb) in CLASSES.items():
    os.makedirs(os.path.join(root, name))
    for i in range(n):
      pixels = np.array(rgb, np.float32) + rng.uniform(-40, 40, (SIZE, SIZE, 3))
      Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
          os.path.join(root, name, f'{i:03d}.png'))


def _tiny_model_config():
  return set_fields(flowers.get_config('tf_flowers').model, TINY_MODEL)


def _write_pretrained(path):
  """A randomly initialised tiny ViT (seed 1, not the run's 0) as `.npz`."""
  model = models.VisionTransformer(
      num_classes=PRETRAINED_CLASSES, **_tiny_model_config())
  params = model.init(
      jax.random.PRNGKey(1), jnp.zeros((1, SIZE, SIZE, 3)),
      train=False)['params']
  params = jax.tree_util.tree_map(np.asarray, params)
  params['head']['kernel'] = np.random.RandomState(1).normal(
      size=params['head']['kernel'].shape).astype(np.float32)
  checkpoint.save(params, path)  # released (pre-linen) names


def _flat(tree):
  return {k: np.asarray(v) for k, v in trees.flatten_tree(tree).items()}


def _expected_split(root, split_seed):
  """{class: (train names, val names)} straight from folder_split."""
  files = {
      name: [
          os.path.join(root, name, f)
          for f in os.listdir(os.path.join(root, name))
      ] for name in CLASSES
  }
  return folder_split.split_files(
      files, val_fraction=0.2, split_seed=split_seed, root=root)


def _val_digest(parts):
  lines = [
      f'{name}/{os.path.basename(p)}' for name in sorted(parts)
      for p in parts[name][1]
  ]
  return hashlib.sha256('\n'.join(lines).encode()).hexdigest()


def _run_command(argv):
  """`python -m vit_jax.main <argv>` in this process: the config file flag
  and its overrides parsed as vit_jax.main parses them, then
  train.train_and_evaluate as main calls it; returns what it printed."""
  config, workdir = parse_main_command(argv)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    train.train_and_evaluate(config, workdir)
  return out.getvalue()


@pytest.fixture(scope='module')
def flower_run(tmp_path_factory):
  """The preset run once through its command line: (paths, stdout)."""
  base = tmp_path_factory.mktemp('flowers_workflow')
  paths = {
      'data': str(base / 'flower_photos'),
      'npz': str(base / 'ViT-tiny.npz'),
      'workdir': str(base / 'work')
  }
  _write_flowers(paths['data'])
  _write_pretrained(paths['npz'])
  overrides = [f'--config.model.{k}={v}' for k, v in TINY_MODEL.items()]
  stdout = _run_command([
      f'--config={REPO}/configs/flowers.py:{paths["data"]}',
      f'--workdir={paths["workdir"]}',
      f'--config.pretrained_path={paths["npz"]}', f'--config.pp.crop={SIZE}',
      *overrides
  ])
  return paths, stdout


def test_flower_workflow_prints_counts_and_accuracy(flower_run):
  paths, stdout = flower_run
  print(stdout)  # shown by pytest -s / on failure: what the user sees
  parts = _expected_split(paths['data'], split_seed=0)

  # The dataset table: per class, exactly folder_split's 80/20.
  rows = {
      m.group(2): (int(m.group(1)), int(m.group(3)), int(m.group(4)))
      for m in re.finditer(r'^\s*(\d+)\s+(\S+)\s+(\d+)\s+(\d+)$', stdout, re.M)
  }
  assert rows == {
      name: (i, len(parts[name][0]), len(parts[name][1]))
      for i, name in enumerate(sorted(CLASSES))
  }, stdout
  # round(0.2 n) of each class: stratified, not 20% of the whole folder.
  assert {
      n: rows[n][2] for n in rows
  } == dict(
      daisy=4, dandelion=6, roses=5, sunflowers=5, tulips=6)
  n_train = sum(len(t) for t, _ in parts.values())
  n_val = sum(len(v) for _, v in parts.values())
  assert (n_train, n_val) == (103, 26)
  assert re.search(rf'^\s+total\s+{n_train}\s+{n_val}$', stdout, re.M)
  assert 'val_fraction=0.2, split_seed=0' in stdout

  # Only the head trains: 16 x 5 + 5 of the tiny model's parameters.
  assert re.search(
      r'^Training 85 of [\d,]+ parameters \(head/bias, '
      r'head/kernel\); the rest frozen\.$', stdout, re.M), stdout

  # 10 epochs of batch 64, validated after every epoch and at the end.
  steps, per_epoch = math.ceil(10 * n_train / 64), math.ceil(n_train / 64)
  evals = [
      int(s)
      for s in re.findall(r'^step (\d+): test accuracy [\d.]+$', stdout, re.M)
  ]
  expected = list(range(per_epoch, steps + 1, per_epoch))
  if steps % per_epoch:
    expected.append(steps)
  assert (steps, per_epoch, evals) == (17, 2, expected), stdout
  final = re.search(rf'^Final test accuracy ([\d.]+) after {steps} steps',
                    stdout, re.M)
  assert final, stdout
  # Chance is 0.2. Measured 1.0 at every epoch; with 25 images per class,
  # data and checkpoint seeds 0-2 all gave 1.0 too.
  assert float(final.group(1)) >= 0.8
  with open(os.path.join(paths['workdir'], 'summary.json')) as f:
    summary = json.load(f)
  assert summary['accuracy'] == pytest.approx(float(final.group(1)), abs=1e-4)
  assert summary['num_trainable_params'] == 85
  assert summary['config']['trainable'] == 'head'


def test_frozen_params_are_the_checkpoints_and_the_head_trained(flower_run):
  paths, _ = flower_run
  ckpts = train_checkpoint.TrainCheckpoints(paths['workdir'])
  try:
    end = _flat(ckpts.restore_params())
  finally:
    ckpts.close()
  pretrained = _flat(checkpoint.load(paths['npz']))  # linen names
  # The representation layer of the checkpoint is kept (and frozen).
  assert 'pre_logits/kernel' in end and 'pre_logits/kernel' in pretrained
  assert set(end) == set(pretrained)
  for key in sorted(end):
    if key.startswith('head/'):
      continue
    np.testing.assert_array_equal(end[key], pretrained[key], err_msg=key)
  # The head is new (5 classes, started at zero) and trained.
  assert end['head/kernel'].shape == (16, 5)
  assert pretrained['head/kernel'].shape == (16, PRETRAINED_CLASSES)
  assert np.all(end['head/kernel'] != 0) and np.all(end['head/bias'] != 0)


def test_split_files_are_written_and_reproducible(flower_run, tmp_path):
  paths, _ = flower_run
  with open(os.path.join(paths['workdir'], 'class_names.json')) as f:
    assert json.load(f) == sorted(CLASSES)
  with open(os.path.join(paths['workdir'], 'split.json')) as f:
    written = json.load(f)
  assert os.path.isfile(os.path.join(paths['workdir'], 'split_counts.png'))
  assert written['val_fraction'] == 0.2 and written['split_seed'] == 0
  assert written['val_files_sha256'] == _val_digest(
      _expected_split(paths['data'], 0))

  # A second run of the same config draws the same split; split_seed=1 other
  # files with the same per-class counts.
  config = flowers.get_config(paths['data'])
  dataset_report.write_dataset_report(config, str(tmp_path / 'again'))
  with open(tmp_path / 'again' / 'split.json') as f:
    assert json.load(f) == written
  config.split_seed = 1
  other = dataset_report.write_dataset_report(config, str(tmp_path / 'seed1'))
  assert other['val_files_sha256'] != written['val_files_sha256']
  assert other['val_files_sha256'] == _val_digest(
      _expected_split(paths['data'], 1))
  assert other['per_class'] == written['per_class']


# ------------------------------------------------------------ the preset


def test_tf_flowers_preset_runs_on_mocked_tfds(tmp_path, capsys):
  """'tf_flowers' with its 'train[:80%]' / 'train[80%:]' slices, on TFDS's
  mock data (random images and labels: only the plumbing is checked)."""
  data_dir = str(tmp_path / 'tfds')
  builder = tfds.builder('tf_flowers', data_dir=data_dir)
  builder.info.set_splits(
      tfds.core.SplitDict(
          [tfds.core.SplitInfo(name='train', shard_lengths=[40], num_bytes=0)]))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)
  config = flowers.get_config('tf_flowers')
  config.tfds_data_dir = data_dir
  config.model = _tiny_model_config()
  config.pp.crop = SIZE
  config.total_steps, config.warmup_steps = 2, 1
  config.pretrained_path = str(tmp_path / 'ViT-tiny.npz')
  _write_pretrained(config.pretrained_path)
  with tfds.testing.mock_data(
      num_examples=40,
      data_dir=data_dir,
      policy=tfds.testing.MockPolicy.USE_FILES):
    summary = train.train_and_evaluate(config, str(tmp_path / 'work'))
  out = capsys.readouterr().out
  assert "train split 'train[:80%]', val split 'train[80%:]'" in out, out
  assert re.search(r'^\s+total\s+32\s+8$', out, re.M), out  # 80/20 of 40
  assert summary['step'] == 2 and summary['num_trainable_params'] == 85
  with open(tmp_path / 'work' / 'class_names.json') as f:
    assert json.load(f) == [
        'dandelion', 'daisy', 'tulips', 'sunflowers', 'roses'
    ]  # TFDS's label order


def test_preset_tfds_and_folder_fields(tmp_path):
  tfds_config = flowers.get_config('tf_flowers')
  assert tfds_config.dataset == 'tf_flowers'
  assert (tfds_config.train_split, tfds_config.test_split) == ('train[:80%]',
                                                               'train[80%:]')
  assert tfds_config.val_fraction is None
  # 10 epochs of the 2,936 photos of 'train[:80%]' at batch 64.
  assert tfds_config.total_steps == 459 and tfds_config.batch == 64
  assert tfds_config.eval_every == 46
  assert tfds_config.trainable == 'head'
  assert tfds_config.pp.crop == 224
  assert validation.pretrained_path(tfds_config) == os.path.join(
      '.', 'ViT-B_16.npz')
  assert tfds_config.model.hidden_size == 768
  assert tfds_config.model.representation_size == 768  # 21k's pre_logits

  # ViT-B/16 with the 21k representation layer and a 5-class head: only
  # the head's 768 x 5 + 5 parameters train.
  model = train.create_model(tfds_config, 5)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False))
  params = shapes['params']
  mask = trainable.trainable_mask(params, tfds_config.trainable)
  assert trainable.describe(params, mask) == (
      'Training 3,845 of 86,393,093 parameters (head/bias, head/kernel); '
      'the rest frozen.')
  assert params['pre_logits']['kernel'].shape == (768, 768)

  folder = tmp_path / 'photos'
  for name in ('a', 'b'):
    (folder / name).mkdir(parents=True)
    for i in range(10):
      Image.new('RGB', (4, 4), (25 * i, 0, 0)).save(folder / name / f'{i}.png')
  folder_config = flowers.get_config(str(folder))
  assert folder_config.dataset == str(folder)
  assert (folder_config.val_fraction, folder_config.split_seed) == (0.2, 0)
  assert (folder_config.train_split, folder_config.test_split) == ('train',
                                                                   'test')
  assert folder_config.total_steps == math.ceil(10 * 16 / 64)  # 8 + 8 train
  # A path that does not exist yet: the flower photos' steps; the run
  # itself fails later with the accepted layouts.
  assert flowers.get_config(str(tmp_path / 'later')).total_steps == 459
  with pytest.raises(ValueError, match='"tf_flowers" or an image folder'):
    flowers.get_config('oxford_flowers102')


def test_preset_is_locked():
  config = flowers.get_config('tf_flowers')
  with pytest.raises(AttributeError):
    config.epochs = 10  # not a field of vit_jax/configs/schema.py
  assert isinstance(config.model, ml_collections.ConfigDict)

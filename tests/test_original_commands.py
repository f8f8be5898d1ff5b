"""The original vit_jax README's commands, run as written on tfds mock data.

Each runs `python -m vit_jax.main --workdir=W --config=<the original's config
file>[:arg] ...` in this process (so that `tfds.testing.mock_data` applies;
see `run_main`),
with a local `--config.pretrained_dir` holding `vit_jax.test_utils`
checkpoints and overrides that shrink the model, images and steps. Each must
train, evaluate and leave TensorBoard events and checkpoints in the workdir.
"""

import glob
import os

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import pandas as pd
import pytest
import tensorflow_datasets as tfds

from vit_jax import checkpoint
from vit_jax import input_pipeline
from vit_jax import test_utils
from vit_jax import train
from vit_jax.checkpoints import export
from vit_jax.checkpoints import train_checkpoint
from vit_jax.configs import common
from vit_jax.configs import models
from vit_jax.data import tf_import

tf = tf_import.import_tensorflow()  # TensorFlow without Keras

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, 'vit_jax', 'configs')

# Two steps of batch 8 on 32x32 images; evaluated at the end.
SMALL_RUN = [
    '--config.total_steps=2', '--config.warmup_steps=1', '--config.batch=8',
    '--config.batch_eval=8', '--config.accum_steps=1', '--config.pp.crop=32',
    '--config.shuffle_buffer=16', '--config.prefetch=0'
]
AUGREG_STEM = 'R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0'


def _write_metadata(data_dir, name, splits):
  """dataset_info.json, so that mock_data knows the split sizes."""
  builder = tfds.builder(name, data_dir=data_dir)
  builder.info.set_splits(
      tfds.core.SplitDict([
          tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0)
          for split, n in splits.items()
      ]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)


def _write_augreg_index(directory):
  """An index.csv: the best i21k run of R_Ti_16 is AUGREG_STEM (an i1k run
  scores higher and must not be picked)."""
  rows = [
      ('R_Ti_16-i21k-300ep-lr_0.001-aug_light0-wd_0.1-do_0.0-sd_0.0', 'i21k',
       0.40),
      (AUGREG_STEM, 'i21k', 0.45),
      ('R_Ti_16-i1k-300ep-lr_0.001-aug_none-wd_0.1-do_0.1-sd_0.1', 'i1k', 0.70),
      ('S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0', 'i21k',
       0.50),
  ]
  pd.DataFrame(
      rows, columns=['filename', 'ds', 'final_val']).to_csv(
          os.path.join(directory, 'index.csv'), index=False)


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  """Mock-data directory and a pretrained_dir with small checkpoints."""
  root = tmp_path_factory.mktemp('original_commands')
  data_dir = str(root / 'tfds')
  _write_metadata(data_dir, 'cifar10', {'train': 50, 'test': 8})
  _write_metadata(data_dir, 'oxford_iiit_pet', {'train': 50, 'test': 8})
  pretrained = root / 'pretrained'
  test_utils.create_checkpoint(models.get_testing_config(),
                               str(pretrained / 'testing.npz'))
  mixer = models.get_mixer_b16_config().unlock()
  mixer.update(hidden_dim=8, num_blocks=1, tokens_mlp_dim=4, channels_mlp_dim=8)
  test_utils.create_checkpoint(
      mixer, str(pretrained / 'Mixer-B_16.npz'), image_size=32)
  r_ti = models.AUGREG_CONFIGS['R_Ti_16'].copy_and_resolve_references()
  r_ti.transformer.num_layers = 1
  test_utils.create_checkpoint(
      r_ti, str(pretrained / f'{AUGREG_STEM}.npz'), image_size=32)
  _write_augreg_index(str(pretrained))
  return {'data': data_dir, 'pretrained': str(pretrained), 'root': root}


def _encoded_images(self, split, **unused_kwargs):
  """Mock examples of any image dataset: PNG bytes (the pipeline decodes
  them itself) and labels, as many as the split's metadata says. (tfds's own
  mock of oxford_iiit_pet draws invalid bounding boxes.)"""
  n = self.info.splits[split].num_examples
  rng = np.random.default_rng(0)
  images = [
      tf.io.encode_png(rng.integers(0, 256, (40, 48, 3), np.uint8))
      for _ in range(n)
  ]
  labels = rng.integers(0, self.info.features['label'].num_classes, n)
  return tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})


def parse_main_command(argv):
  """(config, workdir) of `python -m vit_jax.main <argv>`, parsed as
  vit_jax.main parses it: an ml_collections config file flag with
  `--config.<field>` overrides, here in flag values of its own."""
  argv = ['vit_jax.main'] + argv
  flag_values = flags.FlagValues()
  config_flag = config_flags.DEFINE_config_file(
      'config', None, flag_values=flag_values, lock_config=True, sys_argv=argv)
  workdir_flag = flags.DEFINE_string(
      'workdir', None, '', flag_values=flag_values)
  flag_values(argv)
  return config_flag.value, workdir_flag.value


def run_main(argv, data_dir):
  """`python -m vit_jax.main <argv>` in this process, on mock data: the
  parsed command handed to train.train_and_evaluate, as main does."""
  config, workdir = parse_main_command(argv)
  with tfds.testing.mock_data(
      num_examples=50,
      data_dir=data_dir,
      policy=tfds.testing.MockPolicy.USE_FILES,
      as_dataset_fn=_encoded_images):
    train.train_and_evaluate(config, workdir)


def event_tags(workdir):
  tags = set()
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  return tags


def assert_trained_and_evaluated(workdir, steps=2):
  assert train_checkpoint.TrainCheckpoints(workdir).latest_step() == steps
  assert os.path.exists(os.path.join(workdir, 'summary.json'))
  # The original's TensorBoard names for the train loss and test accuracy.
  assert {'train_loss', 'accuracy_test'} <= event_tags(workdir)


def test_vit_finetuning_command(dirs):
  workdir = str(dirs['root'] / 'vit')
  run_main([
      f'--workdir={workdir}', f'--config={CONFIGS}/vit.py:testing,cifar10',
      f'--config.pretrained_dir={dirs["pretrained"]}',
      f'--config.tfds_data_dir={dirs["data"]}'
  ] + SMALL_RUN, dirs['data'])
  assert_trained_and_evaluated(workdir)


def test_augreg_command_picks_the_best_i21k_checkpoint(dirs):
  workdir = str(dirs['root'] / 'augreg')
  run_main([
      f'--workdir={workdir}', f'--config={CONFIGS}/augreg.py:R_Ti_16',
      '--config.dataset=oxford_iiit_pet', "--config.pp.train=train[:90%]",
      '--config.base_lr=0.01', f'--config.pretrained_dir={dirs["pretrained"]}',
      f'--config.tfds_data_dir={dirs["data"]}',
      '--config.model.transformer.num_layers=1'
  ] + SMALL_RUN, dirs['data'])
  assert_trained_and_evaluated(workdir)
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert f'{AUGREG_STEM}.npz' in f.read()


def test_mixer_command(dirs):
  workdir = str(dirs['root'] / 'mixer')
  run_main([
      f'--workdir={workdir}', f'--config={CONFIGS}/mixer_base16_cifar10.py',
      f'--config.pretrained_dir={dirs["pretrained"]}',
      f'--config.tfds_data_dir={dirs["data"]}', '--config.model.hidden_dim=8',
      '--config.model.num_blocks=1', '--config.model.tokens_mlp_dim=4',
      '--config.model.channels_mlp_dim=8'
  ] + SMALL_RUN + ['--config.total_steps=3'], dirs['data'])
  assert_trained_and_evaluated(workdir, steps=3)
  # Fine-tuning as the original: a fresh zero head for the 10 classes, then
  # trained; the pre-trained body is fine-tuned too (from step 3 on: the
  # first update has learning rate 0, and the body's gradient is 0 while
  # the head is).
  pretrained = checkpoint.load(
      os.path.join(dirs['pretrained'], 'Mixer-B_16.npz'))
  tuned_path = os.path.join(workdir, 'tuned.npz')
  export.export(workdir, tuned_path)
  tuned = checkpoint.load(tuned_path)
  assert tuned['head']['kernel'].shape == (8, 10)
  assert np.any(tuned['head']['kernel'])
  assert not np.array_equal(tuned['stem']['kernel'],
                            pretrained['stem']['kernel'])


def test_inference_time_command(dirs):
  workdir = str(dirs['root'] / 'inference_time')
  run_main([
      f'--workdir={workdir}', f'--config={CONFIGS}/inference_time.py',
      '--config.model_name=testing', '--config.batch=8',
      '--config.num_classes=10', '--config.image_size=32', '--config.steps=2',
      '--config.initial_steps=1'
  ], dirs['data'])
  assert {
      'imgs_sec_core_min', 'imgs_sec_core_max', 'imgs_sec_core_mean',
      'imgs_sec_core_std'
  } <= event_tags(workdir)


def test_get_datasets_takes_the_original_config(dirs):
  """The original's Colab: its config straight into get_datasets."""
  config = common.with_dataset(common.get_config(), 'cifar10')
  config.batch = 8
  config.pp.crop = 32
  config.tfds_data_dir = dirs['data']
  with tfds.testing.mock_data(
      num_examples=50,
      data_dir=dirs['data'],
      policy=tfds.testing.MockPolicy.USE_FILES,
      as_dataset_fn=_encoded_images):
    ds_train, _ = input_pipeline.get_datasets(config)
    batch = next(iter(ds_train))
  devices = jax.local_device_count()
  assert np.asarray(batch['image']).shape == (devices, 8 // devices, 32, 32, 3)
  assert np.asarray(batch['label']).shape == (devices, 8 // devices, 10)

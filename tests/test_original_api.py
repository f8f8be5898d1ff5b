"""The original vit_jax's public names, its config modules, and their errors.

Every name below is imported from the module the original has it in, and the
main functions are called with the original's keyword arguments. Paths of
checkpoints, the AugReg index and image folders go through
`vit_jax.data.filesystem`: TensorFlow's in-memory `ram://` scheme stands in for
gs:// (no network).
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pandas as pd
import pytest

import test_train
from vit_jax import checkpoint
from vit_jax import inference_time
from vit_jax import input_pipeline
from vit_jax import models
from vit_jax import models_mixer
from vit_jax import models_resnet
from vit_jax import models_vit
from vit_jax import test_utils
from vit_jax import train
from vit_jax import utils
from vit_jax.configs import augreg
from vit_jax.configs import common
from vit_jax.configs import inference_time as inference_time_config
from vit_jax.configs import mixer_base16_cifar10
from vit_jax.configs import models as models_config
from vit_jax.configs import vit
from vit_jax.data import filesystem
from vit_jax.data import tf_import
from vit_jax.run_config import errors
from vit_jax.run_config import original_configs

tf = tf_import.import_tensorflow()  # TensorFlow without Keras

ORIGINAL_NAMES = {
    checkpoint: [
        'load', 'load_pretrained', 'inspect_params', 'recover_tree',
        'interpolate_posembed', 'get_augreg_df', 'copy'
    ],
    models: [
        'AddPositionEmbs', 'MlpBlock', 'Encoder1DBlock', 'Encoder', 'MlpMixer',
        'VisionTransformer', 'get_model'
    ],
    models_vit: [
        'IdentityLayer', 'AddPositionEmbs', 'MlpBlock', 'Encoder1DBlock',
        'Encoder', 'VisionTransformer'
    ],
    models_mixer: ['MlpBlock', 'MixerBlock', 'MlpMixer'],
    models_resnet: [
        'weight_standardize', 'StdConv', 'ResidualUnit', 'ResNetStage'
    ],
    train: ['make_update_fn', 'train_and_evaluate'],
    utils: [
        'create_learning_rate_schedule', 'accumulate_gradient',
        'add_gfile_logger'
    ],
    input_pipeline: ['get_dataset_info', 'get_datasets', 'prefetch'],
    inference_time: ['inference_time'],
    test_utils: ['create_checkpoint'],
    common: ['get_config', 'with_dataset', 'DATASET_PRESETS', 'flatten'],
    models_config: ['MODEL_CONFIGS', 'AUGREG_CONFIGS'] + [
        f'get_{name}_config'
        for name in ('testing', 'testing_unpooled', 'ti16', 's16', 'b16', 'l16',
                     'h14', 's16_gap_norep', 'b16_gap_norep', 'b8', 's32',
                     'b32', 'l32', 's32_gap_norep', 'b32_gap_norep', 'r_ti16',
                     'r50_b16', 'r26_b32', 'r26_s32', 'r50_l32', 'mixer_b16',
                     'mixer_b32', 'mixer_l16')
    ],
    vit: ['get_config'],
    augreg: ['get_config'],
    mixer_base16_cifar10: ['get_config'],
    inference_time_config: ['get_config'],
}


@pytest.mark.parametrize('module', ORIGINAL_NAMES, ids=lambda m: m.__name__)
def test_the_original_names_exist(module):
  missing = [n for n in ORIGINAL_NAMES[module] if not hasattr(module, n)]
  assert not missing, f'{module.__name__} lacks {missing}'


def test_checkpoint_functions_with_the_original_keywords(tmp_path):
  path = str(tmp_path / 'sub' / 'testing.npz')
  test_utils.create_checkpoint(models_config.get_testing_config(), path)
  model = models.get_model('testing', num_classes=3)
  init_params = model.init(
      jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)), train=False)['params']
  params = checkpoint.load_pretrained(
      pretrained_path=path,
      init_params=init_params,
      model_config=models_config.MODEL_CONFIGS['testing'])
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (
      1, 5, 10)  # 1x1 grid of 16x16 images resampled to 2x2, class token
  checkpoint.inspect_params(
      params=checkpoint.load(path),
      expected=init_params,
      fail_if_extra=False,
      fail_if_missing=False)
  posemb = checkpoint.interpolate_posembed(
      np.ones((1, 5, 10), np.float32), 10, True)
  assert posemb.shape == (1, 10, 10)
  tree = checkpoint.recover_tree(['a/b', 'c'], [1, 2])
  assert tree == {'a': {'b': 1}, 'c': 2}
  checkpoint.copy(path, str(tmp_path / 'copy.npz'), progress=False)
  assert set(checkpoint.load(str(tmp_path / 'copy.npz'))) == set(
      checkpoint.load(path))


def test_training_helpers_with_the_original_keywords():
  lr_fn = utils.create_learning_rate_schedule(
      total_steps=10,
      base=0.1,
      decay_type='linear',
      warmup_steps=2,
      linear_end=1e-5)
  assert float(lr_fn(1)) == pytest.approx(0.05)
  loss_and_grad = jax.value_and_grad(lambda p, x, y: jnp.mean((x.sum(
      (1, 2, 3)) * p - y.sum(1))**2))
  images, labels = jnp.ones((4, 2, 2, 1)), jnp.ones((4, 3))
  loss, _ = utils.accumulate_gradient(loss_and_grad, 1., images, labels, 2)
  assert float(loss) == pytest.approx(1.)
  model = models.get_model('testing', num_classes=3)
  tx = optax.sgd(0.1)
  update_fn = train.make_update_fn(apply_fn=model.apply, accum_steps=1, tx=tx)
  assert callable(update_fn)
  info = input_pipeline.get_dataset_info('embedded_mnist', 'train')
  assert info['num_classes'] == 10


def test_original_configs_have_its_fields_and_defaults():
  config = common.get_config()
  assert (config.pretrained_dir, config.progress_every, config.trainer,
          config.optim_dtype, config.accum_steps,
          config.base_lr) == ('.', 10, 'train', 'bfloat16', 8, 0.03)
  config = vit.get_config('b16,cifar10')
  assert config.base_lr == 0.01 and config.total_steps == 10_000
  assert config.pp.to_dict() == {
      'train': 'train[:98%]',
      'test': 'test',
      'crop': 384
  }
  assert config.model.model_name == 'ViT-B_16'
  assert dict(common.flatten(config))['config.pp.crop'] == 384
  config = augreg.get_config('R_Ti_16')
  assert config.model.model_name == 'R+ViT-Ti_16'
  assert config.pretrained_dir == 'gs://vit_models/augreg'
  assert (config.pp.resize, config.pp.crop, config.dataset) == (448, 384, '')
  config = mixer_base16_cifar10.get_config()
  assert config.model.model_name == 'Mixer-B_16' and config.pp.crop == 224
  config = inference_time_config.get_config()
  assert (config.model_name, config.steps, config.initial_steps) == ('ViT-B_32',
                                                                     30, 10)
  assert set(models_config.AUGREG_CONFIGS) >= {
      'Ti_16', 'S_16', 'B_16', 'L_16', 'B_32', 'R_Ti_16', 'R26_S_32',
      'R50_L_32', 'B_16-gap-norep'
  }
  assert not {'ViT-L_32', 'ViT-H_14', 'R50+ViT-B_16'} & set(
      models_config.AUGREG_CONFIGS)


def test_translation_to_this_projects_shape(tmp_path):
  """The issue's config (built as the original's own train test builds it),
  which train.train_and_evaluate once met with AttributeError: train_split."""
  test_utils.create_checkpoint(models_config.get_testing_config(),
                               str(tmp_path / 'testing.npz'))
  config = common.get_config()
  config.model = models_config.get_testing_config()
  config.dataset = 'cifar100'
  config.pp = ml_collections.ConfigDict({
      'train': 'train[:98%]',
      'test': 'test',
      'crop': 224
  })
  config.total_steps = 3
  config.pretrained_dir = str(tmp_path)
  config.progress_every = 7
  config.checkpoint_every = 0  # the original's "never": at the end only
  project = original_configs.to_project_config(config)
  assert (project.train_split, project.test_split,
          project.pp.crop) == ('train[:98%]', 'test', 224)
  assert project.log_every == 7 and project.checkpoint_every == 3
  assert project.pretrained_path == str(tmp_path / 'testing.npz')
  assert project.model.model_name == project.model_name == 'testing'


def test_an_image_folder_in_the_originals_shape_trains(tmp_path):
  """The original reads <dataset>/train and <dataset>/test: no split fields."""
  rng = np.random.RandomState(0)
  for split in ('train', 'test'):
    for c, name in enumerate(('red', 'green')):
      os.makedirs(tmp_path / 'data' / split / name)
      for i in range(4):
        pixels = rng.randint(0, 100, (16, 16, 3)).astype(np.uint8)
        pixels[..., c] = 255
        tf.io.write_file(
            str(tmp_path / 'data' / split / name / f'{i}.png'),
            tf.io.encode_png(pixels))
  test_utils.create_checkpoint(models_config.get_testing_config(),
                               str(tmp_path / 'testing.npz'))
  config = common.get_config()
  config.model = models_config.get_testing_config()
  config.dataset = str(tmp_path / 'data')
  config.pp = ml_collections.ConfigDict({'crop': 16})
  config.pretrained_dir = str(tmp_path)
  config.total_steps, config.batch, config.batch_eval = 2, 8, 8
  config.accum_steps, config.warmup_steps = 1, 1
  summary = train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert (summary['step'], summary['config']['train_split'],
          summary['config']['test_split']) == (2, 'train', 'test')
  assert np.sum(summary['confusion']) == 8  # every test image, once


def test_a_field_of_neither_shape_is_named():
  config = vit.get_config('testing,cifar10')
  config.learning_rate = 0.1
  with pytest.raises(
      ValueError, match=r'config\.learning_rate is a field of '
      'neither'):
    original_configs.to_project_config(config)
  config = vit.get_config('testing,cifar10')
  del config.pp['train']
  with pytest.raises(
      ValueError,
      match=r'config\.pp\.train is not set.*'
      r'config\.train_split'):
    original_configs.to_project_config(config)


def test_missing_pretrained_file_names_it_and_the_bucket(tmp_path):
  config = vit.get_config('b16,cifar10')
  config.pretrained_dir = str(tmp_path)
  with pytest.raises(errors.ConfigError) as e:
    train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert str(tmp_path / 'ViT-B_16.npz') in str(e.value)
  assert 'gs://vit_models/imagenet21k' in str(e.value)
  config = mixer_base16_cifar10.get_config()
  config.pretrained_dir = str(tmp_path)
  with pytest.raises(errors.ConfigError, match='gs://mixer_models/imagenet21k'):
    original_configs.to_project_config(config)


def test_unknown_vit_pair_lists_the_accepted_ones():
  with pytest.raises(ValueError) as e:
    vit.get_config('b99,cifar10')
  assert all(
      name in str(e.value)
      for name in ('b16', 'l16', 'r50_b16', 'cifar100', 'imagenet2012'))
  with pytest.raises(ValueError, match='cifar10, cifar100, imagenet2012'):
    vit.get_config('b16,mnist')


def test_unknown_augreg_name_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"'X_99'.*R_Ti_16.*S_16"):
    augreg.get_config('X_99-i21k-300ep')


def test_a_registered_scheme_reaches_the_readers():
  """ram:// (TensorFlow's in-memory file system) stands in for gs://."""
  root = 'ram://vit_models/augreg'
  stem = 'Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0'
  index = pd.DataFrame([(stem, 'i21k', 0.5),
                        ('Ti_16-i21k-30ep', 'i21k_30', 0.9)],
                       columns=['filename', 'ds', 'final_val'])
  with filesystem.open_file(f'{root}/index.csv', 'w') as f:
    index.to_csv(f, index=False)
  model_config = models_config.get_ti16_config()
  model_config.transformer.num_layers = 1
  test_utils.create_checkpoint(model_config, f'{root}/{stem}.npz')
  assert filesystem.exists(f'{root}/{stem}.npz')
  config = augreg.get_config('Ti_16')
  config.pretrained_dir = root
  config.dataset = 'cifar10'
  project = original_configs.to_project_config(config)
  assert project.pretrained_path == f'{root}/{stem}.npz'
  params = checkpoint.load(project.pretrained_path)
  assert params['embedding']['kernel'].shape == (16, 16, 3, 192)
  assert checkpoint.get_augreg_df(directory=root).filename[0] == stem


def test_config_paths_are_reachable():
  """The original's config files are where its README says."""
  directory = os.path.dirname(common.__file__)
  for name in ('vit', 'augreg', 'mixer_base16_cifar10', 'inference_time',
               'common', 'models'):
    assert os.path.exists(os.path.join(directory, f'{name}.py'))
  assert isinstance(common.DATASET_PRESETS['cifar10'],
                    ml_collections.ConfigDict)


def test_an_image_folder_behind_a_scheme_feeds_the_pipeline():
  root = 'ram://image_folder'
  rng = np.random.default_rng(0)
  for split, per_class in (('train', 6), ('test', 2)):
    for name in ('cat', 'dog'):
      filesystem.makedirs(f'{root}/{split}/{name}')
      for i in range(per_class):
        png = tf.io.encode_png(rng.integers(0, 256, (20, 24, 3), np.uint8))
        with filesystem.open_file(f'{root}/{split}/{name}/{i}.png', 'wb') as f:
          f.write(png.numpy())
  info = input_pipeline.get_dataset_info(root, 'train')
  assert (info['num_examples'], info['num_classes']) == (12, 2)
  config = test_train.tiny_config(dataset=root, batch=8, batch_eval=4)
  ds_train, _ = input_pipeline.get_datasets(config)
  batch = next(iter(ds_train))
  assert np.asarray(batch['image']).shape[-3:] == (28, 28, 3)

"""The experiment configs hold the paper's recipes (Appendix B.1, Table 3)."""

import glob
import importlib
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from configs import embedded
from configs import embedded_finetune
from configs import embedded_pretrain
from configs import finetune
from configs import imagenet1k
from configs import imagenet21k
from test_train import REPO
from vit_jax import models
from vit_jax import train
from vit_jax.configs import schema


def test_base_config_is_locked():
  config = schema.get_config()
  with pytest.raises(AttributeError):
    config.base_lrr = 0.1  # a typo fails instead of being ignored
  config.base_lr = 0.1


@pytest.mark.parametrize('dataset,steps,train_split,test_split', [
    ('cifar10', 10_000, 'train[:98%]', 'test'),
    ('cifar100', 10_000, 'train[:98%]', 'test'),
    ('imagenet2012', 20_000, 'train[:99%]', 'validation'),
    ('oxford_iiit_pet', 500, 'train[:90%]', 'test'),
    ('oxford_flowers102', 500, 'train[:90%]', 'test'),
])
def test_finetune_presets(dataset, steps, train_split, test_split):
  config = finetune.get_config(f'l16,{dataset}')
  assert (config.dataset, config.total_steps) == (dataset, steps)
  assert (config.train_split, config.test_split) == (train_split, test_split)
  assert config.pp.crop == 384 and config.pp.augment == 'inception_crop'
  assert config.optimizer == 'sgd_momentum' and config.momentum == 0.9
  assert config.optim_dtype == 'bfloat16' and config.weight_decay == 0
  assert config.batch == 512 and config.grad_norm_clip == 1.0
  assert config.warmup_steps == 500 and config.decay_type == 'cosine'
  assert config.base_lr == 0.03
  assert config.model_name == 'ViT-L_16'
  # The zoo's fields, plus the speed switches at their defaults.
  assert config.model.to_dict() == (
      models.MODEL_CONFIGS['ViT-L_16'].to_dict() | schema.SPEED_FIELDS)
  assert config.pretrained_dir == '.'  # ./ViT-L_16.npz, as the original


def test_finetune_model_arguments():
  assert finetune.get_config('b16,cifar10').base_lr == 0.01  # B/16 on CIFAR-10
  assert finetune.get_config('ViT-B_16,cifar100').base_lr == 0.03
  hybrid = finetune.get_config('r50_b16,cifar10')
  assert hybrid.model.resnet.num_layers == (3, 4, 9)
  with pytest.raises(ValueError, match='Unknown dataset'):
    finetune.get_config('b16,mnist')
  with pytest.raises(ValueError, match='<model>,<dataset>'):
    finetune.get_config('b16')
  with pytest.raises(ValueError, match='Unknown model'):
    finetune.get_config('b17,cifar10')


@pytest.mark.parametrize('module,model', [(imagenet21k, 'b16'),
                                          (imagenet1k, 'b16'),
                                          (imagenet21k, 'l16')])
def test_pretraining_table3(module, model):
  config = module.get_config(model)
  assert config.optimizer == 'adamw'
  assert (config.adam_b1, config.adam_b2) == (0.9, 0.999)
  assert config.batch == 4096 and config.warmup_steps == 10_000
  assert config.pp.crop == 224
  assert config.model.representation_size == config.model.hidden_size
  assert config.model.transformer.dropout_rate == 0.1
  if module is imagenet21k:
    assert (config.base_lr, config.weight_decay) == (1e-3, 0.03)
    assert config.decay_type == 'linear' and config.linear_end == 1e-5
    assert config.model.head_bias_init == -10.
    assert config.loss == 'sigmoid_xent'
    epochs = 30 if model == 'l16' else 90
    assert config.total_steps == epochs * imagenet21k.NUM_TRAIN_IMAGES // 4096
  else:
    assert (config.base_lr, config.weight_decay) == (3e-3, 0.3)
    assert config.decay_type == 'cosine' and config.grad_norm_clip == 1.0
    assert config.total_steps == 300 * imagenet1k.NUM_TRAIN_IMAGES // 4096
    assert config.loss == 'softmax_xent'


def test_embedded_configs():
  digits = embedded.get_digits_config()
  assert digits.dataset == 'embedded_mnist' and digits.pp.crop == 28
  assert tuple(digits.model.patches.size) == (7, 7)
  assert digits.model.hidden_size == 64
  assert digits.model.transformer.num_layers == 4
  assert digits.optimizer == 'adamw' and digits.pp.augment == 'shift'
  main = embedded.get_config()  # the digits setup with the main job's recipe
  assert main.pp.augment == 'affine' and main.pp.rotate == 15
  assert main.model.classifier == 'gap' and digits.model.classifier == 'token'
  assert main.model.attention_impl == 'heads_major'
  changed = {k for k, v in main.items() if digits.get(k) != v}
  assert changed == {'pp', 'model', 'total_steps', 'accum_steps'}
  assert main.accum_steps == 4 and digits.accum_steps == 1
  assert embedded.get_config('digits').to_dict() == digits.to_dict()
  pre = embedded_pretrain.get_config()
  assert pre.model.representation_size == 64 and pre.model.posemb == 'learn'
  ft = embedded_finetune.get_config('/x/ViT-mnist_7.npz')
  assert ft.pretrained_path == '/x/ViT-mnist_7.npz' and ft.pp.crop == 42
  assert ft.model.representation_size is None
  assert embedded_finetune.get_config().pretrained_dir == '.'


def test_every_config_states_its_command_and_result():
  for path in glob.glob(os.path.join(REPO, 'configs', '*.py')):
    name = os.path.basename(path)
    if name in ('__init__.py', 'common.py'):
      continue
    with open(path) as f:
      text = f.read()
    assert 'python -m vit_jax.main --config=configs/' in text, name
    assert 'Expected result' in text, name
    assert 'PLACEHOLDER' not in text, name


# Each config of configs/ with its argument, and the classes of its dataset
# (the head's width; the dataset's info gives it to training).
BUILT_CONFIGS = [
    ('finetune', 'b16,cifar10', 10),
    ('imagenet21k', 's16', 21_843),
    ('imagenet1k', 'ti16', 1000),
    ('flowers', None, 5),  # tf_flowers
    ('embedded', None, 10),
    ('embedded', 'digits', 10),
    ('embedded_pretrain', None, 10),
    ('embedded_finetune', None, 10),
    ('embedded_mpp', None, 10),  # no class head: 3-bit mean colours
]


def test_every_config_is_built_below():
  names = {
      os.path.basename(p)[:-len('.py')]
      for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
  }
  assert names - {'__init__', 'common'} == {c for c, _, _ in BUILT_CONFIGS}


def _param_shapes(config, num_classes):
  """The parameters' shapes of the model training builds, at pp.crop."""
  model = train.create_model(config, num_classes)
  images = jnp.zeros((1, config.pp.crop, config.pp.crop, 3))
  return jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), images, train=False))['params']


def _blocks(encoder, num_layers):
  """Block i's parameters, from separate blocks or one scanned stack."""
  if 'encoderblock' in encoder:  # scan=True: a leading axis of layers
    stacked = encoder['encoderblock']
    assert {x.shape[0] for x in jax.tree.leaves(stacked)} == {num_layers}
    return [
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                     stacked)
    ] * num_layers
  names = [f'encoderblock_{i}' for i in range(num_layers)]
  assert {k for k in encoder if k.startswith('encoderblock')} == set(names)
  return [encoder[n] for n in names]


@pytest.mark.parametrize('module,arg,num_classes', BUILT_CONFIGS)
def test_every_config_builds_its_model(module, arg, num_classes):
  """Traces init (no computation) and checks the shapes the config states."""
  get_config = importlib.import_module(f'configs.{module}').get_config
  config = get_config() if arg is None else get_config(arg)
  assert isinstance(config.model, ml_collections.ConfigDict)
  params = _param_shapes(config, num_classes)
  m = config.model
  hidden, heads = m.hidden_size, m.transformer.num_heads
  patch = tuple(m.patches.size)
  assert 'resnet' not in m  # else the embedding's input is the ResNet's
  assert params['embedding']['kernel'].shape == (*patch, 3, hidden)
  for block in _blocks(params['Transformer'], m.transformer.num_layers):
    assert block['MlpBlock_0']['Dense_0']['kernel'].shape == (
        hidden, m.transformer.mlp_dim)
    assert block['MultiHeadDotProductAttention_0']['query']['kernel'].shape == (
        hidden, heads, hidden // heads)
  has_cls = m.classifier in ('token', 'token_unpooled')
  assert ('cls' in params) == has_cls
  if m.get('posemb', 'learn') == 'learn':
    grid = (config.pp.crop // patch[0]) * (config.pp.crop // patch[1])
    assert params['Transformer']['posembed_input']['pos_embedding'].shape == (
        1, grid + has_cls, hidden)
  else:
    assert 'posembed_input' not in params['Transformer']
  if config.get('objective') == 'mpp':
    colours = 2**(3 * config.mpp.color_bits)
    assert params['mpp_head']['kernel'].shape == (hidden, colours)
    assert 'head' not in params
    return
  width = m.representation_size or hidden
  assert ('pre_logits' in params) == bool(m.representation_size)
  assert params['head']['kernel'].shape == (width, num_classes)

"""BiT ResNet classifiers (Kolesnikov et al., https://arxiv.org/abs/1912.11370).

The paper's ResNet baselines (Sec. 4.2, Table 2): sizes, shapes, the
project registry, and training through the project's config path.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import finetune
from vit_jax import checkpoint
from vit_jax import models
from vit_jax import train
from vit_jax.configs import models as models_config
from vit_jax.configs import project_models
from vit_jax.configs import schema
from vit_jax.configs import vit
from vit_jax.parallel import runners
from vit_jax.run_config import validation
import zoo_sizes

BITS = sorted(
    n for n in project_models.PROJECT_MODEL_CONFIGS if n.startswith('BiT-'))


def expected_count(num_layers, width_factor, num_classes=1000):
  """Parameters of the hybrid-stem ResNet, GroupNorm, pool and head, by hand.

  Root conv 7x7x3 and GroupNorm; per unit 1x1, 3x3, 1x1 convs and three
  GroupNorms (scale and bias), a projection conv and GroupNorm where the
  channels or the stride change; the pre-head GroupNorm and the dense head.
  """
  width = int(64 * width_factor)
  count = 7 * 7 * 3 * width + 2 * width
  channels = width
  for stage, units in enumerate(num_layers):
    mid = width * 2**stage
    out = 4 * mid
    for unit in range(units):
      count += channels * mid + 9 * mid * mid + mid * out
      count += 2 * mid + 2 * mid + 2 * out
      if channels != out or (unit == 0 and stage > 0):
        count += channels * out + 2 * out
      channels = out
  return count + 2 * channels + channels * num_classes + num_classes


def test_the_paper_baselines_are_registered():
  assert BITS == [
      'BiT-R101x1', 'BiT-R101x3', 'BiT-R152x2', 'BiT-R152x4', 'BiT-R50x1',
      'BiT-R50x3', 'BiT-testing'
  ]
  layers = {
      n: tuple(c.resnet.num_layers)
      for n, c in models.MODEL_CONFIGS.items()
      if n.startswith('BiT-R')
  }
  for name, blocks in layers.items():
    depth = int(name[len('BiT-R'):].split('x')[0])
    assert blocks == project_models.BIT_DEPTHS[depth]
    # Three layers per bottleneck unit, plus the root conv and the head.
    assert 3 * sum(blocks) + 2 == depth
  assert not set(BITS) & set(models_config.MODEL_CONFIGS)


@pytest.mark.parametrize('name', BITS)
def test_parameter_count(name):
  assert name in zoo_sizes.PARAM_COUNTS
  count = zoo_sizes.count(zoo_sizes.param_shapes(name))
  assert count == zoo_sizes.PARAM_COUNTS[name]
  resnet = models.MODEL_CONFIGS[name].resnet
  assert count == expected_count(resnet.num_layers, resnet.width_factor)


def test_layout_and_names():
  params = zoo_sizes.param_shapes('BiT-R50x1')
  assert sorted(params) == [
      'block1', 'block2', 'block3', 'block4', 'conv_root', 'gn_pre_head',
      'gn_root', 'head'
  ]
  assert sorted(params['block3']) == [f'unit{i}' for i in range(1, 7)]
  assert params['conv_root']['kernel'].shape == (7, 7, 3, 64)
  assert params['block4']['unit3']['conv3']['kernel'].shape == (1, 1, 512, 2048)
  assert params['head']['kernel'].shape == (2048, 1000)
  wide = zoo_sizes.param_shapes('BiT-R152x4')
  assert wide['head']['kernel'].shape == (8192, 1000)
  assert len(wide['block3']) == 36


def test_init_and_apply_shapes():
  model = models.get_model('BiT-testing', num_classes=7)
  headless = models.get_model('BiT-testing')
  assert isinstance(model, models.BitResNet)
  images = np.linspace(
      -1, 1, 2 * 40 * 48 * 3, dtype=np.float32).reshape(2, 40, 48, 3)
  # Random parameters of init's shapes (compiling the ResNet's initializers
  # cost more than its forward pass); the zero-initialised head is checked
  # by test_trains_through_the_config_path (first loss log(10)).
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32),
      jax.eval_shape(lambda: model.init(
          jax.random.PRNGKey(0), images, train=False))['params'])

  @jax.jit
  def run(params):
    return (model.apply({'params': params}, images, train=False),
            headless.apply({'params': params}, images, train=False))

  logits, features = run(params)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits)) and np.any(logits)
  assert features.shape == (2, 256)  # 4 * 64 * 2 * 0.5: stage 2's output
  assert float(features.min()) >= 0.  # after the pre-head ReLU


def test_model_class_picks_by_fields():
  pick = lambda name: models.model_class(models.MODEL_CONFIGS[name])
  assert pick('BiT-R50x1') is models.BitResNet
  assert pick('R50+ViT-B_16') is models.VisionTransformer
  assert pick('Mixer-B_16') is models.MlpMixer
  assert models.canonical_name('bit-r50x1') == 'BiT-R50x1'


def test_fine_tuning_keeps_the_backbone_and_makes_a_fresh_head():
  """A BiT trained here (1000 classes) adapted to 5 classes."""
  rng = np.random.default_rng(0)
  trained = jax.tree.map(
      lambda x: rng.standard_normal(x.shape).astype(np.float32),
      zoo_sizes.param_shapes('BiT-testing'))
  adapted = checkpoint.load_pretrained(
      pretrained_path=trained,
      init_params=zoo_sizes.param_shapes('BiT-testing', num_classes=5),
      model_config=models.MODEL_CONFIGS['BiT-testing'])
  np.testing.assert_array_equal(adapted['head']['kernel'], np.zeros((256, 5)))
  np.testing.assert_array_equal(adapted['head']['bias'], np.zeros(5))
  del adapted['head'], trained['head']
  jax.tree.map(np.testing.assert_array_equal, adapted, trained)


def training_config():
  config = schema.get_config()
  config.model_name = 'BiT-testing'
  config.model = schema.zoo_model('BiT-testing')
  config.pp.crop = 32
  config.batch = 4
  config.accum_steps = 1
  return config


def test_trains_through_the_config_path():
  """create_model builds it; three steps of make_update_fn lower the loss."""
  config = training_config()
  validation.check_config(config, device_count=1)
  model = train.create_model(config, num_classes=10)
  assert isinstance(model, models.BitResNet) and model.num_classes == 10
  params = train.init_params(model, config, load_pretrained=False)
  tx = optax.sgd(0.1)
  update_fn = train.make_update_fn(apply_fn=model.apply, accum_steps=1, tx=tx)
  rng = np.random.default_rng(0)
  batch = {
      'image': rng.uniform(-1, 1, (1, 4, 32, 32, 3)).astype(np.float32),
      'label': np.eye(10, dtype=np.float32)[None, [0, 3, 5, 3]]
  }
  # Laid out as update_fn's outputs (one device, the pmap axis), so that the
  # steps after the first reuse its compiled program.
  state = jax.tree.map(lambda x: jnp.asarray(x)[None],
                       (params, tx.init(params), jax.random.PRNGKey(0)))
  p, opt_state, key = jax.pmap(lambda *a: a, axis_name=runners.AXIS)(*state)
  losses = []
  for _ in range(3):
    p, opt_state, loss, key = update_fn(p, opt_state, batch, key)
    losses.append(float(loss[0]))
  # A zero head gives uniform logits: the first loss is log(10).
  assert losses[0] == pytest.approx(math.log(10), abs=1e-5)
  assert all(np.isfinite(losses)) and losses[2] < losses[1] < losses[0]


def test_configs_by_name():
  """The project's fine-tuning config builds a BiT; from scratch it is valid
  at any crop (global average pooling, no patch grid)."""
  config = finetune.get_config('bit_r50x1,cifar10')
  assert config.model.to_dict() == {
      'model_name': 'BiT-R50x1',
      'resnet': {
          'num_layers': (3, 4, 6, 3),
          'width_factor': 1
      },
      'dtype': 'float32'
  }
  assert vit.get_config('bit_r50x1,cifar10').model.model_name == 'BiT-R50x1'
  config.pretrained_dir = ''
  config.pp.crop = 100
  assert validation.pretrained_path(config) is None
  validation.check_config(config, device_count=1)
  pretrain = schema.pretrain_config('BiT-R101x3')
  assert 'representation_size' not in pretrain.model

"""Hugging Face interop (convert_hf) against transformers' own ViT, offline.

HF models are built locally with random weights and saved with
`save_pretrained`; nothing is downloaded (HF_HUB_OFFLINE=1).
"""

import json
import os
import shutil

os.environ['HF_HUB_OFFLINE'] = '1'  # Before transformers / huggingface_hub.

import jax  # pylint: disable=g-import-not-at-top
import ml_collections
import numpy as np
import pytest

import timm_support

torch = timm_support.Lazy(lambda: pytest.importorskip('torch'))
transformers = timm_support.Lazy(timm_support.import_transformers)

from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
from vit_jax import models
from vit_jax.checkpoints import layouts
from vit_jax.interop import convert_hf
from vit_jax.interop import export_hf

ATOL = 1e-4
SIZE = 32  # image side; patch 8 -> 4x4 grid.
NUM_CLASSES = 5
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def hf_config(**kw):
  return transformers.ViTConfig(
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=2,
      intermediate_size=64,
      image_size=SIZE,
      patch_size=8,
      **kw)


def randomize_(module, seed):
  """Every weight moved off its init, so that no mapping error hides behind a
  zero bias or a unit LayerNorm scale."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.2 * torch.randn(p.shape, generator=gen))
  return module.eval()


def images(n=2, seed=0):
  """NHWC in [-1, 1], our input convention."""
  return np.random.RandomState(seed).uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(
      np.float32)


def nchw(x_NHWC):
  return torch.from_numpy(np.ascontiguousarray(x_NHWC.transpose(0, 3, 1, 2)))


def apply(model_config, params, x, **kw):
  return np.asarray(
      models.VisionTransformer(**model_config).apply({'params': params},
                                                     x,
                                                     train=False,
                                                     **kw))


def encoder_output(model_config, params, x):
  """All tokens after encoder_norm (HF's last_hidden_state)."""
  _, state = models.VisionTransformer(**model_config).apply(
      {'params': params},
      x,
      train=False,
      capture_intermediates=lambda m, _: m.name == 'Transformer',
      mutable=['intermediates'])
  return np.asarray(state['intermediates']['Transformer']['__call__'][0])


def random_params(model_config, seed):
  """Random parameters of our model: every leaf random (LayerNorm scales
  around 1), so that no mapping error hides behind a zero or unit init. Drawn
  with numpy on `eval_shape`'s tree: running flax's init op by op costs
  seconds."""
  model = models.VisionTransformer(**model_config)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), images(1), train=False))['params']
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    noise = 0.2 * rng.standard_normal(leaf.shape).astype(np.float32)
    return noise + (path[-1].key == 'scale')

  return jax.tree_util.tree_map_with_path(draw, shapes)


def our_config(num_classes=NUM_CLASSES, representation_size=None, **numerics):
  return ml_collections.ConfigDict(
      dict(
          num_classes=num_classes,
          patches=ml_collections.ConfigDict({'size': (8, 8)}),
          hidden_size=32,
          transformer=ml_collections.ConfigDict(
              dict(
                  num_layers=2,
                  num_heads=2,
                  mlp_dim=64,
                  dropout_rate=0.,
                  attention_dropout_rate=0.)),
          representation_size=representation_size,
          classifier='token',
          **numerics))


def assert_clean_load(info):
  for kind in ('missing_keys', 'unexpected_keys', 'mismatched_keys'):
    assert not info.get(kind), (kind, info[kind])


@pytest.fixture(scope='module')
def hf_classifier(tmp_path_factory):
  torch.manual_seed(0)
  model = randomize_(
      transformers.ViTForImageClassification(hf_config(num_labels=NUM_CLASSES)),
      seed=1)
  path = str(tmp_path_factory.mktemp('hf') / 'classifier')
  model.save_pretrained(path)
  return path, model


@pytest.fixture(scope='module')
def hf_base(tmp_path_factory):
  torch.manual_seed(0)
  # A pooler narrower than the width: representation_size != hidden_size.
  model = randomize_(
      transformers.ViTModel(hf_config(pooler_output_size=24)), seed=2)
  path = str(tmp_path_factory.mktemp('hf') / 'base')
  model.save_pretrained(path)
  return path, model


# ----------------------------------------------------------------------------
# HF -> ours.


def test_load_classifier_matches_hf_logits(hf_classifier):
  path, hf_model = hf_classifier
  params, config = convert_hf.load_hf(path)
  assert config.num_classes == NUM_CLASSES
  assert config.representation_size is None
  assert config.classifier == 'token'
  assert tuple(config.patches.size) == (8, 8)
  assert (config.hidden_size, config.transformer.num_layers,
          config.transformer.num_heads, config.transformer.mlp_dim) == (32, 2,
                                                                        2, 64)
  assert config.layernorm_epsilon == 1e-12
  assert config.approximate_gelu is False
  x = images()
  with torch.no_grad():
    expected = hf_model(nchw(x)).logits.numpy()
  np.testing.assert_allclose(
      apply(config, params, x), expected, rtol=0, atol=ATOL)
  # The numerics fields are what makes it match: with our tanh GELU the
  # logits miss the tolerance (by 3.4e-4 on this model).
  config.approximate_gelu = True
  assert np.abs(apply(config, params, x) - expected).max() > 2 * ATOL


def test_load_vitmodel_pooler_and_hidden_states_match_hf(hf_base):
  path, hf_model = hf_base
  params, config = convert_hf.load_hf(path)
  assert config.num_classes is None
  assert config.representation_size == 24
  x = images(seed=1)
  with torch.no_grad():
    out = hf_model(nchw(x))
  np.testing.assert_allclose(
      apply(config, params, x), out.pooler_output.numpy(), rtol=0, atol=ATOL)
  np.testing.assert_allclose(
      encoder_output(config, params, x),
      out.last_hidden_state.numpy(),
      rtol=0,
      atol=ATOL)


def test_load_pytorch_model_bin_and_in_memory_names(hf_classifier, tmp_path):
  """A `torch.save(model.state_dict())` file: transformers 5 names its modules
  differently from its files (q_proj vs attention.attention.query)."""
  path, hf_model = hf_classifier
  shutil.copy(os.path.join(path, 'config.json'), tmp_path)
  torch.save(hf_model.state_dict(), tmp_path / 'pytorch_model.bin')
  expected, _ = convert_hf.load_hf(path)
  params, _ = convert_hf.load_hf(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_load_sharded_safetensors(hf_classifier, tmp_path):
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  path, _ = hf_classifier
  weights = safetensors_numpy.load_file(os.path.join(path, 'model.safetensors'))
  names = sorted(weights)
  shards = {
      'model-00001-of-00002.safetensors': names[:10],
      'model-00002-of-00002.safetensors': names[10:]
  }
  weight_map = {}
  for shard, shard_names in shards.items():
    safetensors_numpy.save_file({n: weights[n] for n in shard_names},
                                tmp_path / shard,
                                metadata={'format': 'pt'})
    weight_map.update({n: shard for n in shard_names})
  (tmp_path / 'model.safetensors.index.json').write_text(
      json.dumps({'weight_map': weight_map}))
  shutil.copy(os.path.join(path, 'config.json'), tmp_path)
  expected, _ = convert_hf.load_hf(path)
  params, _ = convert_hf.load_hf(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_load_labels(hf_classifier, hf_base):
  assert convert_hf.load_hf_labels(hf_classifier[0]) == {
      i: f'LABEL_{i}' for i in range(NUM_CLASSES)
  }
  assert convert_hf.load_hf_labels(hf_base[0]) is None


def test_load_without_qkv_bias(tmp_path):
  torch.manual_seed(0)
  hf_model = randomize_(
      transformers.ViTForImageClassification(
          hf_config(num_labels=3, qkv_bias=False)),
      seed=5)
  hf_model.save_pretrained(tmp_path)
  params, config = convert_hf.load_hf(tmp_path)
  query = params['Transformer']['encoderblock_0'][
      'MultiHeadDotProductAttention_0']['query']
  np.testing.assert_array_equal(query['bias'], np.zeros((2, 16)))
  x = images(seed=5)
  with torch.no_grad():
    expected = hf_model(nchw(x)).logits.numpy()
  np.testing.assert_allclose(
      apply(config, params, x), expected, rtol=0, atol=ATOL)


def test_imagenet_normalised_checkpoint_is_folded_to_minus1_1(
    hf_classifier, tmp_path):
  """A ViT trained on ImageNet mean/std inputs takes our [-1, 1] images."""
  path, hf_model = hf_classifier
  shutil.copytree(path, tmp_path, dirs_exist_ok=True)
  (tmp_path / 'preprocessor_config.json').write_text(
      json.dumps({
          'image_processor_type': 'ViTImageProcessor',
          'do_rescale': True,
          'rescale_factor': 1 / 255,
          'do_normalize': True,
          'image_mean': IMAGENET_MEAN.tolist(),
          'image_std': IMAGENET_STD.tolist()
      }))
  x = images(seed=2)
  pixels = (x + 1) * 127.5  # [0, 255]
  hf_inputs = ((pixels / 255 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
  with torch.no_grad():
    expected = hf_model(nchw(hf_inputs)).logits.numpy()

  params, config = convert_hf.load_hf(tmp_path)
  np.testing.assert_allclose(
      apply(config, params, x), expected, rtol=0, atol=ATOL)
  raw, _ = convert_hf.load_hf(tmp_path, fold_normalization=False)
  np.testing.assert_allclose(
      apply(config, raw, hf_inputs), expected, rtol=0, atol=ATOL)
  # With the 0.5/0.5 processor of google/vit-* nothing is folded.
  plain, _ = convert_hf.load_hf(path)
  jax.tree.map(np.testing.assert_array_equal, raw, plain)


# ----------------------------------------------------------------------------
# Ours -> HF.


@pytest.mark.parametrize(
    'numerics',
    [
        # ours: tanh GELU, eps 1e-6 -> gelu_pytorch_tanh, layer_norm_eps 1e-6
        {},
        {
            'approximate_gelu': False,
            'layernorm_epsilon': 1e-12
        },  # HF's
    ],
    ids=['our_numerics', 'hf_numerics'])
def test_export_classifier_loads_in_hf_with_our_logits(tmp_path, numerics):
  config = our_config(**numerics)
  params = random_params(config, seed=3)
  labels = ['cat', 'dog', 'bird', 'fish', 'frog']
  export_hf.save_hf(params, config, tmp_path, id2label=labels)

  hf_model, info = transformers.ViTForImageClassification.from_pretrained(
      tmp_path, output_loading_info=True)
  assert_clean_load(info)
  assert hf_model.config.id2label == dict(enumerate(labels))
  x = images(seed=3)
  with torch.no_grad():
    hf_logits = hf_model.eval()(nchw(x)).logits.numpy()
  ours = apply(config, params, x)
  assert np.abs(ours).max() > 0.1  # the head is not the zero init
  np.testing.assert_allclose(hf_logits, ours, rtol=0, atol=ATOL)

  # And back: the same arrays and fields.
  loaded, loaded_config = convert_hf.load_hf(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, loaded,
               jax.tree.map(np.asarray, params))
  assert loaded_config.approximate_gelu == numerics.get('approximate_gelu',
                                                        True)
  assert loaded_config.layernorm_epsilon == numerics.get(
      'layernorm_epsilon', 1e-6)
  assert convert_hf.load_hf_labels(tmp_path) == dict(enumerate(labels))


@pytest.mark.parametrize('representation_size', [16, None])
def test_export_backbone_as_vitmodel(tmp_path, representation_size):
  config = our_config(num_classes=None, representation_size=representation_size)
  params = random_params(config, seed=4)
  export_hf.save_hf(params, config, tmp_path)
  assert json.loads(
      (tmp_path / 'config.json').read_text())['architectures'] == ['ViTModel']
  # Without pre_logits there is no pooler to load: HF must not build one.
  kw = {} if representation_size else {'add_pooling_layer': False}
  hf_model, info = transformers.ViTModel.from_pretrained(
      tmp_path, output_loading_info=True, **kw)
  assert_clean_load(info)
  x = images(seed=4)
  with torch.no_grad():
    out = hf_model.eval()(nchw(x))
  if representation_size:
    np.testing.assert_allclose(
        out.pooler_output.numpy(), apply(config, params, x), rtol=0, atol=ATOL)
  np.testing.assert_allclose(
      out.last_hidden_state.numpy(),
      encoder_output(config, params, x),
      rtol=0,
      atol=ATOL)


def test_export_scanned_params_equals_per_layer(tmp_path):
  config = our_config()
  params = random_params(config, seed=5)
  export_hf.save_hf(params, config, tmp_path / 'layers')
  export_hf.save_hf(
      layouts.layers_to_scan(params, 2), config, tmp_path / 'scan')
  a, _ = convert_hf.load_hf(tmp_path / 'layers')
  b, _ = convert_hf.load_hf(tmp_path / 'scan')
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_exported_image_processor_is_our_minus1_1_scaling(tmp_path):
  config = our_config()
  export_hf.save_hf(random_params(config, seed=6), config, tmp_path)
  processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
  pixels = np.random.RandomState(0).randint(
      0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
  out = processor(pixels, return_tensors='np')['pixel_values'][0]
  np.testing.assert_allclose(
      out.transpose(1, 2, 0), (pixels - 127.5) / 127.5, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------
# Bad input.


def write_config(path, **changes):
  config = json.loads((path / 'config.json').read_text())
  config.update(changes)
  (path / 'config.json').write_text(json.dumps(config))


def test_error_not_a_directory(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match='not a directory'):
    convert_hf.load_hf(tmp_path / 'nowhere')


def test_error_no_config(hf_classifier, tmp_path):
  path, _ = hf_classifier
  shutil.copy(os.path.join(path, 'model.safetensors'), tmp_path)
  with pytest.raises(
      checkpoint.CheckpointError,
      match=r'has no config\.json.*save_pretrained'):
    convert_hf.load_hf(tmp_path)


def test_error_no_weights(hf_classifier, tmp_path):
  path, _ = hf_classifier
  shutil.copy(os.path.join(path, 'config.json'), tmp_path)
  with pytest.raises(
      checkpoint.CheckpointError,
      match=r'no weights: expected model\.safetensors'):
    convert_hf.load_hf(tmp_path)


@pytest.mark.parametrize('changes,message', [
    ({
        'model_type': 'bert'
    }, r"model_type='bert'; only 'vit'"),
    ({
        'model_type': 'deit'
    }, 'distillation token'),
    ({
        'architectures': ['ViTForMaskedImageModeling']
    }, 'is a ViTForMaskedImageModeling'),
    ({
        'num_hidden_layers': 3
    }, 'num_hidden_layers=3 but the weights hold 2'),
    ({
        'intermediate_size': 48
    }, r'intermediate_size=48.*Fix config\.json'),
    ({
        'hidden_act': 'relu'
    }, "hidden_act='relu' is not a GELU"),
])
def test_error_bad_config(hf_classifier, tmp_path, changes, message):
  path, _ = hf_classifier
  shutil.copytree(path, tmp_path, dirs_exist_ok=True)
  write_config(tmp_path, **changes)
  with pytest.raises(checkpoint.CheckpointError, match=message):
    convert_hf.load_hf(tmp_path)


def test_error_missing_and_unexpected_weights(hf_classifier, tmp_path):
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  path, _ = hf_classifier
  shutil.copy(os.path.join(path, 'config.json'), tmp_path)
  weights = safetensors_numpy.load_file(os.path.join(path, 'model.safetensors'))
  del weights['vit.encoder.layer.1.output.dense.weight']
  weights['vit.decoder.weight'] = np.zeros(3, np.float32)
  safetensors_numpy.save_file(
      weights, tmp_path / 'model.safetensors', metadata={'format': 'pt'})
  with pytest.raises(checkpoint.CheckpointError) as e:
    convert_hf.load_hf(tmp_path)
  assert 'missing: encoder.layer.1.output.dense.weight' in str(e.value)
  assert 'unexpected: decoder.weight' in str(e.value)


@pytest.mark.parametrize('changes,kw,message', [
    ({
        'classifier': 'gap'
    }, {}, "classifier='gap'"),
    ({
        'representation_size': 16
    }, {}, 'pre_logits layer'),
    ({
        'posemb': 'sincos2d'
    }, {}, "posemb='sincos2d'"),
    ({}, {
        'id2label': ['a', 'b']
    }, r'id2label must name classes 0\.\.4'),
    ({}, {
        'image_size': 24
    }, 'does not give the 16 patch tokens'),
])
def test_save_errors(tmp_path, changes, kw, message):
  params = random_params(our_config(), seed=7)
  config = our_config()
  config.update(changes)
  with pytest.raises(ValueError, match=message):
    export_hf.save_hf(params, config, tmp_path, **kw)
  assert not (tmp_path / 'config.json').exists()

"""timm ViT state dicts in and out, against real timm (random weights).

Each model is built by `timm.create_model` at a small depth or image size,
its weights perturbed, its logits on the same [-1, 1] images compared with
ours after `checkpoint.load` of its `state_dict` file, and timm's logits
after `load_state_dict(strict=True)` of our export with ours, at 1e-5.
"""

import importlib
import os
import subprocess

import jax
import numpy as np
import pytest

import preloaded
import timm_support
from vit_jax import checkpoint
from vit_jax import models
from vit_jax.checkpoints import timm_layout
from vit_jax.checkpoints import trees
from vit_jax.interop import checkpoint_cli
from vit_jax.interop import export_timm

timm = timm_support.Lazy(timm_support.import_timm)
torch = timm_support.Lazy(lambda: importlib.import_module('torch'))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32  # images of 2x2 patches
# name, create_model kwargs: ViT-Ti/16 at depth 2 (the block order), ViT-B/16
# and its GAP variant at one block, layer scale without q/k/v bias (ViT-M GAP).
MODELS = {
    'ti16': ('vit_tiny_patch16_224', dict(depth=2, img_size=SIZE)),
    'b16': ('vit_base_patch16_224', dict(depth=1, img_size=SIZE)),
    'gap': ('vit_base_patch16_gap_224', dict(depth=1, img_size=SIZE)),
    'layer_scale': ('vit_medium_patch16_gap_240',
                    dict(depth=1, img_size=SIZE, init_values=0.3)),
}
IMAGES = np.random.RandomState(0).uniform(-1, 1,
                                          (2, SIZE, SIZE, 3)).astype(np.float32)


def _timm_logits(model, images=IMAGES):
  with torch.no_grad():
    return model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


def _timm_model(name, kwargs, num_classes=5, seed=0):
  torch.manual_seed(seed)
  model = timm.create_model(name, num_classes=num_classes, **kwargs).eval()
  with torch.no_grad():  # head and biases start at zero in timm
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


def _timm_from(exported, state_dict):
  """`timm.create_model` of an export, its `state_dict` loaded strictly."""
  with torch.device('meta'):  # no initialisation: every weight is loaded
    model = timm.create_model(exported.name, **exported.kwargs)
  model.load_state_dict(state_dict, strict=True, assign=True)
  return model.eval()


_APPLY = {}


def _ours(model_config, params, images=IMAGES):
  """Our logits, one compilation per model config."""
  key = str(model_config)
  if key not in _APPLY:
    model = models.VisionTransformer(**model_config)
    _APPLY[key] = jax.jit(
        lambda p, x: model.apply({'params': p}, x, train=False))
  return np.asarray(_APPLY[key](params, images))


@pytest.fixture(scope='module')
def timm_models():
  """{key: the perturbed timm model of MODELS[key]}, built on first use."""
  cache = {}

  def get(key):
    if key not in cache:
      cache[key] = _timm_model(*MODELS[key])
    return cache[key]

  return get


@pytest.mark.parametrize('key', sorted(MODELS))
def test_timm_state_dict_in_and_out(key, timm_models, tmp_path):
  name, kwargs = MODELS[key]
  model = timm_models(key)
  expected = _timm_logits(model)
  path = str(tmp_path / 'model.pth')
  torch.save(model.state_dict(), path)

  params, model_config, timm_model = timm_layout.read(path)
  assert timm_model == timm_layout.TimmModel(
      name,
      dict(
          num_classes=5,
          **{
              k: v for k, v in kwargs.items() if k != 'init_values'
          }))
  loaded = checkpoint.load(path)  # the same tree, through the public API
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
  ours = _ours(model_config, loaded)
  np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)

  out = str(tmp_path / 'export.safetensors')
  exported = export_timm.save_timm(params, out)
  from safetensors import torch as safetensors_torch  # pylint: disable=g-import-not-at-top
  back = _timm_from(exported, safetensors_torch.load_file(out))
  np.testing.assert_allclose(_timm_logits(back), ours, atol=1e-5, rtol=0)


def test_pth_export_and_safetensors_input(timm_models, tmp_path):
  model = timm_models('ti16')
  from safetensors import torch as safetensors_torch  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'model.safetensors')
  safetensors_torch.save_file(model.state_dict(), path)
  params = checkpoint.load(path)
  out = str(tmp_path / 'export.pth')
  exported = export_timm.save_timm(params, out)
  back = _timm_from(exported, torch.load(out, weights_only=True))
  np.testing.assert_allclose(
      _timm_logits(back), _timm_logits(model), atol=1e-5, rtol=0)


def _legacy_state_dict(model, representation=24, classes=7):
  """The layout of timm's `jx_vit_*_in21k` files: `pre_logits.fc`."""
  state = {
      k: v for k, v in model.state_dict().items() if not k.startswith('head.')
  }
  rng = torch.Generator().manual_seed(3)
  state['pre_logits.fc.weight'] = torch.randn(
      representation, 192, generator=rng) * 0.1
  state['pre_logits.fc.bias'] = torch.randn(representation, generator=rng)
  state['head.weight'] = torch.randn(classes, representation, generator=rng)
  state['head.bias'] = torch.randn(classes, generator=rng)
  return state


def test_pre_logits_layout_matches_tanh_of_fc_and_the_released_npz(
    timm_models, tmp_path):
  model = timm_models('ti16')
  state = _legacy_state_dict(model)
  path = str(tmp_path / 'jx_vit_tiny_in21k.pth')
  torch.save(state, path)
  params, model_config, _ = timm_layout.read(path)
  assert model_config.representation_size == 24
  # pre_logits output = tanh(fc(norm(x)[:, 0])), x from timm's blocks.
  with torch.no_grad():
    tokens = model.forward_features(
        torch.from_numpy(IMAGES).permute(0, 3, 1, 2))[:, 0]
    fc = state['pre_logits.fc.weight'], state['pre_logits.fc.bias']
    pre_logits = torch.tanh(tokens @ fc[0].T + fc[1])
    logits = (pre_logits @ state['head.weight'].T + state['head.bias'])
  features_config = dict(model_config, num_classes=None)
  np.testing.assert_allclose(
      _ours(features_config, params), pre_logits.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(
      _ours(model_config, params), logits.numpy(), atol=1e-5, rtol=0)
  # The same weights as a released .npz give the same logits.
  npz = str(tmp_path / 'released.npz')
  checkpoint.save(params, npz)
  np.testing.assert_allclose(
      _ours(model_config, checkpoint.load(npz)),
      logits.numpy(),
      atol=1e-5,
      rtol=0)
  with pytest.raises(checkpoint.CheckpointError, match='pre_logits'):
    export_timm.save_timm(params, str(tmp_path / 'x.safetensors'))
  assert not os.path.exists(tmp_path / 'x.safetensors')


def _source(fn):
  import inspect  # pylint: disable=g-import-not-at-top
  return inspect.getsource(fn).replace(' ', '')


def test_timm_models_table_matches_timm():
  for name, (width, depth, heads, mlp, patch, image, gap, qkv_bias,
             layer_scale) in timm_layout.TIMM_MODELS.items():
    with torch.device('meta'):  # one block: the depth is in the name's args
      model = timm.create_model(name, depth=1)
      depth_of_name = timm.models.vision_transformer.__dict__[name]
    block = model.blocks[0]
    state = model.state_dict()
    assert f'depth={depth}' in _source(depth_of_name), name
    assert (model.embed_dim, block.attn.num_heads, block.mlp.fc1.out_features,
            model.patch_embed.patch_size[0], model.patch_embed.img_size[0],
            model.global_pool == 'avg', 'blocks.0.attn.qkv.bias' in state,
            'blocks.0.ls1.gamma' in state) == (width, heads, mlp, patch, image,
                                               gap, qkv_bias, layer_scale), name


@pytest.mark.parametrize('name, kwargs, match', [
    ('vit_base_r50_s16_224', dict(img_size=64, num_classes=2,
                                  depth=1), 'hybrid'),
    ('vit_tiny_patch16_224', dict(global_pool='avg', depth=1,
                                  img_size=32), 'fc_norm'),
    ('vit_tiny_patch16_224', dict(reg_tokens=2, depth=1,
                                  img_size=32), 'register'),
])
def test_other_timm_models_get_one_paragraph(name, kwargs, match, tmp_path):
  with torch.device('meta'):
    model = timm.create_model(name, **kwargs)
  path = str(tmp_path / 'other.safetensors')
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  safetensors_numpy.save_file(
      {k: np.zeros((1,), np.float32) for k in model.state_dict()}, path)
  with pytest.raises(checkpoint.CheckpointError, match=match) as e:
    checkpoint.load(path)
  assert 'other.safetensors' in str(e.value)


def test_torch_files_that_are_no_timm_vit(tmp_path):
  path = str(tmp_path / 'resnet.pth')
  torch.save({'conv1.weight': torch.zeros(2, 3, 3, 3)}, path)
  with pytest.raises(checkpoint.CheckpointError, match='not a timm'):
    checkpoint.load(path)
  path = str(tmp_path / 'tensor.pth')
  torch.save(torch.zeros(3), path)
  with pytest.raises(checkpoint.CheckpointError, match='state dict'):
    checkpoint.load(path)


def test_command_lines_inspect_and_export(timm_models, tmp_path, capsys):
  path = str(tmp_path / 'model.pth')
  torch.save(timm_models('ti16').state_dict(), path)
  assert checkpoint_cli.main(['inspect', path]) == 0
  out = capsys.readouterr().out
  assert ("layout: timm state dict of timm.create_model("
          "'vit_tiny_patch16_224', num_classes=5, depth=2, img_size=32)" in out)
  assert 'zoo_name: none' in out and 'hidden_size: 192' in out
  npz = str(tmp_path / 'model.npz')
  checkpoint.save(checkpoint.load(path), npz)
  env = dict(os.environ, PYTHONPATH=REPO)
  result = subprocess.run(
      preloaded.command(env, '-m', 'vit_jax.interop.export_timm', npz,
                        str(tmp_path / 'out.safetensors')),
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
      env=env)
  assert result.returncode == 0, result.stderr
  assert ("model = timm.create_model('vit_tiny_patch16_224', num_classes=5, "
          "depth=2, img_size=32)") in result.stdout
  back = trees.flatten_tree(checkpoint.load(str(tmp_path / 'out.safetensors')))
  for key, value in trees.flatten_tree(checkpoint.load(npz)).items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)

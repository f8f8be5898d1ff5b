"""torchvision interop (convert_torchvision), offline.

torchvision itself is often not installable next to a CPU-only torch, so the
reference is `TorchvisionViT` below: an independent forward pass built from
`torch.nn` modules under torchvision's exact module names (its
`models/vision_transformer.py`): `conv_proj`, `class_token`,
`encoder.pos_embedding`, `encoder.layers.encoder_layer_{i}.{ln_1,
self_attention, ln_2, mlp}`, `encoder.ln`, `heads.{pre_logits, head}`;
LayerNorm eps 1e-6 and exact GELU. When torchvision imports, the last test
checks the reference against it.
"""

import collections

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import pytest

import timm_support

torch = pytest.importorskip('torch')

from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
from vit_jax import models
from vit_jax.checkpoints import trees
from vit_jax.interop import convert_torchvision

nn = torch.nn
ATOL = 1e-4
SIZE = 32
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class EncoderBlock(nn.Module):

  def __init__(self, hidden, num_heads, mlp_dim):
    super().__init__()
    self.ln_1 = nn.LayerNorm(hidden, eps=1e-6)
    self.self_attention = nn.MultiheadAttention(
        hidden, num_heads, batch_first=True)
    self.ln_2 = nn.LayerNorm(hidden, eps=1e-6)
    # torchvision's MLPBlock is an MLP: Linear, GELU, Dropout, Linear, Dropout.
    self.mlp = nn.Sequential(
        nn.Linear(hidden, mlp_dim), nn.GELU(), nn.Dropout(0.),
        nn.Linear(mlp_dim, hidden), nn.Dropout(0.))

  def forward(self, inputs):
    x = self.ln_1(inputs)
    x, _ = self.self_attention(x, x, x, need_weights=False)
    x = x + inputs
    return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):

  def __init__(self, num_tokens, num_layers, hidden, num_heads, mlp_dim):
    super().__init__()
    self.pos_embedding = nn.Parameter(torch.zeros(1, num_tokens, hidden))
    self.layers = nn.Sequential(
        collections.OrderedDict(
            (f'encoder_layer_{i}', EncoderBlock(hidden, num_heads, mlp_dim))
            for i in range(num_layers)))
    self.ln = nn.LayerNorm(hidden, eps=1e-6)

  def forward(self, x):
    return self.ln(self.layers(x + self.pos_embedding))


class TorchvisionViT(nn.Module):
  """torchvision.models.VisionTransformer's forward and state dict names."""

  def __init__(self,
               *,
               image_size=SIZE,
               patch_size=8,
               num_layers=2,
               num_heads=2,
               hidden=32,
               mlp_dim=64,
               num_classes=5,
               representation_size=None):
    super().__init__()
    self.hidden = hidden
    self.conv_proj = nn.Conv2d(3, hidden, patch_size, stride=patch_size)
    self.class_token = nn.Parameter(torch.zeros(1, 1, hidden))
    grid = image_size // patch_size
    self.encoder = Encoder(grid * grid + 1, num_layers, hidden, num_heads,
                           mlp_dim)
    heads = collections.OrderedDict()
    if representation_size is None:
      heads['head'] = nn.Linear(hidden, num_classes)
    else:
      heads['pre_logits'] = nn.Linear(hidden, representation_size)
      heads['act'] = nn.Tanh()
      heads['head'] = nn.Linear(representation_size, num_classes)
    self.heads = nn.Sequential(heads)

  def forward(self, x_NCHW):
    x = self.conv_proj(x_NCHW)
    n = x.shape[0]
    x = x.reshape(n, self.hidden, -1).permute(0, 2, 1)
    x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
    return self.heads(self.encoder(x)[:, 0])


# torchvision's vit_b_16 names of one encoder layer and the rest (read off
# torchvision/models/vision_transformer.py).
VIT_B_16_LAYER_KEYS = [
    'ln_1.weight', 'ln_1.bias', 'self_attention.in_proj_weight',
    'self_attention.in_proj_bias', 'self_attention.out_proj.weight',
    'self_attention.out_proj.bias', 'ln_2.weight', 'ln_2.bias', 'mlp.0.weight',
    'mlp.0.bias', 'mlp.3.weight', 'mlp.3.bias'
]
VIT_B_16_OTHER_KEYS = [
    'class_token', 'conv_proj.weight', 'conv_proj.bias',
    'encoder.pos_embedding', 'encoder.ln.weight', 'encoder.ln.bias',
    'heads.head.weight', 'heads.head.bias'
]


def reference(seed=0, **kw):
  torch.manual_seed(seed)
  model = TorchvisionViT(**kw)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():  # Off the init: zero class token, unit LN scales...
    for p in model.parameters():
      p.add_(0.2 * torch.randn(p.shape, generator=gen))
  return model.eval()


def images(n=2, seed=0, size=SIZE):
  return np.random.RandomState(seed).uniform(-1, 1, (n, size, size, 3)).astype(
      np.float32)


def torch_logits(model, x_NHWC):
  """torchvision's inputs: [0, 1] pixels normalised with ImageNet mean/std."""
  x = ((x_NHWC + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD
  with torch.no_grad():
    return model(
        torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1,
                                                          2)))).numpy()


def apply(model_config, params, x):
  return np.asarray(
      models.VisionTransformer(**model_config).apply({'params': params},
                                                     x,
                                                     train=False))


def test_reference_has_torchvision_vit_b_16_names():
  keys = list(reference().state_dict())
  expected = list(VIT_B_16_OTHER_KEYS)
  for i in range(2):
    expected += [
        f'encoder.layers.encoder_layer_{i}.{k}' for k in VIT_B_16_LAYER_KEYS
    ]
  assert sorted(keys) == sorted(expected)


def test_load_matches_torchvision_logits_on_minus1_1_images():
  model = reference()
  params, config = convert_torchvision.load_torchvision(
      model.state_dict(), num_heads=2)
  assert config.num_classes == 5
  assert config.representation_size is None
  assert tuple(config.patches.size) == (8, 8)
  assert (config.hidden_size, config.transformer.num_layers,
          config.transformer.mlp_dim, config.transformer.num_heads) == (32, 2,
                                                                        64, 2)
  assert config.approximate_gelu is False
  assert config.layernorm_epsilon == 1e-6
  x = images()
  expected = torch_logits(model, x)
  np.testing.assert_allclose(
      apply(config, params, x), expected, rtol=0, atol=ATOL)
  # Exact GELU matters: with ours (tanh) the logits miss the tolerance.
  config.approximate_gelu = True
  assert np.abs(apply(config, params, x) - expected).max() > 2 * ATOL


def test_unfolded_params_take_imagenet_normalised_inputs():
  model = reference(seed=1)
  params, config = convert_torchvision.load_torchvision(
      model.state_dict(), num_heads=2, fold_normalization=False)
  x = images(seed=1)
  np.testing.assert_allclose(
      apply(config, params, convert_torchvision.imagenet_normalize(x)),
      torch_logits(model, x),
      rtol=0,
      atol=ATOL)
  # Only the patch embedding differs from the folded load.
  folded, _ = convert_torchvision.load_torchvision(
      model.state_dict(), num_heads=2)
  for name, leaf in trees.flatten_tree(params).items():
    same = np.array_equal(leaf, trees.flatten_tree(folded)[name])
    assert same == (not name.startswith('embedding/')), name


def test_pre_logits_head_and_head_count():
  model = reference(seed=2, representation_size=24, num_classes=4)
  params, config = convert_torchvision.load_torchvision(
      model.state_dict(), num_heads=2)
  assert config.representation_size == 24
  assert config.num_classes == 4
  assert params['pre_logits']['kernel'].shape == (32, 24)
  x = images(seed=2)
  expected = torch_logits(model, x)
  np.testing.assert_allclose(
      apply(config, params, x), expected, rtol=0, atol=ATOL)
  # The head count is not in the shapes; a wrong one computes other logits.
  wrong, wrong_config = convert_torchvision.load_torchvision(
      model.state_dict(), num_heads=1)
  assert np.abs(apply(wrong_config, wrong, x) - expected).max() > 1e-2


@pytest.mark.parametrize('width,num_heads', [(192, 3), (384, 6), (768, 12),
                                             (1024, 16), (1280, 16)])
def test_default_num_heads_by_width(width, num_heads):
  state = {
      k: v.numpy() for k, v in TorchvisionViT(
          hidden=width, num_layers=1, mlp_dim=8,
          num_heads=1).state_dict().items()
  }
  _, config = convert_torchvision.load_torchvision(state)
  assert config.transformer.num_heads == num_heads
  _, config = convert_torchvision.load_torchvision(state, num_heads=4)
  assert config.transformer.num_heads == 4


def test_reads_files_wrappers_and_legacy_names(tmp_path):
  safetensors_torch = pytest.importorskip('safetensors.torch')
  state = reference(seed=3).state_dict()
  expected, _ = convert_torchvision.load_torchvision(state, num_heads=2)
  torch.save(state, tmp_path / 'vit.pth')
  safetensors_torch.save_file({
      k: v.contiguous() for k, v in state.items()
  }, tmp_path / 'vit.safetensors')
  legacy = {
      ('module.' + k).replace('mlp.0.',
                              'mlp.linear_1.').replace('mlp.3.',
                                                       'mlp.linear_2.'):
          v for k, v in state.items()
  }
  torch.save({'model': legacy, 'epoch': 3}, tmp_path / 'checkpoint.pth')
  for source in (tmp_path / 'vit.pth', str(tmp_path / 'vit.safetensors'),
                 tmp_path / 'checkpoint.pth', {
                     k: v.numpy() for k, v in state.items()
                 }):
    params, _ = convert_torchvision.load_torchvision(source, num_heads=2)
    jax.tree.map(np.testing.assert_array_equal, params, expected)


# ----------------------------------------------------------------------------
# Bad input.


def test_error_missing_and_unexpected_keys():
  state = reference().state_dict()
  del state['encoder.layers.encoder_layer_1.mlp.3.bias']
  state['encoder.extra'] = torch.zeros(1)
  with pytest.raises(checkpoint.CheckpointError) as e:
    convert_torchvision.load_torchvision(state, num_heads=2)
  assert 'missing: encoder.layers.encoder_layer_1.mlp.3.bias' in str(e.value)
  assert 'unexpected: encoder.extra' in str(e.value)


def test_error_not_a_torchvision_vit():
  with pytest.raises(
      checkpoint.CheckpointError,
      match="no 'conv_proj.weight'.*not a torchvision"):
    convert_torchvision.load_torchvision({'fc.weight': np.zeros((2, 2))})
  with pytest.raises(checkpoint.CheckpointError, match='does not exist'):
    convert_torchvision.load_torchvision('/nonexistent/vit.pth')


def test_error_unknown_width_needs_num_heads():
  with pytest.raises(
      checkpoint.CheckpointError,
      match='Width 32 has no default number of heads.*'
      'num_heads'):
    convert_torchvision.load_torchvision(reference().state_dict())
  with pytest.raises(checkpoint.CheckpointError, match='does not divide'):
    convert_torchvision.load_torchvision(reference().state_dict(), num_heads=3)


def test_error_inconsistent_shapes():
  state = reference().state_dict()
  state['encoder.layers.encoder_layer_1.mlp.0.weight'] = torch.zeros(48, 32)
  with pytest.raises(
      checkpoint.CheckpointError,
      match=r'encoder_layer_1\.mlp\.0\.weight: \(48, 32\), '
      r'expected \(64, 32\)'):
    convert_torchvision.load_torchvision(state, num_heads=2)


def test_real_torchvision_if_available():
  timm_support.make_torchvision_importable()
  try:
    from torchvision.models import vision_transformer  # pylint: disable=g-import-not-at-top
  except Exception:  # pylint: disable=broad-except
    # Absent, or a CUDA build next to a CPU torch (fails at import).
    pytest.skip('torchvision is not importable')
  model = vision_transformer.VisionTransformer(
      image_size=SIZE,
      patch_size=8,
      num_layers=2,
      num_heads=2,
      hidden_dim=32,
      mlp_dim=64,
      num_classes=5)
  ours = reference(seed=4)
  assert sorted(model.state_dict()) == sorted(ours.state_dict())
  model.load_state_dict(ours.state_dict())
  x = images(seed=4)
  np.testing.assert_allclose(
      torch_logits(model.eval(), x), torch_logits(ours, x), rtol=0, atol=1e-5)

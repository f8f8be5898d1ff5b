"""configs/flowers.py:tutorial end to end: timm weights file in, predict out.

The tutorials' recipe through the command line on a generated folder of
flower images, from a tiny timm ViT's `state_dict` (`torch.save`, read
without executing code), then `vit_jax.predict` on the finished workdir.
"""

import importlib
import os
import re
import subprocess

import numpy as np
from PIL import Image

import compile_settings
import preloaded
import timm_support

timm = timm_support.Lazy(timm_support.import_timm)
torch = timm_support.Lazy(lambda: importlib.import_module('torch'))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {
    'daisy': (245, 245, 245),
    'dandelion': (245, 225, 20),
    'roses': (210, 20, 40),
    'sunflowers': (40, 170, 60),
    'tulips': (200, 40, 210)
}
# ViT-Ti's width and heads, one block, 8x8 patches of 32x32 crops.
OVERRIDES = {
    'hidden_size': 192,
    'patches.size': (8, 8),
    'transformer.mlp_dim': 768,
    'transformer.num_heads': 3,
    'transformer.num_layers': 1
}


def test_tutorial_workflow_from_a_timm_file_then_predict(tmp_path):
  data = tmp_path / 'flower_photos'
  rng = np.random.RandomState(0)
  for name, rgb in COLOURS.items():
    os.makedirs(data / name)
    for i in range(10):  # 40 x 48: the evaluation crop is not a resize
      pixels = np.array(rgb, np.float32) + rng.uniform(-30, 30, (40, 48, 3))
      Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
          data / name / f'{i}.png')
  torch.manual_seed(0)
  model = timm.create_model(
      'vit_tiny_patch16_224',
      depth=1,
      patch_size=8,
      img_size=32,
      num_classes=21)
  weights = tmp_path / 'vit_tiny_in21k.pth'
  torch.save(model.state_dict(), weights)
  env = dict(
      os.environ,
      TF_CPP_MIN_LOG_LEVEL='2',
      PYTHONPATH=REPO,
      XLA_FLAGS=compile_settings.xla_flags(1))
  workdir = tmp_path / 'work'
  train = subprocess.run(
      preloaded.command(
          env, '-m', 'vit_jax.main',
          f'--config=configs/flowers.py:tutorial:{data}',
          f'--workdir={workdir}', f'--config.pretrained_path={weights}',
          '--config.pp.crop=32', '--config.pp.eval_resize=36',
          '--config.batch=16', '--config.total_steps=3',
          '--config.eval_every=3',
          *[f'--config.model.{k}={v}' for k, v in OVERRIDES.items()]),
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300)
  assert train.returncode == 0, train.stderr[-4000:]
  # Only the 5-class head trains (192 x 5 + 5); no representation layer.
  assert re.search(
      r'^Training 965 of [\d,]+ parameters \(head/bias, '
      r'head/kernel\)', train.stdout, re.M), train.stdout
  final = re.search(r'^Final test accuracy ([\d.]+) after 3 steps',
                    train.stdout, re.M)
  assert final and float(final.group(1)) >= 0.6, train.stdout
  image = data / 'roses' / '0.png'
  predict = subprocess.run(
      preloaded.command(env, '-m', 'vit_jax.predict', f'--workdir={workdir}',
                        '--topk=1', str(image)),
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=120)
  assert predict.returncode == 0, predict.stderr[-2000:]
  assert re.search(r'^  [\d.]+  roses$', predict.stdout, re.M), predict.stdout

"""Pre-train -> export -> fine-tune at a higher resolution, end to end, offline.

The paper's ImageNet-21k -> fine-tune pipeline in miniature
(configs/embedded_pretrain.py, configs/embedded_finetune.py): a ViT with a
representation layer is pre-trained on 28x28 digits (4x4 grid of 7x7
patches), exported to a released-format `.npz`, and fine-tuned at 42x42
(6x6 grid) with resampled position embeddings, no `pre_logits` and a fresh
head.

Short and cheap: 150 pre-training steps and 30 fine-tuning steps at batch
64, without the random shifts (a run this short learns more without them),
compiled with most XLA optimizations off (few steps: compiling dominates).
A test of the pipeline, not of accuracy.
"""

import numpy as np

from configs import embedded_finetune
from configs import embedded_pretrain
from vit_jax import train
from vit_jax.checkpoints import export
from vit_jax.checkpoints import npz

PRETRAIN_STEPS = 150
FINETUNE_STEPS = 30
BATCH = 64


def _short(config, steps):
  config.total_steps = steps
  config.warmup_steps = steps // 10
  config.batch = BATCH
  config.pp.augment = 'none'
  config.log_every = config.eval_every = config.checkpoint_every = steps
  return config


def test_pretrain_export_finetune(tmp_path):
  pre = _short(embedded_pretrain.get_config(), PRETRAIN_STEPS)
  pre_summary = train.train_and_evaluate(pre, str(tmp_path / 'pre'))
  assert pre_summary['accuracy'] > 0.45  # 0.685 measured; chance is 0.1

  path = str(tmp_path / 'ViT-mnist_7.npz')
  assert export.export(str(tmp_path / 'pre'), path) == PRETRAIN_STEPS
  exported = npz.read_npz(path)
  # Released (pre-linen) names, with the representation layer.
  assert ('Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/'
          'kernel') in exported
  assert exported['pre_logits/kernel'].shape == (64, 64)
  posemb_old = exported['Transformer/posembed_input/pos_embedding']
  assert posemb_old.shape == (1, 17, 64)

  ft = _short(embedded_finetune.get_config(path), FINETUNE_STEPS)
  # What the fine-tuning run starts from.
  start = train.init_params(train.create_model(ft, 10), ft)
  assert 'pre_logits' not in start
  assert not np.any(start['head']['kernel'])
  assert not np.any(start['head']['bias'])
  posemb = start['Transformer']['posembed_input']['pos_embedding']
  old = exported['Transformer/posembed_input/pos_embedding']
  assert posemb.shape == (1, 37, 64)  # class token + 6x6 grid
  np.testing.assert_array_equal(posemb[:, :1], old[:, :1])
  # Corners of an aligned-corners bilinear resampling are the old corners.
  grid_old = old[0, 1:].reshape(4, 4, 64)
  grid_new = posemb[0, 1:].reshape(6, 6, 64)
  for (i, j), (k, l) in [((0, 0), (0, 0)), ((0, 3), (0, 5)), ((3, 3), (5, 5))]:
    np.testing.assert_allclose(grid_new[k, l], grid_old[i, j], rtol=1e-6)
  np.testing.assert_array_equal(
      start['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_0']['kernel'],
      exported['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'])

  ft_summary = train.train_and_evaluate(ft, str(tmp_path / 'ft'))
  assert ft_summary['step'] == FINETUNE_STEPS
  # The same fine-tuning run from a random initialisation: the pre-trained
  # features must be worth a clear margin.
  scratch = _short(embedded_finetune.get_config(path), FINETUNE_STEPS)
  scratch.pretrained_path = None
  scratch_summary = train.train_and_evaluate(scratch, str(tmp_path / 'scratch'))
  # Measured: 0.358 fine-tuned vs 0.190 from scratch after these 30 steps.
  assert ft_summary['accuracy'] > scratch_summary['accuracy'] + 0.1, (
      ft_summary['accuracy'], scratch_summary['accuracy'])

"""Few-shot linear evaluation: the closed form, k-shot draws, real data, CLI."""

import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import models
from vit_jax.checkpoints import trees
from vit_jax.evaluation import features
from vit_jax.evaluation import fewshot
from vit_jax.evaluation import fewshot_data
from vit_jax.evaluation import fewshot_probe

DATA = os.path.join(os.path.dirname(__file__), 'data', 'official')
IMAGE = 32


def _tiny_model():
  # 1 layer, hidden 64; 8x8 patches give a 4x4 grid on 32x32 images.
  return models.get_model(
      'testing',
      hidden_size=64,
      patches=ml_collections.ConfigDict({'size': (8, 8)}))


@pytest.fixture(scope='module')
def tiny():
  model = _tiny_model()
  params = jax.jit(lambda: model.init(
      jax.random.key(0), jnp.zeros(
          (1, IMAGE, IMAGE, 3)), train=False)['params'])()
  return model, params


@pytest.mark.parametrize('n,d', [(40, 7), (6, 15)])
def test_closed_form_equals_lstsq_on_the_augmented_system(n, d):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, d))
  y = 2.0 * np.eye(3)[rng.integers(0, 3, n)] - 1
  l2 = 0.7
  w = fewshot_probe.fit_ridge(x, y, l2)
  # min |XW - Y|^2 + l2 |W|^2  ==  lstsq of [X; sqrt(l2) I] W = [Y; 0].
  x_aug = np.concatenate([x, np.sqrt(l2) * np.eye(d)])
  y_aug = np.concatenate([y, np.zeros((d, 3))])
  expected, *_ = np.linalg.lstsq(x_aug, y_aug, rcond=None)
  np.testing.assert_allclose(w, expected, atol=1e-10)
  with pytest.raises(ValueError, match='positive'):
    fewshot_probe.fit_ridge(x, y, 0.0)


def test_linear_probe_is_ridge_on_standardised_features_with_bias():
  rng = np.random.default_rng(1)
  train_x, test_x = rng.normal(size=(30, 5)) * 3 + 1, rng.normal(size=(50, 5))
  train_y, test_y = rng.integers(0, 4, 30), rng.integers(0, 4, 50)
  l2 = 2.0
  # The documented recipe, written out with lstsq.
  mean, std = train_x.mean(0), train_x.std(0) + 1e-5
  prep = lambda x: np.concatenate(
      [(x - mean) / std, np.full((len(x), 1), 100.0)], axis=1)
  x_aug = np.concatenate([prep(train_x), np.sqrt(l2) * np.eye(6)])
  y_aug = np.concatenate([2.0 * np.eye(4)[train_y] - 1, np.zeros((6, 4))])
  w, *_ = np.linalg.lstsq(x_aug, y_aug, rcond=None)
  expected = np.mean(np.argmax(prep(test_x) @ w, axis=1) == test_y)
  got = fewshot_probe.linear_probe(train_x, train_y, test_x, test_y, l2_reg=l2)
  assert got == expected
  # One-hot labels are accepted too.
  assert fewshot_probe.linear_probe(
      train_x, np.eye(4)[train_y], test_x, np.eye(4)[test_y],
      l2_reg=l2) == expected


def _separable(per_class, num_classes=10, dim=32, seed=0):
  rng = np.random.default_rng(seed)
  y = np.repeat(np.arange(num_classes), per_class)
  x = 5.0 * np.eye(dim)[y] + 0.3 * rng.normal(size=(len(y), dim))
  return x, y


def test_separable_classes_give_10_shot_accuracy_one():
  train_x, train_y = _separable(40)
  test_x, test_y = _separable(20, seed=1)
  per_seed = fewshot_probe.fewshot_accuracies(
      train_x, train_y, test_x, test_y, shots=(10,), seeds=(0, 1, 2))
  assert per_seed == {10: [1.0, 1.0, 1.0]}
  # Choosing l2 on held-out pool images works on the same data.
  chosen = fewshot_probe.fewshot_accuracies(
      train_x,
      train_y,
      test_x,
      test_y,
      shots=(10,),
      seeds=(0,),
      l2_regs=fewshot_probe.L2_REG_SWEEP)
  assert chosen == {10: [1.0]}


def test_too_few_images_for_k_names_class_k_and_count():
  train_x, train_y = _separable(10)
  keep = (train_y != 3) | (np.arange(len(train_y)) % 10 < 4)  # class 3: 4
  with pytest.raises(
      ValueError,
      match=r'5-shot .* 5 training images of class 3, but '
      r'only 4 are available'):
    fewshot_probe.fewshot_accuracies(
        train_x[keep],
        train_y[keep],
        train_x,
        train_y,
        shots=(1, 5),
        seeds=(0,))


def test_extract_features_is_the_representation():
  # Official fixture: pre_logits is the Dense output before tanh; the
  # representation is its tanh.
  model = models.VisionTransformer(
      num_classes=10,
      patches=ml_collections.ConfigDict({'size': (16, 16)}),
      transformer=ml_collections.ConfigDict(
          dict(
              num_layers=2,
              mlp_dim=64,
              num_heads=2,
              dropout_rate=0.0,
              attention_dropout_rate=0.0)),
      hidden_size=32,
      representation_size=16)
  params = checkpoint.load(os.path.join(DATA, 'tiny_vit_token_params.npz'))
  images = np.load(os.path.join(DATA, 'inputs_64.npy'))
  expected = np.tanh(
      np.load(os.path.join(DATA, 'tiny_vit_token_pre_logits.npy')))
  feats = features.extract_features(model, params, images, batch_size=1)
  np.testing.assert_allclose(feats, expected, atol=1e-5)
  # Input-pipeline batches [devices, b, ...]; padding (mask 0) is dropped.
  batch = {
      'image': np.stack([images, np.zeros_like(images)]),
      'mask': np.array([[1.0, 1.0], [0.0, 0.0]])
  }
  np.testing.assert_allclose(
      features.extract_features(model, params, [batch], batch_size=1),
      expected,
      atol=1e-5)


def test_evaluate_on_embedded_mnist(tiny):
  model, params = tiny
  result = fewshot.evaluate(
      model,
      params,
      'embedded_mnist',
      shots=(1, 10),
      seeds=(0, 1),
      max_per_class=10,
      batch_size=250)
  assert set(result) == {1, 10}
  assert all(0.0 <= v <= 1.0 for v in result.values())
  # Even a random-init ViT's features are well above chance (0.1) on all
  # 1,000 test digits (measured: 0.34 at 10 shots).
  assert result[10] > 0.2, result
  with pytest.raises(ValueError, match=r'25-shot .* class 0, but only 10 '):
    fewshot.evaluate(
        model,
        params,
        'embedded_mnist',
        shots=(25,),
        max_per_class=10,
        max_test_examples=10)


def test_load_split_caps_are_balanced_and_preprocessed():
  images, labels = fewshot_data.load_split(
      'embedded_mnist', 'test', image_size=IMAGE, max_examples=50)
  # embedded_mnist is stored sorted by class: a plain "first 50" would be
  # all zeros.
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 5))
  assert images.shape == (50, IMAGE, IMAGE, 3)
  assert images.min() >= -1 and images.max() <= 1
  _, train_labels = fewshot_data.load_split(
      'embedded_mnist', 'train', image_size=IMAGE, max_per_class=3)
  np.testing.assert_array_equal(np.bincount(train_labels), np.full(10, 3))


def test_fewshot_evaluator_for_training(tiny):
  model, params = tiny
  config = ml_collections.ConfigDict()
  config.dataset = 'embedded_mnist'
  config.pp = ml_collections.ConfigDict({'crop': IMAGE})
  config.fewshot = ml_collections.ConfigDict(
      dict(
          shots=(1, 5),
          seeds=(0,),
          l2_reg=2.0**10,
          max_per_class=5,
          max_test_examples=100,
          every_steps=100))
  evaluator = fewshot.make_fewshot_evaluator(config, model=model)
  metrics = evaluator(params)
  assert set(metrics) == {'fewshot/1shot', 'fewshot/5shot'}
  assert all(0.0 <= v <= 1.0 for v in metrics.values())
  # pmap-replicated parameters (leading device axis) give the same numbers.
  replicated = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), params)
  assert evaluator(replicated) == metrics


def _save(params, path):
  np.savez(path,
           **trees.flatten_tree(jax.tree_util.tree_map(np.asarray, params)))


def test_cli(tmp_path, capsys):
  # In-process (`main` is what `python -m vit_jax.evaluation.fewshot` runs); the
  # subprocess route is covered by tests/test_predict.py's CLI test.
  model = models.get_model('testing')
  params = jax.jit(lambda: model.init(
      jax.random.key(0), jnp.zeros(
          (1, IMAGE, IMAGE, 3)), train=False)['params'])()
  ckpt = tmp_path / 'testing.npz'
  _save(params, ckpt)
  rc = fewshot.main([
      '--model', 'testing', '--checkpoint',
      str(ckpt), '--dataset', 'embedded_mnist', '--shots', '1,5', '--seeds',
      '2', '--max-per-class', '5', '--max-test-examples', '100'
  ])
  out = capsys.readouterr().out
  assert rc == 0
  accs = {
      int(k): float(v)
      for k, v in re.findall(r'(\d+)-shot accuracy: ([0-9.]+)', out)
  }
  assert set(accs) == {1, 5} and all(0 <= a <= 1 for a in accs.values())
  assert 'testing on embedded_mnist (test), 2 seed(s)' in out


def test_main_reports_bad_input(tmp_path, tiny, capsys):
  _, params = tiny
  ckpt = tmp_path / 'patch8.npz'
  _save(params, ckpt)
  # The zoo's 'testing' has 16x16 patches; this checkpoint has 8x8.
  rc = fewshot.main([
      '--model', 'testing', '--checkpoint',
      str(ckpt), '--image-size',
      str(IMAGE)
  ])
  err = capsys.readouterr().err
  assert rc == 2
  assert 'does not fit testing' in err and 'shape mismatch' in err
  assert '--model' in err
  rc = fewshot.main([
      '--model', 'testing', '--shots', '10', '--image-size',
      str(IMAGE), '--max-per-class', '5', '--max-test-examples', '10'
  ])
  err = capsys.readouterr().err
  assert rc == 2
  assert '10-shot' in err and 'only 5' in err, err

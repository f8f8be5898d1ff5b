"""Inference: preprocessing, classify from files of any kind, labels, CLI."""

import json
import os
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

import preloaded
from vit_jax import input_pipeline
from vit_jax import models
from vit_jax import predict
from vit_jax.checkpoints import trees
from vit_jax.data import tf_import
from vit_jax.evaluation import label_names
from vit_jax.evaluation import trained_model

tf = tf_import.import_tensorflow()  # TensorFlow without Keras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = 32
NUM_CLASSES = 6
BIAS = np.array([0.0, 1.0, 3.0, -1.0, 2.0, 0.5], np.float32)


@pytest.fixture(scope='module')
def model_and_params():
  model = models.get_model('testing', num_classes=NUM_CLASSES)
  params = jax.jit(lambda: model.init(
      jax.random.key(0), jnp.zeros(
          (1, IMAGE, IMAGE, 3)), train=False)['params'])()
  params = jax.tree_util.tree_map(np.asarray, params)
  # Zero kernel, fixed bias: every image gets logits = BIAS.
  params['head'] = {
      'kernel': np.zeros((10, NUM_CLASSES), np.float32),
      'bias': BIAS
  }
  return model, params


def _expected_top(k, names=None):
  probs = np.exp(BIAS - BIAS.max())
  probs /= probs.sum()
  order = np.argsort(-probs)[:k]
  names = names or [str(i) for i in range(NUM_CLASSES)]
  return [names[c] for c in order], probs[order]


def _write_images(directory):
  rng = np.random.default_rng(0)
  paths = {}
  paths['rgb_png'] = directory / 'rgb.png'
  Image.fromarray(rng.integers(0, 256, (50, 70, 3),
                               np.uint8)).save(paths['rgb_png'])
  paths['jpeg'] = directory / 'photo.jpg'
  Image.fromarray(rng.integers(0, 256, (40, 30, 3), np.uint8)).save(
      paths['jpeg'], quality=90)
  paths['gray'] = directory / 'gray.png'
  Image.fromarray(rng.integers(0, 256, (33, 33), np.uint8),
                  'L').save(paths['gray'])
  paths['rgba'] = directory / 'rgba.png'
  Image.fromarray(rng.integers(0, 256, (20, 64, 4), np.uint8),
                  'RGBA').save(paths['rgba'])
  paths['corrupt'] = directory / 'corrupt.jpg'
  paths['corrupt'].write_bytes(b'\xff\xd8\xff\xe0 definitely not a jpeg')
  return paths


def test_preprocessing_matches_the_input_pipeline_eval(tmp_path):
  # An image-folder dataset read by the input pipeline (eval path) and the
  # same files through predict: identical arrays, grayscale and RGBA included.
  rng = np.random.default_rng(1)
  for split in ('train', 'test'):
    d = tmp_path / split / 'a'
    d.mkdir(parents=True)
  test_dir = tmp_path / 'test' / 'a'
  arrays = [
      rng.integers(0, 256, (45, 61, 3), np.uint8),
      rng.integers(0, 256, (17, 23), np.uint8),
      rng.integers(0, 256, (40, 40, 4), np.uint8)
  ]
  for i, a in enumerate(arrays):
    Image.fromarray(a).save(test_dir / f'{i}.png')
  Image.fromarray(arrays[0]).save(tmp_path / 'train' / 'a' / 'x.png')
  config = ml_collections.ConfigDict(
      dict(
          dataset=str(tmp_path),
          batch=3,
          batch_eval=3,
          pp=dict(crop=IMAGE, augment='none')))
  _, ds_test = input_pipeline.get_datasets(
      config, process_index=0, process_count=1)
  batch = next(ds_test.as_numpy_iterator())
  pipeline = batch['image'].reshape(-1, IMAGE, IMAGE, 3)[:3]
  ours = np.stack([
      predict.preprocess(predict.load_image(test_dir / f'{i}.png'), IMAGE)
      for i in range(3)
  ])
  np.testing.assert_allclose(ours, pipeline, atol=1e-6)
  # Grayscale is repeated; alpha is dropped.
  gray = predict.load_image(test_dir / '1.png')
  np.testing.assert_array_equal(gray, np.repeat(arrays[1][..., None], 3, -1))
  np.testing.assert_array_equal(
      predict.load_image(test_dir / '2.png'), arrays[2][..., :3])


def test_classify_paths_of_any_kind(tmp_path, model_and_params):
  model, params = model_and_params
  paths = _write_images(tmp_path)
  inputs = [paths[k] for k in ('rgb_png', 'corrupt', 'jpeg', 'gray', 'rgba')]
  with pytest.warns(UserWarning, match='corrupt.jpg: not a readable image'):
    results = predict.classify(model, params, inputs, topk=3, batch_size=2)
  assert results[1] is None
  names, probs = _expected_top(3)
  for result in results[:1] + results[2:]:
    assert [n for n, _ in result] == names
    got = np.array([p for _, p in result])
    np.testing.assert_allclose(got, probs, rtol=1e-5)
    assert np.all(np.diff(got) <= 0) and got.sum() <= 1 + 1e-6
  # topk larger than the number of classes gives every class once.
  full = predict.classify(model, params, [paths['gray']], topk=50)[0]
  assert len(full) == NUM_CLASSES
  np.testing.assert_allclose(sum(p for _, p in full), 1.0, rtol=1e-5)
  with pytest.raises(predict.ImageError, match='corrupt.jpg'):
    predict.classify(model, params, [paths['corrupt']], on_error='raise')


def test_classify_runs_the_model_on_the_resized_image(tmp_path,
                                                      model_and_params):
  model, params = model_and_params
  params = dict(params)
  params['head'] = {
      'kernel':
          np.random.default_rng(2).normal(size=(10, NUM_CLASSES)).astype(
              np.float32) * 3,
      'bias':
          np.zeros(NUM_CLASSES, np.float32)
  }
  pixels = np.random.default_rng(3).integers(0, 256, (48, 80, 3), np.uint8)
  Image.fromarray(pixels).save(tmp_path / 'x.png')
  # Independently: TF bilinear resize, [-1, 1], the model, softmax.
  x = tf.image.resize(pixels, (IMAGE, IMAGE)).numpy() / 127.5 - 1
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(
      params, x[None].astype(np.float32))[0]
  probs = np.asarray(jax.nn.softmax(logits))
  top = predict.classify(
      model, params, [tmp_path / 'x.png'], topk=2, labels=list('abcdef'))[0]
  order = np.argsort(-probs)[:2]
  assert [n for n, _ in top] == [list('abcdef')[i] for i in order]
  np.testing.assert_allclose([p for _, p in top], probs[order], rtol=1e-4)
  # Arrays (and PIL images) work as inputs too.
  from_array = predict.classify(
      model, params, [pixels], topk=2, labels=list('abcdef'))[0]
  np.testing.assert_allclose([p for _, p in from_array], [p for _, p in top],
                             rtol=1e-6)


def test_zero_head_warns(model_and_params, tmp_path):
  model, params = model_and_params
  zero = dict(params)
  zero['head'] = {
      'kernel': np.zeros((10, NUM_CLASSES), np.float32),
      'bias': np.zeros(NUM_CLASSES, np.float32)
  }
  assert trained_model.head_is_zero(
      zero) and not trained_model.head_is_zero(params)
  image = np.zeros((IMAGE, IMAGE, 3), np.uint8)
  with pytest.warns(UserWarning, match=r"head is all zeros \(an ImageNet-21k"):
    result = predict.classify(model, zero, [image], topk=2)[0]
  np.testing.assert_allclose([p for _, p in result], [1 / NUM_CLASSES] * 2,
                             rtol=1e-5)


def test_labels(tmp_path):
  as_list = tmp_path / 'list.json'
  as_list.write_text(json.dumps(['cat', 'dog', 'bird']))
  assert label_names.load_labels(str(as_list), 3) == ['cat', 'dog', 'bird']
  as_dict = tmp_path / 'class_names.json'
  as_dict.write_text(json.dumps({'0': 'cat', '2': 'bird', '1': 'dog'}))
  assert label_names.load_labels(str(as_dict), 3) == ['cat', 'dog', 'bird']
  # Found next to a checkpoint when no labels are given.
  assert label_names.load_labels(
      None, 3, checkpoint_dir=str(tmp_path)) == ['cat', 'dog', 'bird']
  assert label_names.load_labels(None, 3) == ['0', '1', '2']
  with pytest.raises(
      ValueError, match='3 class names but the model head '
      'has 5 classes'):
    label_names.load_labels(str(as_list), 5)
  imagenet = label_names.load_labels('imagenet2012', 1000)
  assert imagenet[0] == 'n01440764' and len(set(imagenet)) == 1000
  assert label_names.load_labels('embedded_mnist',
                                 10) == [str(i) for i in range(10)]


def _save_checkpoint(params, path):
  np.savez(path, **trees.flatten_tree(params))


def test_load_model_reads_sizes_from_the_checkpoint(tmp_path, model_and_params):
  _, params = model_and_params
  ckpt = tmp_path / 'm.npz'
  _save_checkpoint(params, ckpt)
  model, loaded = trained_model.load_model('testing', str(ckpt))
  assert model.num_classes == NUM_CLASSES
  assert model.representation_size is None
  assert trained_model.image_size_from_params(model, loaded) == IMAGE
  with pytest.raises(ValueError, match='--num-classes=7.*6-way head'):
    trained_model.load_model('testing', str(ckpt), num_classes=7)
  with pytest.raises(ValueError, match='does not fit ViT-Ti_16'):
    big, _ = trained_model.load_model('ViT-Ti_16', str(ckpt))
    trained_model.check_params_fit(big, loaded, IMAGE)


def test_cli(tmp_path, model_and_params):
  _, params = model_and_params
  workdir = tmp_path / 'workdir'
  workdir.mkdir()
  _save_checkpoint(params, workdir / 'model.npz')
  names = ['zero', 'one', 'two', 'three', 'four', 'five']
  (workdir / 'class_names.json').write_text(json.dumps(names))
  paths = _write_images(tmp_path)
  files = [str(paths[k]) for k in ('rgb_png', 'corrupt', 'gray', 'rgba')]
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run(
      preloaded.command(env, '-m', 'vit_jax.predict',
                        '--model', 'testing', '--checkpoint',
                        str(workdir / 'model.npz'), '--topk', '2',
                        '--batch-size', '2',
                        f'--output={tmp_path}/new/dir/out.txt', *files),
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
      cwd=ROOT)
  assert proc.returncode == 1, proc.stderr
  # --output: the same lines, its missing folders created.
  assert (tmp_path / 'new' / 'dir' / 'out.txt').read_text() == proc.stdout
  assert 'corrupt.jpg' in proc.stderr
  assert '1 of 4 image(s) could not be read' in proc.stderr
  top_names, top_probs = _expected_top(2, names)
  lines = proc.stdout.strip().splitlines()
  expected = []
  for f in files:
    if 'corrupt' in f:
      continue
    expected.append(f)
    expected += [f'  {p:.4f}  {n}' for n, p in zip(top_names, top_probs)]
  assert lines == expected


def test_main_zero_head_and_bad_checkpoint(tmp_path, model_and_params, capsys):
  _, params = model_and_params
  zero = dict(params)
  zero['head'] = {
      'kernel': np.zeros((10, NUM_CLASSES), np.float32),
      'bias': np.zeros(NUM_CLASSES, np.float32)
  }
  _save_checkpoint(zero, tmp_path / 'zero.npz')
  image = tmp_path / 'x.png'
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
  rc = predict.main([
      '--model', 'testing', '--checkpoint',
      str(tmp_path / 'zero.npz'),
      str(image)
  ])
  captured = capsys.readouterr()
  assert rc == 0
  assert predict.ZERO_HEAD_MESSAGE in captured.err
  assert f'  {1 / NUM_CLASSES:.4f}  0' in captured.out
  (tmp_path / 'bad.npz').write_bytes(b'nope')
  rc = predict.main([
      '--model', 'testing', '--checkpoint',
      str(tmp_path / 'bad.npz'),
      str(image)
  ])
  assert rc == 2
  assert 'bad.npz' in capsys.readouterr().err

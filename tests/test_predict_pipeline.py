"""Predict on a model the training pipeline trained: CLI accuracy = training.

The acceptance test of `python -m vit_jax.predict --workdir`: train the
embedded-MNIST ViT of configs/embedded.py:digits briefly (100 steps, batch
128: test accuracy 0.757 on the Zen 3 machine), export it to `.npz` with
`vit_jax.checkpoints.export`, write the 1,000 held-out test digits as PNG
files in per-class folders, classify them all with the command line
(`--topk 1`) and count: the CLI gets right exactly the images the training's
own evaluation got right, so its accuracy equals the `accuracy` of
summary.json (exactly, not to a tolerance).
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import embedded
import preloaded
from vit_jax import input_pipeline
from vit_jax import predict
from vit_jax import train
from vit_jax.checkpoints import export
from vit_jax.data import embedded_mnist
from vit_jax.evaluation import label_names
from vit_jax.evaluation import trained_model

STEPS = 100
PROB_LINE = re.compile(r'^  (\d\.\d{4})  (\S+)$')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A finished short training run, its exported `.npz` and its summary."""
  base = tmp_path_factory.mktemp('pipeline')
  config = embedded.get_digits_config()
  config.total_steps = STEPS
  config.warmup_steps = 10
  config.batch = 128
  # No shifts: a run this short learns more without them; the evaluation
  # (and so the accuracy predict must reproduce) never augments.
  config.pp.augment = 'none'
  config.log_every = config.eval_every = config.checkpoint_every = STEPS
  workdir = str(base / 'workdir')
  summary = train.train_and_evaluate(config, workdir)
  npz = str(base / 'model.npz')  # outside the workdir: labels from --workdir
  assert export.export(workdir, npz) == STEPS
  return dict(config=config, workdir=workdir, npz=npz, summary=summary)


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
  """The embedded test split as `<dir>/<label>/<index>.png` (grayscale)."""
  # The split's own arrays, in the order the evaluation reads them.
  images, labels = embedded_mnist.load_split('test')
  base = tmp_path_factory.mktemp('digits')
  files = []
  for i, (image, label) in enumerate(zip(images, labels)):
    folder = base / str(label)
    folder.mkdir(exist_ok=True)
    path = folder / f'{i:04d}.png'
    Image.fromarray(image[..., 0], 'L').save(path)
    files.append(str(path))
  return files, images, labels


@pytest.fixture(scope='module')
def pipeline_images(run):
  """The test split as the training's evaluation fed it to the model."""
  _, ds_test = input_pipeline.get_datasets(
      run['config'], process_index=0, process_count=1)
  images, masks = [], []
  for batch in ds_test.as_numpy_iterator():
    images.append(batch['image'].reshape(-1, *batch['image'].shape[-3:]))
    masks.append(batch['mask'].reshape(-1))
  images, masks = np.concatenate(images), np.concatenate(masks)
  return images[masks > 0]


def test_cli_reproduces_the_training_accuracy(run, digits, pipeline_images):
  files, _, labels = digits
  workdir, summary = run['workdir'], run['summary']
  # Training records the class indices (dataset_report.write_dataset_report).
  with open(os.path.join(workdir, label_names.CLASS_NAMES_FILE)) as f:
    assert json.load(f) == [str(i) for i in range(10)]
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run(
      preloaded.command(env, '-m', 'vit_jax.predict', '--workdir', workdir,
                        '--checkpoint', run['npz'], '--topk', '1', *files),
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
      cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]

  # The documented format: the path, then one '  0.1234  name' line per k.
  lines = proc.stdout.splitlines()
  assert len(lines) == 2 * len(files)
  assert lines[0::2] == files
  predicted = []
  for line in lines[1::2]:
    match = PROB_LINE.match(line)
    assert match, line
    assert 0 < float(match.group(1)) <= 1
    predicted.append(match.group(2))
  truth = [os.path.basename(os.path.dirname(f)) for f in files]
  correct = sum(p == t for p, t in zip(predicted, truth))

  accuracy = summary['accuracy']
  print(f'\ntraining accuracy {accuracy:.4f}; CLI {correct} of {len(files)} '
        f'= {correct / len(files):.4f}')
  assert accuracy > 0.5  # the run learned: the comparison is not trivial
  assert correct / len(files) == accuracy  # exactly: the same count
  assert correct == round(accuracy * 1000)

  # Image by image, the CLI's classes are the argmax of the model on the
  # inputs the training's evaluation fed it.
  trained = trained_model.load_model_from_workdir(workdir, run['npz'])
  logits = jax.jit(
      lambda p, x: trained.model.apply({'params': p}, x, train=False))(
          trained.params, pipeline_images)
  np.testing.assert_array_equal(
      np.array(predicted, int), np.argmax(np.asarray(logits), axis=-1))
  np.testing.assert_array_equal(np.array(truth, int), labels)


def test_png_digits_give_the_pipeline_inputs_bit_for_bit(
    digits, pipeline_images):
  files, _, _ = digits
  ours = np.stack(
      [predict.preprocess(predict.load_image(f), (28, 28)) for f in files])
  assert ours.dtype == pipeline_images.dtype == np.float32
  np.testing.assert_array_equal(ours, pipeline_images)


def test_python_api_workdir_and_config_file(run, digits):
  files, images, _ = digits
  workdir, config = run['workdir'], run['config']
  trained = trained_model.load_model_from_workdir(workdir, run['npz'])
  assert trained.image_size == (28, 28)
  assert trained.class_names == [str(i) for i in range(10)]
  expected = train.create_model(config, 10)
  for field in ('hidden_size', 'posemb', 'classifier', 'num_classes'):
    assert getattr(trained.model, field) == getattr(expected, field)
  assert tuple(trained.model.patches.size) == (7, 7)
  assert trained.config.model.transformer.num_layers == 4

  # The config file describes the same model; arrays classify like files.
  from_file = trained_model.load_model_from_config_file(
      os.path.join(ROOT, 'configs', 'embedded.py') + ':digits', run['npz'])
  assert from_file.image_size == (28, 28)
  assert from_file.class_names == [str(i) for i in range(10)]  # its dataset
  by_path = predict.classify(
      trained.model,
      trained.params,
      files[:16],
      image_size=trained.image_size,
      labels=trained.class_names,
      topk=3)
  by_array = predict.classify(
      from_file.model,
      from_file.params,
      list(images[:16]),
      image_size=from_file.image_size,
      labels=from_file.class_names,
      topk=3)
  assert by_path == by_array


def test_workdir_and_config_errors(run, tmp_path, capsys):
  image = tmp_path / 'x.png'
  Image.fromarray(np.zeros((28, 28), np.uint8), 'L').save(image)
  npz = run['npz']

  def main(*args):
    rc = predict.main([*args, '--checkpoint', npz, str(image)])
    return rc, capsys.readouterr()

  rc, out = main('--workdir', str(tmp_path / 'missing'))
  assert rc == 2 and 'does not exist' in out.err
  empty = tmp_path / 'unfinished'
  empty.mkdir()
  rc, out = main('--workdir', str(empty))
  assert rc == 2 and 'has no summary.json' in out.err
  assert '--config' in out.err
  # A checkpoint that is not the run's model.
  other = tmp_path / 'other'
  other.mkdir()
  with open(os.path.join(run['workdir'], 'summary.json')) as f:
    summary = json.load(f)
  summary['config']['model']['hidden_size'] = 32
  (other / 'summary.json').write_text(json.dumps(summary))
  rc, out = main('--workdir', str(other))
  assert rc == 2
  assert 'does not hold a model of the run in' in out.err
  assert 'python -m vit_jax.checkpoints.export' in out.err
  rc, out = main('--config', str(tmp_path / 'nope.py'))
  assert rc == 2 and 'nope.py does not exist' in out.err
  # The workdir form works in process too, with the run's class names.
  rc, out = main('--workdir', run['workdir'], '--topk', '10')
  assert rc == 0
  assert sorted(line.split()[1] for line in out.out.splitlines()[1:]) == [
      str(i) for i in range(10)
  ]
  # Exactly one of --model, --workdir, --config.
  with pytest.raises(SystemExit):
    predict.main([
        '--model', 'testing', '--workdir', run['workdir'], '--checkpoint', npz,
        str(image)
    ])
  with pytest.raises(SystemExit):
    predict.main(['--checkpoint', npz, str(image)])
  capsys.readouterr()

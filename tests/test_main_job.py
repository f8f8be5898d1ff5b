"""The main job: the README's first command, shortened, run once and examined.

`python -m vit_jax.main --workdir=<dir>` (no --config: configs/embedded.py)
trains the small ViT on the embedded MNIST digits offline. Here it runs with
`--config.total_steps=150` (the full run's accuracy over seeds is the job of
`python -m bench.main_job`, docs/main_job.md). One run (a module fixture)
serves every test here: learning, the console a person sees (each progress
step once, no library noise, the closing lines), the pictures in the
workdir, and the README's third command (predict) on test digits written as
PNG files.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

import compile_settings
import preloaded

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lines of library start-up noise that must not reach the console.
NOISE = (
    'oneDNN custom operations',  # TensorFlow
    'absl::InitializeLog',  # TensorFlow's C++ logging before absl init
    'libtpu',
    "Unable to initialize backend 'tpu'",  # the JAX TPU probe
    'fontManager',  # matplotlib's font cache
    'Traceback',
)
ABSL_LOG_LINE = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d\d')
# The default command with fewer steps: 150 steps reached 0.742 (0.449 at
# step 75); 0.6 is far above chance (0.1).
SHORT = ('--config.total_steps=150', '--config.eval_every=75')


def _env():
  env = compile_settings.optimized_env(os.environ)  # as a user's shell has
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)
  return env


@pytest.fixture(scope='module')
def main_job(tmp_path_factory):
  """(workdir, console lines, summary) of the default command, shortened."""
  workdir = str(tmp_path_factory.mktemp('main_job') / 'vit_mnist')
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}', *SHORT],
      cwd=REPO,
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      timeout=900,
      check=False)
  assert result.returncode == 0, result.stdout[-4000:]
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  return workdir, result.stdout.splitlines(), summary


def test_default_command_learns_the_digits(main_job):
  workdir, console, summary = main_job
  assert summary['config']['dataset'] == 'embedded_mnist'
  assert summary['step'] == summary['total_steps'] == 150
  assert [step for step, _ in summary['eval_history']] == [75, 150]
  assert summary['accuracy'] >= 0.6, summary['eval_history']
  assert os.listdir(os.path.join(workdir, 'checkpoints')) != []
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  assert any(
      line.startswith(f'Final test accuracy {summary["accuracy"]:.4f} after '
                      f'{summary["step"]} steps') for line in console)


def test_console_shows_each_thing_once_and_no_noise(main_job):
  """Output is not a terminal here: one plain line per log_every steps."""
  _, console, summary = main_job
  config = summary['config']
  total, every = config['total_steps'], config['log_every']
  steps = [
      int(m.group(1))
      for line in console
      for m in [re.match(r'^step +(\d+)/\d+ +loss ', line)]
      if m
  ]
  want = sorted(set(range(every, total + 1, every)) | {total})
  assert steps == want
  evals = [line for line in console if re.match(r'^step \d+: test accur', line)]
  assert len(evals) == len(summary['eval_history'])
  assert sum('Dataset embedded_mnist' in line for line in console) == 1
  for line in console:
    assert not ABSL_LOG_LINE.match(line), line
    assert not any(noise in line for noise in NOISE), line
  # The closing lines: result, workdir contents, next commands.
  final = [i for i, l in enumerate(console) if l.startswith('Final test')][0]
  tail = '\n'.join(console[final:])
  for name in ('summary.json', 'curves.png', 'confusion.png', 'checkpoints'):
    assert name in tail
  assert 'python -m vit_jax.predict --workdir=' in tail
  assert 'tensorboard --logdir=' in tail


def test_pictures_decode_and_confusion_matches_accuracy(main_job):
  workdir, _, summary = main_job
  for name in ('curves.png', 'confusion.png'):
    with PIL.Image.open(os.path.join(workdir, name)) as image:
      assert image.format == 'PNG'
      assert min(image.size) > 200
  confusion = np.array(summary['confusion'])
  assert confusion.shape == (10, 10)
  assert confusion.sum() == 1000  # every test digit once
  assert np.trace(confusion) / confusion.sum() == summary['accuracy']
  assert confusion.sum(axis=1).tolist() == [100] * 10  # the stratified split


def test_predict_on_a_digit_from_the_workdir(main_job, tmp_path):
  """The README's third command, on test digits saved as PNG files: the
  newest train-state checkpoint and the exported .npz classify alike, and
  the digits' true classes come out on top as often as the evaluation's
  confusion matrix says."""
  workdir, _, summary = main_job
  sys.path.insert(0, REPO)
  from vit_jax.data import embedded_mnist  # pylint: disable=g-import-not-at-top
  images, labels = embedded_mnist.load_split('test')
  paths = []
  for i in range(0, 1000, 50):
    paths.append(str(tmp_path / f'digit{i}_{labels[i]}.png'))
    PIL.Image.fromarray(images[i, :, :, 0]).save(paths[-1])
  npz = str(tmp_path / 'model.npz')
  env = dict(os.environ)
  subprocess.run(
      preloaded.command(env, '-m', 'vit_jax.checkpoints.export',
                        f'--workdir={workdir}', f'--output={npz}'),
      cwd=REPO,
      env=env,
      check=True,
      capture_output=True)
  outputs = []
  # The first start is a user's (nothing imported before: its console is
  # checked for start-up lines); the second is preloaded (tests/preloaded.py).
  for python, env, extra in ((preloaded.plain, _env(), []),
                             (preloaded.command, env, [f'--checkpoint={npz}'])):
    result = subprocess.run(
        python(env, '-m', 'vit_jax.predict', f'--workdir={workdir}', '--topk=1',
               *extra, *paths),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ''  # no library start-up lines either
    outputs.append(result.stdout)
  assert outputs[0] == outputs[1]
  top1 = re.findall(r'^  [0-9.]+  (\d)$', outputs[0], re.M)
  assert len(top1) == len(paths)
  right = sum(int(t) == labels[i] for t, i in zip(top1, range(0, 1000, 50)))
  # 20 digits, a model at about 0.74: at least half of them, far above
  # chance (2 of 20).
  assert right >= 0.5 * len(paths), outputs[0]

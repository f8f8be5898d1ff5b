"""What people do to a running main job: each gets one clear answer.

CASES is the table (docs/troubleshooting.md holds it, with the rows of
tests/test_user_errors.py): each row runs the real command line
(`python -m vit_jax.main`, a tiny model on a 2-class image folder) in a
subprocess and pins the exit status, a console without a traceback of at
most 15 lines, and the words that name the cause. The rows run three at a
time in one module fixture. The full disk is a real one: a 300 kB tmpfs the
test mounts over the workdir (root only; the rows that need a mount are
skipped without it), and after the space is back (remounted larger) the
resumed run ends with the parameters of an uninterrupted run. Out of memory
runs under `RLIMIT_AS`: once refused by the estimate before the first step,
once a real allocation failure in the step.
"""

import collections
import concurrent.futures
import json
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

from test_user_errors import markdown_table
from vit_jax.params import trees
from vit_jax.training import train_checkpoint
from vit_jax.training import workdir_lock

UNOPTIMIZED_XLA = True  # conftest.py: compiling costs more than running

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config.model.hidden_size=16',
        '--config.model.transformer.mlp_dim=16',
        '--config.model.transformer.num_layers=1',
        '--config.model.transformer.num_heads=2', '--config.batch=16',
        '--config.batch_eval=64', '--config.warmup_steps=1',
        '--config.log_every=10', '--config.eval_every=1000',
        '--config.prefetch=0', '--config.pp.augment=none']
LONG = ['--config.total_steps=100000', '--config.checkpoint_every=20']
SHORT = ['--config.total_steps=40', '--config.checkpoint_every=10']
# RLIMIT_AS of the out-of-memory rows: a bit over what the interpreter with
# JAX and TensorFlow maps (about 3 GB).
MEMORY_LIMIT = 6 << 30
WIDE = ['--config.model.transformer.mlp_dim=1024', '--config.warmup_steps=1']

# max_lines: a run that finishes prints its closing lines (about 20).
Case = collections.namedtuple('Case', 'name did words fix code max_lines',
                              defaults=(15,))
CASES = [
    Case('ctrl_c', 'Ctrl-C (SIGINT) during training',
         ['Interrupted by Ctrl-C after step', 'To resume, run the same '
          'command'], 'run the printed command: it resumes from that step',
         130),
    Case('ctrl_c_twice', 'Ctrl-C again while the checkpoint is being saved',
         ['Ctrl-C again', 'on disk is intact'],
         'run the same command: it resumes from the intact step (the '
         'unfinished one is removed)', 130),
    Case('sigterm', 'SIGTERM (preemption, `kill`) during training',
         ['Interrupted by SIGTERM after step', 'To resume, run the same '
          'command'], 'run the printed command: it resumes from that step',
         143),
    Case('workdir_in_use', 'a second run on a workdir a run is using',
         ['is in use by another run: PID', 'choose another --workdir'],
         'wait for the first run, stop it, or choose another `--workdir`', 2),
    Case('stale_lock', 'a workdir whose run is gone (kill -9, reboot) '
         'without releasing its lock', ['Taking over the lock of a run that '
                                        'is gone'],
         'nothing: the run takes the lock over and goes on', 0, 25),
    Case('disk_full', 'a disk that fills up while a checkpoint is saved '
         '(also a quota)', ['the disk is full', 'one checkpoint of this run '
                            'takes about', 'The newest intact checkpoint is '
                            'step 10'],
         'free space, then run the printed command: it resumes from that '
         'step', 1),
    Case('read_only', 'a checkpoint folder on a read-only file system',
         ['the file system is read-only', 'No checkpoint was saved'],
         'give the run a `--workdir` it can write', 1),
    Case('oom_estimate', 'a batch that obviously cannot fit in memory',
         ['Out of memory before the first step', 'images per device',
          'needs at least', '--config.accum_steps'],
         'lower `--config.batch`, raise `--config.accum_steps`, a smaller '
         'model or bfloat16', 1),
    Case('oom_step', 'a train step that runs out of memory',
         ['Out of memory: the train step tried to allocate',
          'images per device', '--config.accum_steps'],
         'lower `--config.batch`, raise `--config.accum_steps`, a smaller '
         'model or bfloat16', 1),
    Case('empty_class', 'an image-folder class without training images',
         ["Class folder(s) ['b'] of image folder", "have no images in the "
          "'train' split"], 'add images to it, or remove the folder', 1),
    Case('test_only_class', 'a test split with a class the train split '
         'lacks', ["Class folder(s) ['c'] of image folder"],
         'add training images of it, or remove it from the test split', 1),
    Case('untested_class_small_split', 'a train class the test split lacks; '
         'a train split smaller than one batch',
         ["Warning: Class(es) ['b']", "no images in the 'test' split",
          'fewer than one batch'],
         'warnings: training goes on; add test images, lower `--config.batch`',
         0, 25),
]
ROWS = {c.name: c for c in CASES}


def _image_folder(root, splits):
  """`root/<split>/<class>/<i>.png`: 28x28 images, one colour per class."""
  for split, counts in splits.items():
    for index, (name, n) in enumerate(counts.items()):
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      rng = np.random.default_rng(index)
      for i in range(n):
        pixels = (rng.integers(0, 60, (28, 28, 3)) + 150 * index).astype(
            np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, split, name,
                                                  f'{i}.png'))
  return root


def _command(workdir, args):
  return [sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}',
          *args]


def _env():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)
  return env


def _run(workdir, args, limit=None):
  preexec = (lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
             if limit else None)
  return subprocess.run(_command(workdir, args), cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=300,
                        preexec_fn=preexec)


def _start(workdir, args):
  return subprocess.Popen(_command(workdir, args), cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _done(process):
  out, err = process.communicate(timeout=300)
  return subprocess.CompletedProcess(process.args, process.returncode, out,
                                     err)


def _wait_for(predicate, process, timeout=240):
  deadline = time.time() + timeout
  while not predicate():
    assert process.poll() is None, process.communicate()
    assert time.time() < deadline, 'timed out'
    time.sleep(0.001)


def _steps(workdir):
  folder = train_checkpoint.checkpoint_dir(workdir)
  return [n for n in (os.listdir(folder) if os.path.isdir(folder) else [])]


def _signal_after_checkpoint(workdir, args, signals):
  """Starts a run, sends `signals[0]` once a checkpoint is on disk and the
  rest as soon as a save is being written."""
  process = _start(workdir, args)
  _wait_for(lambda: any(n.isdigit() for n in _steps(workdir)), process)
  process.send_signal(signals[0])
  for sig in signals[1:]:
    _wait_for(lambda: any('tmp' in n for n in _steps(workdir)), process)
    process.send_signal(sig)
  return _done(process)


def _in_use(tmp, data):
  workdir = os.path.join(tmp, 'w')
  first = _start(workdir, data + LONG)
  lock = os.path.join(workdir, workdir_lock.LOCK_FILE)
  _wait_for(lambda: os.path.exists(lock) and os.path.getsize(lock), first)
  second = _run(workdir, data + SHORT)
  _wait_for(lambda: any(n.isdigit() for n in _steps(workdir)), first)
  first.send_signal(signal.SIGTERM)
  first_result = _done(first)
  assert first_result.returncode == 143, first_result.stderr
  assert f'PID {first.pid} on host' in second.stderr, second.stderr
  assert not os.path.exists(lock)  # released on exit
  return second


def _stale_lock(tmp, data):
  workdir = os.path.join(tmp, 'w')
  os.makedirs(workdir)
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), 'w') as f:
    json.dump(dict(host='h', pid=2 ** 22 + 7, started=0, command='x'), f)
  return _run(workdir, data + ['--config.total_steps=2'])


def _mount(path, options):
  os.makedirs(path, exist_ok=True)
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs',
                           path], capture_output=True, text=True)
  if result.returncode:
    pytest.skip(f'cannot mount a tmpfs: {result.stderr.strip()}')


def _params(workdir):
  return trees.flatten_tree(
      train_checkpoint.TrainCheckpoints(workdir).restore_params())


def _disk_full(tmp, data):
  workdir = os.path.join(tmp, 'w')
  _mount(workdir, 'size=300k')
  result = _run(workdir, data + SHORT)
  subprocess.run(['mount', '-o', 'remount,size=4m', workdir], check=True)
  resumed = _run(workdir, data + SHORT)
  reference = _run(os.path.join(tmp, 'reference'), data + SHORT)
  with open(os.path.join(workdir, 'summary.json')) as f:  # before unmount
    start_step = json.load(f)['start_step']
  return result, dict(
      resumed=resumed, reference=reference, start_step=start_step,
      got=_params(workdir), want=_params(os.path.join(tmp, 'reference')),
      unfinished=[n for n in os.listdir(
          train_checkpoint.checkpoint_dir(workdir)) if 'tmp' in n])


def _read_only(tmp, data):
  workdir = os.path.join(tmp, 'w')
  _mount(os.path.join(workdir, 'checkpoints'), 'ro,size=1m')
  return _run(workdir, data + SHORT)


def _finished_and_tools(tmp, root):
  """The warnings row; its finished workdir then serves export and
  predict --output into folders that do not exist yet."""
  workdir = os.path.join(tmp, 'w')
  result = _run(workdir, [f'--config.dataset={root}', *TINY,
                          '--config.batch=64', '--config.total_steps=2'])
  tools = {}
  for name, command in (
      ('export', ['vit_jax.interop.export', f'--workdir={workdir}',
                  f'--output={tmp}/new/dir/model.npz']),
      ('predict', ['vit_jax.predict', f'--workdir={workdir}',
                   f'{root}/train/a/0.png', f'--output={tmp}/new/p/out.txt'])):
    tools[name] = subprocess.run([sys.executable, '-m', *command], cwd=REPO,
                                 env=_env(), capture_output=True, text=True,
                                 timeout=300)
  return result, tools


def _unmount_all(root):
  for line in open('/proc/mounts').read().splitlines()[::-1]:
    point = line.split()[1]
    if point.startswith(str(root)):
      subprocess.run(['umount', point], check=False)


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  """name -> (CompletedProcess, extra) of every row, three at a time."""
  root = tmp_path_factory.mktemp('rows')
  two = _image_folder(str(root / 'two'), {'train': {'a': 24, 'b': 24},
                                          'test': {'a': 8, 'b': 8}})
  data = [f'--config.dataset={two}', *TINY]
  jobs = {
      'ctrl_c': lambda t: _signal_after_checkpoint(
          f'{t}/w', data + LONG, [signal.SIGINT]),
      'ctrl_c_twice': lambda t: _signal_after_checkpoint(
          f'{t}/w', data + LONG, [signal.SIGINT, signal.SIGINT]),
      'sigterm': lambda t: _signal_after_checkpoint(
          f'{t}/w', data + LONG, [signal.SIGTERM]),
      'workdir_in_use': lambda t: _in_use(t, data),
      'stale_lock': lambda t: _stale_lock(t, data),
      'disk_full': lambda t: _disk_full(t, data),
      'read_only': lambda t: _read_only(t, data),
      'oom_estimate': lambda t: _run(f'{t}/w', data[:1] + WIDE + [
          '--config.batch=20000', '--config.total_steps=2'], MEMORY_LIMIT),
      'oom_step': lambda t: _run(f'{t}/w', data[:1] + WIDE + [
          '--config.batch=4000', '--config.total_steps=2'], MEMORY_LIMIT),
      'empty_class': lambda t: _run(f'{t}/w', [f'--config.dataset={_image_folder(f"{t}/d", {"train": {"a": 4, "b": 0}, "test": {"a": 2, "b": 2}})}', *TINY]),  # noqa: E501
      'test_only_class': lambda t: _run(f'{t}/w', [f'--config.dataset={_image_folder(f"{t}/d", {"train": {"a": 4, "b": 4}, "test": {"a": 2, "c": 2}})}', *TINY]),  # noqa: E501
      'untested_class_small_split': lambda t: _finished_and_tools(
          t, _image_folder(f'{t}/d', {'train': {'a': 20, 'b': 20},
                                      'test': {'a': 4}})),
  }

  def run(name):
    folder = root / name
    folder.mkdir()
    try:
      out = jobs[name](str(folder))
    except pytest.skip.Exception as e:
      return e
    return out if isinstance(out, tuple) else (out, None)

  try:
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
      futures = {name: pool.submit(run, name) for name in jobs}
      return {name: f.result() for name, f in futures.items()}
  finally:
    _unmount_all(root)


def _got(results, name):
  got = results[name]
  if isinstance(got, BaseException):
    pytest.skip(str(got))
  return got


@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_one_answer(case, results):
  result, _ = _got(results, case.name)
  console = result.stdout + result.stderr
  assert result.returncode == case.code, console[-3000:]
  assert 'Traceback' not in console, console[-3000:]
  assert len(console.strip().splitlines()) <= case.max_lines, console
  flat = console.replace('\n', ' ')
  for words in case.words:
    assert words in flat, console


def test_troubleshooting_page_holds_the_table():
  with open(os.path.join(REPO, 'docs', 'troubleshooting.md')) as f:
    page = f.read()
  assert markdown_table(CASES) in page, (
      'docs/troubleshooting.md is out of date: paste the output of '
      '`python tests/test_interruptions.py`.')


def test_full_disk_resume_equals_uninterrupted(results):
  result, extra = _got(results, 'disk_full')
  assert 'Checkpoint step 20 cannot be written' in result.stderr
  resumed, reference = extra['resumed'], extra['reference']
  assert resumed.returncode == 0 and reference.returncode == 0, (
      resumed.stderr + reference.stderr)
  assert extra['start_step'] == 10 and not extra['unfinished']
  got, want = extra['got'], extra['want']
  assert got.keys() == want.keys()
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_second_ctrl_c_keeps_the_intact_step(results):
  result, _ = _got(results, 'ctrl_c_twice')
  steps = [int(n) for n in _steps(result.args[3].split('=', 1)[1])
           if n.isdigit()]
  assert steps and f'step {max(steps)} on disk is intact' in result.stderr


def test_export_and_predict_create_missing_folders(results):
  _, tools = _got(results, 'untested_class_small_split')
  for name, tool in tools.items():
    assert tool.returncode == 0, (name, tool.stderr)
  root = os.path.dirname(tools['export'].args[-1].split('=', 1)[1])
  assert os.path.isfile(os.path.join(root, 'model.npz'))
  with open(os.path.join(os.path.dirname(root), 'p', 'out.txt')) as f:
    text = f.read()
  assert text == tools['predict'].stdout


if __name__ == '__main__':
  print(markdown_table(CASES), end='')

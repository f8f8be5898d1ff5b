"""What people do to a running main job: each gets one clear answer.

CASES is the table (docs/troubleshooting.md holds it, with the rows of
tests/test_user_errors.py): each row runs the real command line
(`python -m vit_jax.main`, a tiny model on a 2-class image folder) in a
subprocess and pins the exit status, a console without a traceback, at most
15 lines (30 for a run that finishes and prints its closing lines), and the
words that name the cause.

Every start costs seconds of imports, so one workdir serves most rows, one
run after the other with the same command (CHAIN): the disk fills up while
it saves (a 300 kB tmpfs the test mounts over the workdir, remounted larger
afterwards; root only, the chain is skipped without it), the resumed run is
found in use by a second run and stopped by SIGTERM, the next by Ctrl-C, the
next by Ctrl-C twice while it saves; the last start takes over a lock left
by a run that is gone and finishes with the parameters of an uninterrupted
run. Its image folder lacks a test class and has fewer images than one
batch, so each start also prints the two data warnings. Out of memory runs
under `RLIMIT_AS`: once refused by the estimate before the first step, once
a real allocation failure in the step.
"""

import collections
import concurrent.futures
import json
import os
import resource
import signal
import subprocess
import time

import numpy as np
from PIL import Image
import pytest

import compile_settings
import preloaded
from test_user_errors import markdown_table
from vit_jax.checkpoints import export
from vit_jax.checkpoints import train_checkpoint
from vit_jax.checkpoints import trees
from vit_jax.guards import workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    '--config.model.hidden_size=16', '--config.model.transformer.mlp_dim=16',
    '--config.model.transformer.num_layers=1',
    '--config.model.transformer.num_heads=2', '--config.batch=16',
    '--config.batch_eval=64', '--config.warmup_steps=1',
    '--config.eval_every=1000', '--config.prefetch=0',
    '--config.pp.augment=none'
]
# A save every 10 steps, a progress line every 20; 100 steps leave the
# signals a margin of 60 steps after the checkpoint they wait for.
CHAIN = TINY + [
    '--config.total_steps=100', '--config.checkpoint_every=10',
    '--config.log_every=20'
]
# RLIMIT_AS of the out-of-memory rows: a bit over what the interpreter with
# JAX and TensorFlow maps (about 3 GB).
MEMORY_LIMIT = 6 << 30
# The whole batch in one piece (the main job splits it in 4 micro-batches).
WIDE = [
    '--config.model.transformer.mlp_dim=1024', '--config.warmup_steps=1',
    '--config.accum_steps=1'
]

# max_lines: a run that finishes prints its closing lines (about 20).
Case = collections.namedtuple(
    'Case', 'name did words fix code max_lines', defaults=(15,))
CASES = [
    Case('ctrl_c', 'Ctrl-C (SIGINT) during training', [
        'Interrupted by Ctrl-C after step', 'To resume, run the same '
        'command'
    ], 'run the printed command: it resumes from that step', 130),
    Case(
        'ctrl_c_twice', 'Ctrl-C again while the checkpoint is being saved',
        ['Ctrl-C again', 'on disk is intact'],
        'run the same command: it resumes from the intact step (the '
        'unfinished one is removed)', 130),
    Case('sigterm', 'SIGTERM (preemption, `kill`) during training', [
        'Interrupted by SIGTERM after step', 'To resume, run the same '
        'command'
    ], 'run the printed command: it resumes from that step', 143),
    Case('workdir_in_use', 'a second run on a workdir a run is using',
         ['is in use by another run: PID', 'choose another --workdir'],
         'wait for the first run, stop it, or choose another `--workdir`', 2),
    Case(
        'stale_lock', 'a workdir whose run is gone (kill -9, reboot) '
        'without releasing its lock',
        ['Taking over the lock of a run that '
         'is gone'], 'nothing: the run takes the lock over and goes on', 0, 30),
    Case(
        'disk_full', 'a disk that fills up while a checkpoint is saved '
        '(also a quota)', [
            'the disk is full', 'one checkpoint of this run '
            'takes about', 'The newest intact checkpoint is '
            'step 10'
        ], 'free space, then run the printed command: it resumes from that '
        'step', 1),
    Case('read_only', 'a checkpoint folder on a read-only file system',
         ['the file system is read-only', 'No checkpoint was saved'],
         'give the run a `--workdir` it can write', 1),
    Case(
        'oom_estimate', 'a batch that obviously cannot fit in memory', [
            'Out of memory before the first step', 'images per device',
            'needs at least', '--config.accum_steps'
        ], 'lower `--config.batch`, raise `--config.accum_steps`, a smaller '
        'model or bfloat16', 1),
    Case(
        'oom_step', 'a train step that runs out of memory', [
            'Out of memory: the train step tried to allocate',
            'images per device', '--config.accum_steps'
        ], 'lower `--config.batch`, raise `--config.accum_steps`, a smaller '
        'model or bfloat16', 1),
    Case(
        'class_without_training_images', 'an image-folder class without '
        'training images: an empty folder, or a class only the test split '
        'has', [
            "Class folder(s) ['b', 'c'] of image folder",
            "have no images in the 'train' split"
        ], 'add training images of them, or remove their folders', 1),
    Case(
        'untested_class_small_split', 'a train class the test split lacks; '
        'a train split smaller than one batch', [
            "Warning: Class(es) ['b']", "no images in the 'test' split",
            'fewer than one batch'
        ],
        'warnings: training goes on; add test images, lower `--config.batch`',
        0, 30),
]
ROWS = {c.name: c for c in CASES}


def _image_folder(root, splits):
  """`root/<split>/<class>/<i>.png`: 28x28 images, one colour per class."""
  for split, counts in splits.items():
    for index, (name, n) in enumerate(counts.items()):
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      rng = np.random.default_rng(index)
      for i in range(n):
        pixels = (rng.integers(0, 60,
                               (28, 28, 3)) + 150 * index).astype(np.uint8)
        Image.fromarray(pixels).save(
            os.path.join(root, split, name, f'{i}.png'))
  return root


def _command(workdir, args):
  return preloaded.command(_env(), '-m', 'vit_jax.main', f'--workdir={workdir}',
                           *args)


def _env():
  env = dict(os.environ, XLA_FLAGS=compile_settings.xla_flags(1))
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)
  return env


def _run(workdir, args, limit=None):
  preexec = (lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
             if limit else None)
  return subprocess.run(
      _command(workdir, args),
      cwd=REPO,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=300,
      preexec_fn=preexec)


def _start(workdir, args):
  return subprocess.Popen(
      _command(workdir, args),
      cwd=REPO,
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True)


def _done(process):
  out, err = process.communicate(timeout=300)
  return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _wait_for(predicate, process, timeout=240, every=0.01):
  deadline = time.time() + timeout
  while not predicate():
    assert process.poll() is None, process.communicate()
    assert time.time() < deadline, 'timed out'
    time.sleep(every)


def _folders(workdir):
  folder = train_checkpoint.checkpoint_dir(workdir)
  return os.listdir(folder) if os.path.isdir(folder) else []


def _complete(workdir):
  return sorted(int(n) for n in _folders(workdir) if n.isdigit())


def _unfinished(workdir):
  return [n for n in _folders(workdir) if 'tmp' in n]


def _stop(workdir, args, signals, while_running=None):
  """Starts the chain's command (resuming), calls `while_running` once its
  lock is taken, sends `signals[0]` once it saved a step newer than the one
  it resumed from and the rest as soon as a save is being written."""
  known = max(_complete(workdir))
  process = _start(workdir, args)
  extra = None
  if while_running:
    lock = os.path.join(workdir, workdir_lock.LOCK_FILE)
    _wait_for(lambda: os.path.exists(lock) and os.path.getsize(lock), process)
    extra = while_running()
  _wait_for(lambda: max(_complete(workdir)) > known, process)
  process.send_signal(signals[0])
  for sig in signals[1:]:
    # A save lasts milliseconds: looked for every millisecond.
    _wait_for(lambda: _unfinished(workdir), process, every=0.001)
    process.send_signal(sig)
  return _done(process), extra


def _mount(path, options):
  os.makedirs(path, exist_ok=True)
  result = subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', path],
      capture_output=True,
      text=True)
  if result.returncode:
    pytest.skip(f'cannot mount a tmpfs: {result.stderr.strip()}')


def _params(workdir):
  return trees.flatten_tree(
      train_checkpoint.TrainCheckpoints(workdir).restore_params())


def _chain(tmp, root):
  """The rows of one workdir, one start after the other (module docstring);
  then export of the finished run into a folder that does not exist (in
  this process; the command line of export: tests/test_main_job.py)."""
  args = [f'--config.dataset={root}', *CHAIN]
  reference = _run(f'{tmp}/reference', args)  # compiles for all the others
  workdir = f'{tmp}/w'
  _mount(workdir, 'size=300k')
  rows = dict(disk_full=_run(workdir, args))
  extra = dict(
      reference=reference,
      after_disk_full=_complete(workdir),
      unfinished=_unfinished(workdir))
  subprocess.run(['mount', '-o', 'remount,size=16m', workdir], check=True)
  rows['sigterm'], rows['workdir_in_use'] = _stop(workdir, args,
                                                  [signal.SIGTERM],
                                                  lambda: _run(workdir, args))
  rows['ctrl_c'], _ = _stop(workdir, args, [signal.SIGINT])
  rows['ctrl_c_twice'], _ = _stop(workdir, args, [signal.SIGINT] * 2)
  extra['intact'] = _complete(workdir)
  # The quick exit of a second Ctrl-C released the lock too.
  extra['lock_left'] = os.path.exists(
      os.path.join(workdir, workdir_lock.LOCK_FILE))
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), 'w') as f:
    json.dump(dict(host='h', pid=2**22 + 7, started=0, command='x'), f)
  rows['stale_lock'] = rows['untested_class_small_split'] = _run(workdir, args)
  with open(os.path.join(workdir, 'summary.json')) as f:
    extra['start_step'] = json.load(f)['start_step']
  extra['got'], extra['want'] = _params(workdir), _params(f'{tmp}/reference')
  output = f'{tmp}/new/dir/model.npz'
  extra['export'] = (export.export(workdir, output), output,
                     os.listdir(os.path.dirname(output)))
  return {name: (result, extra) for name, result in rows.items()}


def _errors(tmp, two):
  """The rows that stop before the first step or in it."""
  classes = _image_folder(f'{tmp}/classes', {
      'train': {
          'a': 4,
          'b': 0
      },
      'test': {
          'a': 2,
          'c': 2
      }
  })
  rows = {
      'class_without_training_images':
          _run(f'{tmp}/classes_w', [f'--config.dataset={classes}', *TINY]),
      'oom_estimate':
          _run(f'{tmp}/oom_estimate', [
              f'--config.dataset={two}', *WIDE, '--config.batch=20000',
              '--config.total_steps=2'
          ], MEMORY_LIMIT),
      'oom_step':
          _run(f'{tmp}/oom_step', [
              f'--config.dataset={two}', *WIDE, '--config.batch=4000',
              '--config.total_steps=2'
          ], MEMORY_LIMIT),
  }
  rows = {name: (result, None) for name, result in rows.items()}
  try:
    _mount(f'{tmp}/read_only/checkpoints', 'ro,size=1m')
    rows['read_only'] = (_run(f'{tmp}/read_only',
                              [f'--config.dataset={two}', *CHAIN]), None)
  except pytest.skip.Exception as e:
    rows['read_only'] = e
  return rows


def _unmount_all(root):
  for line in open('/proc/mounts').read().splitlines()[::-1]:
    point = line.split()[1]
    if point.startswith(str(root)):
      subprocess.run(['umount', point], check=False)


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  """name -> (CompletedProcess, extra) of every row, or the reason it was
  skipped; the chain and the other rows side by side."""
  root = tmp_path_factory.mktemp('rows')
  # No test image of class b; 12 training images, fewer than a batch of 16.
  chain_data = _image_folder(
      str(root / 'chain_data'), {
          'train': {
              'a': 6,
              'b': 6
          },
          'test': {
              'a': 4
          }
      })
  two = _image_folder(
      str(root / 'two'), {
          'train': {
              'a': 24,
              'b': 24
          },
          'test': {
              'a': 8,
              'b': 8
          }
      })

  def run(job, *args):
    try:
      return job(*args)
    except pytest.skip.Exception as e:
      return e

  try:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      chain = pool.submit(run, _chain, str(root / 'chain'), chain_data)
      errors = pool.submit(run, _errors, str(root / 'errors'), two)
      out = {}
      for future, names in ((chain, ('disk_full', 'sigterm', 'workdir_in_use',
                                     'ctrl_c', 'ctrl_c_twice', 'stale_lock',
                                     'untested_class_small_split')),
                            (errors,
                             ('class_without_training_images', 'read_only',
                              'oom_estimate', 'oom_step'))):
        got = future.result()
        out.update(got if isinstance(got, dict) else dict.fromkeys(names, got))
      return out
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


def test_interrupted_runs_end_like_an_uninterrupted_one(results):
  """A full disk, SIGTERM, Ctrl-C and Ctrl-C twice, each resumed by the same
  command: the last start ends with the parameters of a run never
  interrupted, bit for bit."""
  result, extra = _got(results, 'disk_full')
  assert 'Checkpoint step 20 cannot be written' in result.stderr
  assert extra['after_disk_full'] == [10] and not extra['unfinished']
  assert extra['reference'].returncode == 0, extra['reference'].stderr
  assert extra['start_step'] == extra['intact'][-1]
  got, want = extra['got'], extra['want']
  assert got.keys() == want.keys()
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_signals_stop_after_a_saved_step(results):
  """SIGTERM and Ctrl-C save the step they stop after; a second Ctrl-C
  names the step left intact, the newest complete one."""
  for name in ('sigterm', 'ctrl_c'):
    result, _ = _got(results, name)
    step = int(result.stdout.split('after step ')[1].split(';')[0])
    assert f'checkpoint {step} saved' in result.stdout
  result, extra = _got(results, 'ctrl_c_twice')
  assert f'step {extra["intact"][-1]} on disk is intact' in result.stderr
  assert not extra['lock_left']


def test_export_creates_missing_folders(results):
  _, extra = _got(results, 'stale_lock')
  step, output, files = extra['export']
  assert step == 100
  assert os.path.isfile(output) and files == ['model.npz']  # no .tmp left


if __name__ == '__main__':
  print(markdown_table(CASES), end='')

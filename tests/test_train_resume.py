"""Interrupted runs resume to the same parameters as an uninterrupted one.

One run is stopped by SIGTERM (it checkpoints and exits with 143), restarted,
killed with SIGKILL while an asynchronous save is being written, and
finished by a third start. Its final parameters must equal those of a run
that was never interrupted: data order and dropout keys are functions of
(seed, step). The same under FSDP on 2 devices, where each save is written
shard by shard.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from test_train import REPO
from test_train import read_summary
from test_train import tiny_config
from vit_jax import train
from vit_jax.checkpoints import train_checkpoint
from vit_jax.checkpoints import trees
from vit_jax.reporting import run_report

UNOPTIMIZED_XLA = True  # conftest.py: compiling costs more than running

TOTAL_STEPS = 300
# Shared by the in-process reference and the command-line runs.
OVERRIDES = {
    'model.model_name': 'tiny',
    'model.hidden_size': 16,
    'model.transformer.mlp_dim': 32,
    'model.transformer.num_heads': 2,
    'model.transformer.num_layers': 1,
    # Dropout on, so that the per-step keys matter.
    'model.transformer.dropout_rate': 0.1,
    'model_name': 'tiny',
    'batch': 32,
    'batch_eval': 500,
    'total_steps': TOTAL_STEPS,
    'warmup_steps': 10,
    'log_every': 1,
    'eval_every': 1000,
    'checkpoint_every': 10,
    'prefetch': 1,
}


def _start(workdir, overrides=None, devices=1):
  args = [f'--config.{k}={v}' for k, v in (overrides or OVERRIDES).items()]
  flags = (f'--xla_force_host_platform_device_count={devices}'
           if devices > 1 else '')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', XLA_FLAGS=flags)
  return subprocess.Popen([
      sys.executable, '-m', 'vit_jax.main',
      f'--config={os.path.join(REPO, "configs", "embedded.py")}:digits',
      f'--workdir={workdir}', *args
  ],
                          cwd=REPO,
                          env=env,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL,
                          text=True)


def _step_of(line):
  """The step of a progress line 'step  27/300  loss ...', else None."""
  words = line.split()
  if len(words) > 1 and words[0] == 'step' and '/' in words[1]:
    return int(words[1].split('/')[0])
  return None


def _wait_for_step(process, step):
  """Reads progress lines until `step` was printed; returns the lines."""
  lines = []
  for line in process.stdout:
    lines.append(line)
    if _step_of(line) is not None and _step_of(line) >= step:
      return lines
  raise AssertionError(f'Run ended before step {step}:\n{"".join(lines)}')


def _latest(workdir):
  return train_checkpoint.TrainCheckpoints(workdir).latest_step()


def _unfinished(workdir):
  """The temporary folders of saves being written (or cut short)."""
  folder = train_checkpoint.checkpoint_dir(workdir)
  return [
      n for n in (os.listdir(folder) if os.path.isdir(folder) else [])
      if '.orbax-checkpoint-tmp' in n
  ]


def _kill_during_save(process, workdir, after_step):
  """After `after_step`, kills the run (SIGKILL) as soon as a save is being
  written. Returns whether it was cut short: its temporary folder left."""
  _wait_for_step(process, after_step)
  while process.poll() is None and not _unfinished(workdir):
    time.sleep(0.0005)
  process.kill()
  process.wait(timeout=60)
  return bool(_unfinished(workdir))


def _kill_during_a_save(workdir, after_step, process=None, **start_kw):
  """Kills the run (`process`, or one started) during a save after
  `after_step`; starts it again when the save completed first."""
  for _ in range(3):
    process = process or _start(workdir, **start_kw)
    if _kill_during_save(process, workdir, after_step):
      return
    process, after_step = None, _latest(workdir) + 1
  raise AssertionError('No save was caught while being written.')


def test_sigterm_then_kill9_then_resume_equals_uninterrupted(tmp_path):
  reference = str(tmp_path / 'reference')
  summary = train.train_and_evaluate(tiny_config(**OVERRIDES), reference)
  assert summary['step'] == TOTAL_STEPS
  want = train_checkpoint.TrainCheckpoints(reference).restore_params()

  workdir = str(tmp_path / 'interrupted')
  # 1. SIGTERM: the run saves a checkpoint after the current step and exits
  # 143 (Ctrl-C likewise exits 130: tests/test_interruptions.py).
  process = _start(workdir)
  _wait_for_step(process, 25)
  process.send_signal(signal.SIGTERM)
  rest, _ = process.communicate(timeout=120)
  assert process.returncode == 143, rest
  assert 'Interrupted by SIGTERM after step' in rest
  stopped = int(rest.split('after step ')[1].split(';')[0])
  assert 25 <= stopped < TOTAL_STEPS
  assert _latest(workdir) == stopped  # not only the periodic one (20)

  # 2. SIGKILL while the resumed run writes a newer checkpoint: the step
  # being written never appears, so it restarts from the one before.
  process = _start(workdir)
  lines = _wait_for_step(process, stopped + 1)
  steps = [s for s in map(_step_of, lines) if s is not None]
  assert steps[0] == stopped + 1  # resumed, not restarted
  first_new = (stopped // 10 + 1) * 10
  _kill_during_a_save(workdir, first_new + 5, process)
  killed_at = _latest(workdir)  # the step being written is not there
  assert killed_at == stopped or first_new <= killed_at < TOTAL_STEPS
  assert not os.path.exists(os.path.join(workdir, run_report.SUMMARY_FILE))

  # 3. Finish with the same config; the cut-short save is cleaned up.
  summary = train.train_and_evaluate(tiny_config(**OVERRIDES), workdir)
  assert summary['start_step'] == killed_at and not _unfinished(workdir)
  assert read_summary(workdir)['step'] == TOTAL_STEPS
  got = train_checkpoint.TrainCheckpoints(workdir).restore_params()
  flat_want = trees.flatten_tree(want)
  flat_got = trees.flatten_tree(got)
  assert flat_got.keys() == flat_want.keys()
  for key, value in flat_want.items():
    np.testing.assert_allclose(
        flat_got[key], value, rtol=0, atol=1e-6, err_msg=key)


def test_fsdp_kill9_during_async_save_then_resume_equals_uninterrupted(
    tmp_path):
  """FSDP on 2 devices, a save every 5 steps: killed while one is being
  written, then resumed; ends where an uninterrupted run ends, bit for bit."""
  fsdp = dict(
      OVERRIDES,
      total_steps=40,
      checkpoint_every=5,
      log_every=1,
      parallelism='fsdp',
      fsdp_min_shard_size=256)
  reference = str(tmp_path / 'reference')
  uninterrupted = _start(reference, fsdp, devices=2)
  workdir = str(tmp_path / 'interrupted')
  _kill_during_a_save(workdir, 12, overrides=fsdp, devices=2)
  killed_at = _latest(workdir)
  assert killed_at % 5 == 0 and 5 <= killed_at < 40
  resumed = _start(workdir, fsdp, devices=2)
  for process in (uninterrupted, resumed):
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-3000:]
  assert read_summary(workdir)['start_step'] == killed_at
  assert not _unfinished(workdir)
  want = trees.flatten_tree(
      train_checkpoint.TrainCheckpoints(reference).restore_params())
  got = trees.flatten_tree(
      train_checkpoint.TrainCheckpoints(workdir).restore_params())
  assert got.keys() == want.keys()
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_unreadable_newest_step_is_moved_aside_and_the_run_resumes(tmp_path):
  """The newest step's data files truncated: the command resumes from
  the step before, names the unreadable step and where it went, keeps its
  files, and prints no traceback."""
  workdir = str(tmp_path / 'work')
  short = dict(
      OVERRIDES,
      total_steps=20,
      checkpoint_every=10,
      eval_every=20,
      log_every=10)
  train.train_and_evaluate(tiny_config(**short), workdir)
  ckpt_dir = train_checkpoint.checkpoint_dir(workdir)
  data = [
      os.path.join(root, name)
      for root, _, names in os.walk(os.path.join(ckpt_dir, '20'))
      for name in names
      if os.sep + 'd' + os.sep in root + os.sep
  ]
  assert data
  for path in data:  # every array data file of the step cut in half
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)

  args = [f'--config.{k}={v}' for k, v in dict(short, total_steps=30).items()]
  result = subprocess.run([
      sys.executable, '-m', 'vit_jax.main',
      f'--config={os.path.join(REPO, "configs", "embedded.py")}:digits',
      f'--workdir={workdir}', *args
  ],
                          cwd=REPO,
                          env=dict(os.environ, XLA_FLAGS=''),
                          capture_output=True,
                          text=True,
                          timeout=300)
  console = result.stdout + result.stderr
  assert result.returncode == 0, console[-3000:]
  assert 'Traceback' not in console, console[-3000:]
  moved = os.path.join(workdir, train_checkpoint.UNREADABLE_SUBDIR, '20')
  assert f'Checkpoint step 20 in {ckpt_dir} cannot be read' in console, (
      console[-3000:])
  assert f'moved to {moved}' in console
  assert console.count('cannot be read') == 1
  for path in data:  # kept, not deleted
    assert os.path.exists(
        os.path.join(moved, os.path.relpath(path, os.path.join(ckpt_dir,
                                                               '20'))))
  summary = read_summary(workdir)
  assert summary['start_step'] == 10 and summary['step'] == 30

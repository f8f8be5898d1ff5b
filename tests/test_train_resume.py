"""Interrupted runs resume to the same parameters as an uninterrupted one.

One command-line run under FSDP on 2 devices (each save written shard by
shard, asynchronously) is stopped by SIGTERM (it checkpoints and exits with
143), restarted, killed with SIGKILL while a save is being written, and
finished by a third start after the newest complete step's data files were
cut in half: that start names the unreadable step, moves it aside and
resumes from the step before. Its final parameters must equal, bit for bit,
those of a run that was never interrupted (started alongside): data order
and dropout keys are functions of (seed, step). Every start costs seconds of
imports, so one chain of starts checks all three (the single-device resume
after SIGTERM, Ctrl-C and a full disk: tests/test_interruptions.py).
"""

import os
import signal
import subprocess
import time

import numpy as np
import pytest

import compile_settings
import preloaded
from test_train import REPO
from test_train import read_summary
from vit_jax.checkpoints import train_checkpoint
from vit_jax.checkpoints import trees
from vit_jax.reporting import run_report

TOTAL_STEPS = 40
# Every start of the chain and its uninterrupted reference: a save every 5
# steps, a progress line every step.
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
    'checkpoint_every': 5,
    'prefetch': 1,
    'parallelism': 'fsdp',
    'fsdp_min_shard_size': 256,
}
DEVICES = 2


def _command(workdir, python=preloaded.command):
  return python(
      _env(), '-m', 'vit_jax.main',
      f'--config={os.path.join(REPO, "configs", "embedded.py")}:digits',
      f'--workdir={workdir}',
      *[f'--config.{k}={v}' for k, v in OVERRIDES.items()])


def _env():
  return dict(
      os.environ,
      TF_CPP_MIN_LOG_LEVEL='2',
      XLA_FLAGS=compile_settings.xla_flags(DEVICES))


def _start(workdir, python=preloaded.command):
  return subprocess.Popen(
      _command(workdir, python),
      cwd=REPO,
      env=_env(),
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


def _kill_during_a_save(workdir, after_step, process):
  """Kills the run (`process`, or one started) during a save after
  `after_step`; starts it again when the save completed first."""
  for _ in range(3):
    process = process or _start(workdir, preloaded.plain)
    if _kill_during_save(process, workdir, after_step):
      return
    process, after_step = None, _latest(workdir) + 1
  raise AssertionError('No save was caught while being written.')


def _params(workdir):
  return trees.flatten_tree(
      train_checkpoint.TrainCheckpoints(workdir).restore_params())


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
  """The interrupted chain of starts and its reference: what each left."""
  tmp = tmp_path_factory.mktemp('resume')
  reference = str(tmp / 'reference')
  uninterrupted = _start(reference)
  workdir = str(tmp / 'interrupted')
  out = {'workdir': workdir}
  # 1. SIGTERM: the run saves a checkpoint after the current step and exits
  # 143 (Ctrl-C likewise exits 130: tests/test_interruptions.py).
  process = _start(workdir)
  _wait_for_step(process, 12)
  process.send_signal(signal.SIGTERM)
  out['sigterm'], _ = process.communicate(timeout=120)
  out['sigterm_code'] = process.returncode
  out['after_sigterm'] = _latest(workdir)

  # 2. SIGKILL while the resumed run writes a newer checkpoint: the step
  # being written never appears, so it restarts from the one before.
  stopped = out['after_sigterm']
  # Its own interpreter: a SIGKILL reaches it at once, not through a
  # launcher (tests/preloaded.py).
  process = _start(workdir, preloaded.plain)
  lines = _wait_for_step(process, stopped + 1)
  out['resumed_at'] = [s for s in map(_step_of, lines) if s is not None][0]
  out['first_new'] = (stopped // 5 + 1) * 5
  # (Returns once a save was cut short: its temporary folder left.)
  _kill_during_a_save(workdir, out['first_new'] + 2, process)
  out['killed_at'] = _latest(workdir)  # the step being written is not there
  out['summary_after_kill'] = os.path.exists(
      os.path.join(workdir, run_report.SUMMARY_FILE))
  ckpt_dir = train_checkpoint.checkpoint_dir(workdir)
  out['before_killed'] = sorted(
      int(n) for n in os.listdir(ckpt_dir) if n.isdigit())[-2]

  # 3. The newest complete step's array data files cut in half.
  newest = os.path.join(ckpt_dir, str(out['killed_at']))
  out['data'] = [
      os.path.relpath(os.path.join(root, name), newest)
      for root, _, names in os.walk(newest)
      for name in names
      if os.sep + 'd' + os.sep in root + os.sep
  ]
  for path in out['data']:
    path = os.path.join(newest, path)
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)

  # 4. Finished by the same command.
  out['finish'] = subprocess.run(
      _command(workdir),
      cwd=REPO,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=300)
  uninterrupted.communicate(timeout=300)
  out['reference_code'] = uninterrupted.returncode
  out['want'], out['got'] = _params(reference), _params(workdir)
  return out


def test_sigterm_saves_the_step_it_stops_after(chain):
  assert chain['sigterm_code'] == 143, chain['sigterm']
  assert 'Interrupted by SIGTERM after step' in chain['sigterm']
  stopped = int(chain['sigterm'].split('after step ')[1].split(';')[0])
  assert 12 <= stopped < TOTAL_STEPS
  assert chain['after_sigterm'] == stopped  # not only the periodic one
  assert chain['resumed_at'] == stopped + 1  # resumed, not restarted


def test_kill9_during_a_save_leaves_the_step_before(chain):
  stopped, killed_at = chain['after_sigterm'], chain['killed_at']
  assert killed_at == stopped or chain['first_new'] <= killed_at < TOTAL_STEPS
  assert not chain['summary_after_kill']


def test_unreadable_newest_step_is_moved_aside_and_the_run_resumes(chain):
  """The newest step's data files truncated: the command resumes from
  the step before, names the unreadable step and where it went, keeps its
  files, cleans up the cut-short save and prints no traceback."""
  workdir, killed_at = chain['workdir'], chain['killed_at']
  result = chain['finish']
  console = result.stdout + result.stderr
  assert result.returncode == 0, console[-3000:]
  assert 'Traceback' not in console, console[-3000:]
  ckpt_dir = train_checkpoint.checkpoint_dir(workdir)
  moved = os.path.join(workdir, train_checkpoint.UNREADABLE_SUBDIR,
                       str(killed_at))
  assert f'Checkpoint step {killed_at} in {ckpt_dir} cannot be read' in (
      console), console[-3000:]
  assert f'moved to {moved}' in console
  assert console.count('cannot be read') == 1
  assert chain['data']
  for path in chain['data']:  # kept, not deleted
    assert os.path.exists(os.path.join(moved, path))
  assert not _unfinished(workdir)
  summary = read_summary(workdir)
  assert summary['start_step'] == chain['before_killed']
  assert summary['step'] == TOTAL_STEPS


def test_resumed_chain_equals_uninterrupted(chain):
  """SIGTERM, SIGKILL during a save and an unreadable step later, the
  parameters of the uninterrupted run, bit for bit."""
  assert chain['reference_code'] == 0
  want, got = chain['want'], chain['got']
  assert got.keys() == want.keys()
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)

"""Every mistake a user makes gets one clear paragraph (troubleshooting.md).

CASES is the table: each row runs the real command line (`python -m
vit_jax.main`, a tiny model) in a subprocess and pins the exit status, a
console without a traceback, its length, and the words that name the cause
and the fix. Config errors stop before any data is read (most before JAX
loads, in under a second). The troubleshooting page is
generated from the same table (`python tests/test_user_errors.py` prints it),
and a test checks that the page holds it. The last test kills one of two
training processes and resumes from the printed command.
"""

import collections
import concurrent.futures
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

import compile_settings
import preloaded

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, 'docs', 'troubleshooting.md')
TINY = [
    '--config.model.hidden_size=16', '--config.model.transformer.mlp_dim=16',
    '--config.model.transformer.num_layers=1',
    '--config.model.transformer.num_heads=2', '--config.batch=32',
    '--config.batch_eval=500', '--config.warmup_steps=1',
    '--config.total_steps=2', '--config.log_every=1', '--config.prefetch=0'
]
# `{tmp}` in a case's arguments is that case's temporary folder; `{workdir}`
# its workdir (`{tmp}/w` unless the case sets `workdir`).
Case = collections.namedtuple(
    'Case',
    'name did args code words fix workdir devices max_lines',
    defaults=(None, 1, 15))
CASES = [
    Case(
        'unknown_key', 'a config key that does not exist',
        ['--config.learning_rate=0.1'], 2,
        ['--config.learning_rate', 'Did you mean: base_lr'],
        'use a suggested key; every field is in the config file and '
        'vit_jax/configs/schema.py'),
    Case('unknown_nested_key', 'a misspelled key in a nested block',
         ['--config.model.transformer.num_head=3'], 2, [
             "config.model.transformer has no field 'num_head'",
             'model.transformer.num_heads'
         ], 'use the suggested key'),
    Case('missing_config_file', 'a config file that does not exist',
         ['--config=configs/no_such.py'], 2,
         ['configs/no_such.py does not exist'], 'pick a file of configs/'),
    Case(
        'workdir_is_file',
        '`--workdir` names a regular file', [],
        2, ['is a file, not a folder'],
        'choose a folder path',
        workdir='{tmp}/notes.txt'),
    Case(
        'workdir_not_writable', '`--workdir` that cannot be created or '
        'written', [],
        2, ['cannot be written', 'Not a directory'],
        'choose a folder you can write to',
        workdir='{tmp}/notes.txt/run'),
    Case('negative_lr', 'a negative learning rate', ['--config.base_lr=-1'], 2,
         ['config.base_lr=-1.0 must not be negative'], 'a value >= 0'),
    Case('negative_weight_decay', 'a negative weight decay',
         ['--config.weight_decay=-0.1'], 2,
         ['config.weight_decay=-0.1 must not be negative'], 'a value >= 0'),
    Case('zero_batch', 'a batch size below 1', ['--config.batch=0'], 2,
         ['config.batch=0 must be at least 1'], 'a value >= 1'),
    Case('zero_steps', 'a step count below 1', ['--config.total_steps=0'], 2,
         ['config.total_steps=0 must be at least 1'], 'a value >= 1'),
    Case(
        'batch_vs_devices',
        'a batch the device count does not divide', ['--config.batch=32'],
        2, ['config.batch=32 is not divisible by the 3 devices'],
        'a multiple of the device count',
        devices=3),
    Case(
        'mesh_vs_devices', 'a `mesh` (`parallelism=fsdp`) that does not '
        'fit the devices',
        ['--config.parallelism=fsdp', '--config.mesh.data=3'],
        2, [
            'config.mesh (data=3, fsdp=-1) does not fit the 4 devices',
            'data=3 does not divide the 4 devices', 'data x fsdp = 4'
        ],
        'sizes whose product is the device count, or -1 for one of them',
        devices=4),
    Case('image_vs_patch', 'an image size that is not a multiple of the patch',
         ['--config.pp.crop=30'], 2, [
             'not a multiple of the patch size',
             'set --config.pp.crop to a multiple'
         ], 'a multiple of the patch size'),
    Case('model_name', 'a `model_name` that is not the config\'s model',
         ['--config.model_name=ViT-B_17'], 2, [
             "config.model_name='ViT-B_17' is not the model this config trains",
             'does not choose the model'
         ], 'a config that builds the model, e.g. configs/finetune.py'),
    Case('classifier', 'an unknown `model.classifier`',
         ['--config.model.classifier=tokn'], 2, [
             "Unknown config.model.classifier='tokn' (did you mean 'token'?)",
             "one of ['token', 'gap', 'unpooled', 'token_unpooled']"
         ], 'one of the listed values'),
    Case('posemb', 'an unknown `model.posemb`',
         ['--config.model.posemb=sincos'], 2,
         ["Unknown config.model.posemb='sincos'", "'sincos2d'"],
         'one of the listed values'),
    Case('optimizer', 'an unknown `optimizer`', ['--config.optimizer=adam_w'],
         2, ["Unknown config.optimizer='adam_w'", "'adamw'"],
         'one of the listed values'),
    Case('dtype', 'an unknown `model.dtype`', ['--config.model.dtype=bf16'], 2,
         ["Unknown config.model.dtype='bf16'", "'bfloat16'"],
         'one of the listed values'),
    Case('process_id', 'a `--process_id` outside 0..n-1', [
        '--coordinator_address=127.0.0.1:1', '--num_processes=2',
        '--process_id=2'
    ], 2, ['the ids of a 2-process run are 0..1'],
         'give each process its own id'),
    Case('tfds_typo', 'a misspelled TFDS dataset name',
         ['--config.dataset=oxford_flowers103'], 2,
         ["Unknown dataset 'oxford_flowers103'", 'oxford_flowers102'],
         'a listed name, an image folder or embedded_mnist'),
    Case('pretrained_missing', 'a pre-trained file that does not exist',
         ['--config.pretrained_path={tmp}/ViT-B_16.npz'], 2, [
             'ViT-B_16.npz (from --config.pretrained_path) does not exist',
             'gsutil cp gs://vit_models/imagenet21k/ViT-B_16.npz'
         ], 'download it, or point at a file you have'),
    Case(
        'remote_without_filesystem', 'a `scheme://` path no installed '
        'package reads (e.g. gs:// without TensorFlow\'s GCS support)',
        ['--config.pretrained_path=s3://bucket/ViT-B_16.npz'], 2,
        ['no installed filesystem reads s3://'],
        'copy the file to a local disk or install the filesystem'),
    Case(
        'nan_before_checkpoint', 'a loss that becomes NaN before the first '
        'checkpoint', [
            '--config.base_lr=1e30', '--config.total_steps=3',
            '--config.checkpoint_every=100'
        ],
        1, ['The training loss is', 'no checkpoint was saved before it'],
        'lower base_lr, raise warmup_steps, set grad_norm_clip',
        max_lines=40),
]
# The multi-process rows, pinned by the tests at the end.
LOST_PROCESS = Case(
    'lost_process', 'one process of a multi-process run dies (kill -9, '
    'crash, preemption) or cannot be reached', [], 3, [
        'Process 1 of the 2-process run was lost',
        'The newest complete checkpoint on disk is step'
    ], 'run the printed command again on every process (each with its own '
    '--process_id): it resumes from that step')
SAME_PROCESS_ID = Case(
    'same_process_id', 'two processes given the same `--process_id`', [], 3,
    ['could not join the 2-process run', 'needs its own --process_id'],
    'give each process its own id in 0..n-1; the wait is --init_timeout_s')
OTHER_NUM_PROCESSES = Case(
    'other_num_processes', 'a process given another `--num_processes` than '
    'process 0', [], 2,
    ['was started with --num_processes=3', 'has 2 processes'],
    'give every process the same --num_processes')
_ABSL_LINE = re.compile(r'^[IWEF]\d{4} ', re.MULTILINE)
_NOISE = ('absl::InitializeLog', 'oneDNN', 'libtpu', 'fontManager')


def _env(devices=1):
  env = dict(os.environ)
  env['XLA_FLAGS'] = compile_settings.xla_flags(devices)
  for name in ('TF_CPP_MIN_LOG_LEVEL', 'JAX_COORDINATOR_ADDRESS',
               'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(name, None)
  return env


def _run_case(case, tmp):
  os.makedirs(tmp, exist_ok=True)
  with open(os.path.join(tmp, 'notes.txt'), 'w') as f:
    f.write('not a folder\n')
  workdir = (case.workdir or '{tmp}/w').format(tmp=tmp)
  args = [a.format(tmp=tmp) for a in TINY + case.args]
  env = _env(case.devices)
  result = subprocess.run(
      preloaded.command(env, '-m', 'vit_jax.main', f'--workdir={workdir}',
                        *args),
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300)
  return result, workdir


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  """Every case's (result, workdir), run three at a time."""
  root = tmp_path_factory.mktemp('cases')
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    futures = {
        c.name: pool.submit(_run_case, c, str(root / c.name)) for c in CASES
    }
    return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_one_paragraph(case, results):
  result, _ = results[case.name]
  console = result.stdout + result.stderr
  assert result.returncode == case.code, console[-3000:]
  assert 'Traceback' not in console, console[-3000:]
  assert console.count('Error:') == 1, console[-3000:]
  assert not _ABSL_LINE.search(console), console[-3000:]
  assert not [n for n in _NOISE if n in console], console[-3000:]
  assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
  assert len(console.strip().splitlines()) < case.max_lines, console
  error = result.stderr.replace('\n', ' ')
  for words in case.words:
    assert words in error, result.stderr
  assert result.stderr.rstrip().splitlines()[-1].startswith(
      '(--traceback shows where it happened.)'), result.stderr


def test_traceback_in_log_file_and_verbose(results, tmp_path):
  result, workdir = results['negative_lr']
  log = os.path.join(workdir, 'log.txt')
  assert f'The full traceback is in {log}' in result.stderr
  with open(log) as f:
    text = f.read()
  assert 'Traceback (most recent call last)' in text
  assert 'ConfigError: config.base_lr=-1.0' in text
  # --verbose: the library log lines are on the console again. (A batch the
  # devices do not divide is found after JAX starts, which logs.)
  verbose = subprocess.run(
      preloaded.command(
          _env(3), '-m', 'vit_jax.main', f'--workdir={tmp_path}', '--verbose',
          '--config.batch=32'),
      cwd=REPO,
      env=_env(3),
      capture_output=True,
      text=True,
      timeout=300)
  assert verbose.returncode == 2
  assert _ABSL_LINE.search(verbose.stderr), verbose.stderr


def markdown_table(cases) -> str:
  """A table of docs/troubleshooting.md, from rows with did, words, fix and
  code (also tests/test_interruptions.py's)."""
  lines = [
      '| what you did | the error names | what to do | exit |',
      '|---|---|---|---|'
  ]
  for case in cases:
    names = ' ... '.join(w.replace('|', '\\|') for w in case.words)
    lines.append(f'| {case.did} | {names} | {case.fix} | {case.code} |')
  return '\n'.join(lines) + '\n'


def troubleshooting_table() -> str:
  """The table of docs/troubleshooting.md, from CASES."""
  return markdown_table(CASES +
                        [LOST_PROCESS, SAME_PROCESS_ID, OTHER_NUM_PROCESSES])


def test_troubleshooting_page_holds_the_table():
  with open(DOC) as f:
    page = f.read()
  assert troubleshooting_table() in page, (
      'docs/troubleshooting.md is out of date: paste the output of '
      '`python tests/test_user_errors.py`.')


# ------------------------------------------------------------ two processes


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(args, i, log):
  return subprocess.Popen(
      [sys.executable, '-m', 'vit_jax.main', *args, f'--process_id={i}'],
      cwd=REPO,
      env=_env(1),
      stdout=log,
      stderr=subprocess.PIPE,
      text=True)


def _wait_for_checkpoint(directory, at_least, processes, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = [
        int(n)
        for n in (os.listdir(directory) if os.path.isdir(directory) else [])
        if n.isdigit()
    ]
    if steps and max(steps) >= at_least:
      return
    assert all(p.poll() is None for p in processes), 'a process ended early'
    time.sleep(0.2)
  raise AssertionError(f'no checkpoint {at_least} in {directory}')


def test_lost_process_names_it_and_the_command_resumes(tmp_path):
  heartbeat = 10
  workdir = str(tmp_path / 'w')
  args = [
      f'--workdir={workdir}', *TINY, '--config.total_steps=40',
      '--config.checkpoint_every=5', '--config.log_every=5',
      f'--coordinator_address=127.0.0.1:{_free_port()}', '--num_processes=2',
      f'--heartbeat_timeout_s={heartbeat}'
  ]
  with open(tmp_path / 'out.txt', 'w') as log:
    procs = [_start(args, i, log) for i in range(2)]
    _wait_for_checkpoint(os.path.join(workdir, 'checkpoints'), 5, procs)
    # One lock for the run, held by process 0; another run is refused.
    with open(os.path.join(workdir, '.run.lock')) as f:
      assert json.load(f)['pid'] == procs[0].pid
    other = subprocess.run(
        preloaded.command(_env(), '-m', 'vit_jax.main', f'--workdir={workdir}',
                          *TINY),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120)
    assert other.returncode == 2 and (
        f'is in use by another run: PID {procs[0].pid}' in other.stderr), (
            other.stderr)
    procs[1].send_signal(signal.SIGKILL)
    t_kill = time.time()
    _, err = procs[0].communicate(timeout=heartbeat + 30)
    procs[1].communicate()
  assert time.time() - t_kill < heartbeat, err
  assert procs[0].returncode == 3, err
  assert 'Traceback' not in err and '***' not in err, err
  assert len(err.strip().splitlines()) <= 4, err
  for words in LOST_PROCESS.words:
    assert words in err, err
  step = int(
      re.search(r'newest complete checkpoint on disk is step (\d+)',
                err).group(1))
  assert step >= 5, err
  command = err.strip().splitlines()[-1].strip()
  assert command.startswith('python -m vit_jax.main ') and ('--process_id=0'
                                                            in command), err
  # The printed command (and its twin for process 1) resumes from that step.
  argv = shlex.split(command)[3:]
  with open(tmp_path / 'out2.txt', 'w') as log:
    procs = [
        _start([a for a in argv if not a.startswith('--process_id')], i,
               log) for i in range(2)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], errs
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['start_step'] == step and summary['step'] == 40


def test_same_process_id_twice_says_so_and_exits(tmp_path):
  timeout = 5
  args = [
      f'--workdir={tmp_path / "w"}', *TINY,
      f'--coordinator_address=127.0.0.1:{_free_port()}', '--num_processes=2',
      f'--init_timeout_s={timeout}'
  ]
  start = time.time()
  procs = [_start(args, 0, subprocess.DEVNULL) for _ in range(2)]
  errs = [p.communicate(timeout=120)[1] for p in procs]
  assert time.time() - start < timeout + 60, errs
  for err in errs:
    assert 'Traceback' not in err and '***' not in err, err
    assert len(err.strip().splitlines()) <= 3, err
  # The second process 0 finds the workdir locked by the first, which then
  # waits for a process 1 that never comes.
  one_line = [err.replace('\n', ' ') for err in errs]
  by_code = {p.returncode: err for p, err in zip(procs, one_line)}
  assert sorted(by_code) == [2, 3], errs
  assert 'is in use by another run' in by_code[2], errs
  assert '--process_id=0' in by_code[2], errs
  for words in SAME_PROCESS_ID.words:
    assert words in by_code[3], errs


def test_other_num_processes_says_so_and_exits(tmp_path):
  args = [
      f'--workdir={tmp_path / "w"}', *TINY,
      f'--coordinator_address=127.0.0.1:{_free_port()}'
  ]
  first = _start(args + ['--num_processes=2'], 0, subprocess.DEVNULL)
  other = _start(args + ['--num_processes=3'], 1, subprocess.DEVNULL)
  err = other.communicate(timeout=120)[1]
  first.kill()
  first.communicate()
  assert other.returncode == 2, err
  assert 'Traceback' not in err and len(err.strip().splitlines()) <= 3, err
  for words in OTHER_NUM_PROCESSES.words:
    assert words in err, err


if __name__ == '__main__':
  print(troubleshooting_table(), end='')

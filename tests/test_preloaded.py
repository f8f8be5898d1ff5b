"""tests/preloaded.py: a preloaded command line behaves like the plain one."""

import os
import resource
import signal
import subprocess
import sys
import time

import preloaded

READY = 'import sys, time; print("ready", flush=True)\n'


def _run(code, *args, **kwargs):
  env = kwargs.pop('env', dict(os.environ))
  return subprocess.run(
      preloaded.command(env, '-c', code, *args),
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
      **kwargs)


def test_arguments_environment_folder_streams_and_status(tmp_path):
  code = ('import os, sys\n'
          'print(sys.argv, os.getcwd(), os.environ["PRELOADED_X"], '
          'sys.stdin.read(), sys.path[0] == "")\n'
          'print("to stderr", file=sys.stderr)\n'
          'sys.exit(3)')
  result = _run(
      code,
      'a',
      'b c',
      env=dict(os.environ, PRELOADED_X='x'),
      cwd=tmp_path,
      input='from stdin')
  assert result.returncode == 3, result.stderr
  assert result.stdout == (f"['-c', 'a', 'b c'] {tmp_path} x from stdin "
                           'True\n')
  assert result.stderr == 'to stderr\n'


def test_libraries_preloaded_and_vit_jax_imported_fresh():
  result = _run('import sys\n'
                'print(sorted({"jax", "tensorflow", "vit_jax"} & '
                'set(sys.modules)), "keras" in sys.modules)')
  assert result.stdout == "['jax', 'tensorflow'] False\n", result.stderr


def test_a_module_in_the_working_folder_runs_as_in_python(tmp_path):
  (tmp_path /
   'here.py').write_text('import sys\nprint(__name__, sys.argv, sys.path[0])\n')
  got, want = (
      subprocess.run(
          python(dict(os.environ), '-m', 'here', 'arg'),
          cwd=tmp_path,
          capture_output=True,
          text=True,
          timeout=120) for python in (preloaded.command, preloaded.plain))
  assert got.stdout == want.stdout == (
      f"__main__ ['{tmp_path}/here.py', 'arg'] {tmp_path}\n"), got.stderr


def test_uncaught_errors_end_as_in_python():
  error = _run('raise ValueError("wrong")')
  assert error.returncode == 1
  assert error.stderr == ('Traceback (most recent call last):\n'
                          '  File "<string>", line 1, in <module>\n'
                          'ValueError: wrong\n')
  interrupted = _run('raise KeyboardInterrupt')
  assert interrupted.returncode == -signal.SIGINT


def _started(code):
  """A process running `code`, once `code` printed 'ready'."""
  process = subprocess.Popen(
      preloaded.command(dict(os.environ), '-c', code),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True)
  assert process.stdout.readline() == 'ready\n'
  return process


def test_signals_reach_the_child():
  process = _started('import sys, time\n'
                     'try:\n'
                     '  print("ready", flush=True)\n'
                     '  time.sleep(60)\n'
                     'except KeyboardInterrupt:\n'
                     '  print("interrupted"); sys.exit(130)')
  process.send_signal(signal.SIGINT)
  assert process.communicate(timeout=30)[0] == 'interrupted\n'
  assert process.returncode == 130
  process = _started(READY + 'time.sleep(60)')
  process.send_signal(signal.SIGTERM)
  process.communicate(timeout=30)
  assert process.returncode == -signal.SIGTERM


def test_a_killed_launcher_takes_its_child(tmp_path):
  pid_file = tmp_path / 'pid'
  process = _started(f'import os; open({str(pid_file)!r}, "w")'
                     f'.write(str(os.getpid()))\n' + READY + 'time.sleep(60)')
  child = int(pid_file.read_text())
  assert child != process.pid
  process.kill()
  process.wait()
  deadline = time.time() + 10
  while os.path.exists(f'/proc/{child}') and time.time() < deadline:
    time.sleep(0.01)
  assert not os.path.exists(f'/proc/{child}')


def test_address_space_limit_applies_to_the_child():
  limit = 8 << 30

  def set_limit():
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

  result = _run(
      'import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0])',
      preexec_fn=set_limit)
  assert result.stdout == f'{limit}\n', result.stderr


def test_off_is_the_plain_command_line(monkeypatch):
  monkeypatch.setenv('VIT_JAX_TEST_PRELOAD', '0')
  assert preloaded.command({}, '-c', 'pass') == [sys.executable, '-c', 'pass']

"""Command lines of the tests, started from a preloaded interpreter.

A `python -m vit_jax.main` spends about 9 CPU seconds importing JAX,
TensorFlow, Flax and Orbax before it reads its flags, and 2 more tearing
them down at exit; the suite starts such commands dozens of times.
`command(env, '-m', 'vit_jax.main', ...)` returns a command line that
behaves like `[sys.executable, '-m', 'vit_jax.main', ...]` for `subprocess`
with `env=env`, but its process (the launcher, which imports nothing heavy)
asks a server that imported those libraries once to fork a child:

- the child takes the launcher's stdin, stdout and stderr, environment,
  working directory and address-space limit, then runs the module (or the
  `-c` code) as `__main__` with the given arguments: the same code as the
  real command line, after the same imports; it ends as the interpreter
  would, without the teardown of the imported modules;
- the launcher forwards the signals it gets (SIGINT, SIGTERM, ...) to the
  child and ends as the child ended (its exit status, or its signal);
- a launcher that dies (a timeout's SIGKILL) takes its child with it.

A server serves one environment, as far as the imports read it (`JAX_*`,
`TF_*`, ...; PYTHONPATH is applied in the child): one per such environment
and test process, started on first use and ending with that process.
Tests about the start itself (what it imports, its start-up noise on the
console, the PID it records) use the plain command line (`plain`).
`VIT_JAX_TEST_PRELOAD=0` turns them off (`command` is then the plain command
line). A child's CPU time counts under its server, not under the test.
"""

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types

# Variables that the preloaded libraries read when they are imported.
_IMPORT_TIME_ENV = ('JAX_', 'TF_', 'PYTHONHASHSEED', 'PYTHONHOME', 'MPL',
                    'OPENBLAS', 'OMP_')
# Read later (TensorFlow's C++ logging) or applied in the child.
_NOT_IMPORT_TIME = ('TF_CPP_MIN_LOG_LEVEL',)
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
              signal.SIGUSR1, signal.SIGUSR2)
# Not matplotlib: it reads MPLBACKEND when imported, and a notebook's
# kernel sets it (inline) after the fork.
_PRELOADED = ('absl.app', 'flax.linen', 'jax', 'ml_collections', 'optax',
              'orbax.checkpoint', 'PIL.Image', 'scipy.ndimage')
_servers = {}  # import-time environment -> socket path
_lock = threading.Lock()


def command(env, *args):
  """`[sys.executable, *args]` (`-m module ...` or `-c code ...`) to run with
  `env=env`, started from a preloaded server unless they are off."""
  if os.environ.get('VIT_JAX_TEST_PRELOAD', '1') == '0':
    return plain(env, *args)
  key = json.dumps(_import_time_env(env), sort_keys=True)
  with _lock:  # tests start commands from threads too
    if key not in _servers:
      _servers[key] = _start_server(env)
  return [sys.executable, os.path.abspath(__file__), _servers[key], *args]


def plain(env, *args):
  """`[sys.executable, *args]`: the signature of `command`, no server."""
  del env
  return [sys.executable, *args]


def _start_server(env):
  """Starts a server with `env`; returns its socket once it is bound."""
  path = os.path.join(tempfile.mkdtemp(prefix='preloaded-'), 'socket')
  # Its stdin is a pipe from this process: it ends when this one does.
  # Its own errors go to <socket>.log.
  with open(f'{path}.log', 'w') as log:
    process = subprocess.Popen([sys.executable, __file__, path, '--serve'],
                               env=env,
                               stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL,
                               stderr=log)
  for _ in range(1000):  # it binds its socket before the imports
    if os.path.exists(path) or process.poll() is not None:
      break
    time.sleep(0.01)
  return path


def _import_time_env(env):
  return {
      k: v
      for k, v in env.items()
      if k.startswith(_IMPORT_TIME_ENV) and k not in _NOT_IMPORT_TIME
  }


# ----------------------------------------------------------------- server


def _preload():
  """Imports what vit_jax's commands import; no JAX backend starts. vit_jax
  itself is imported again by each child, from the child's path (and
  `vit_jax.main`'s flags cannot be defined twice)."""
  import importlib  # pylint: disable=g-import-not-at-top
  for name in _PRELOADED:
    importlib.import_module(name)
  from vit_jax.data import tf_import  # pylint: disable=g-import-not-at-top
  tf_import.import_tensorflow()  # without Keras, as vit_jax imports it
  importlib.import_module('tensorflow_datasets')
  for name in list(sys.modules):
    if name.split('.')[0] == 'vit_jax':
      del sys.modules[name]


def _serve(path):
  """Forks a child per connection; reports each child's end to its
  launcher; kills the child of a launcher that is gone; ends on stdin EOF."""
  listener = socket.socket(socket.AF_UNIX)
  listener.bind(path)
  listener.listen(16)  # launchers wait in the queue while the imports run
  before = dict(os.environ)
  _preload()
  # What the imports set (TF_CPP_MIN_LOG_LEVEL, TF2_BEHAVIOR, ...).
  added = {k: v for k, v in os.environ.items() if k not in before}
  children = {}  # pid -> connection to its launcher
  while True:
    launchers = list(filter(None, children.values()))
    readable = select.select([listener, sys.stdin, *launchers], [], [], 0.05)[0]
    if sys.stdin in readable and not sys.stdin.buffer.read1(1):
      shutil.rmtree(os.path.dirname(path), ignore_errors=True)
      os._exit(0)  # pylint: disable=protected-access
    for pid, connection in list(children.items()):
      if connection in readable:  # the launcher never writes: it is gone
        os.kill(pid, signal.SIGKILL)
        connection.close()
        children[pid] = None
    if listener in readable:
      connection, _ = listener.accept()
      try:
        pid = _fork_child(connection, [listener, *launchers], before, added)
        children[pid] = connection
      except (OSError, ValueError):  # a launcher gone before it was served
        traceback.print_exc()
        connection.close()
    _report_ended(children)


def _report_ended(children):
  """Sends each ended child's wait status to its launcher."""
  for pid, connection in list(children.items()):
    done, status = os.waitpid(pid, os.WNOHANG)
    if not done:
      continue
    del children[pid]
    if connection:
      with connection, contextlib.suppress(OSError):
        connection.sendall(json.dumps({'status': status}).encode() + b'\n')


def _fork_child(connection, others, before, added):
  """Receives a launch, forks; returns the child's pid to the server."""
  head, fds, _, _ = socket.recv_fds(connection, 8, 3)
  size = int.from_bytes(head, 'big')
  data = b''
  while len(data) < size:
    more = connection.recv(size - len(data))
    if not more:
      raise ValueError('the launcher closed its connection')
    data += more
  launch = json.loads(data)
  sys.stdout.flush()
  sys.stderr.flush()
  pid = os.fork()
  if pid:
    for fd in fds:
      os.close(fd)
    with contextlib.suppress(OSError):  # a launcher gone: its child is killed
      connection.sendall(json.dumps({'pid': pid}).encode() + b'\n')
    return pid
  try:
    for item in (connection, *others):
      item.close()
    _become(launch, fds, before, added)  # does not return
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()  # on the launcher's stderr once dup2 ran
  os._exit(1)  # pylint: disable=protected-access


def _become(launch, fds, before, added):
  """In the child: the launcher's descriptors, environment (`before`: the
  server's before its imports, which `added` to it) and limits, then its
  program, ending the process as that program ends."""
  for target, fd in enumerate(fds):
    os.dup2(fd, target)
    os.close(fd)
  os.chdir(launch['cwd'])
  env = launch['env']
  argv = launch['argv']
  if _import_time_env(env) != _import_time_env(before):  # not for this server
    os.execve(sys.executable, [sys.executable, *argv], env)
  os.environ.clear()
  os.environ.update(added, **env)
  old, new = (_python_path(e) for e in (before, env))
  sys.path[1:] = new + [p for p in sys.path[1:] if p not in old]
  import resource  # pylint: disable=g-import-not-at-top
  resource.setrlimit(resource.RLIMIT_AS, tuple(launch['rlimit_as']))
  signal.signal(signal.SIGINT, signal.default_int_handler)
  _end_like_python(lambda: _run_program(argv))


def _end_like_python(program):
  """Runs `program` and ends the process as the interpreter would (its exit
  status, a traceback, SIGINT after an unhandled KeyboardInterrupt;
  non-daemon threads joined, atexit functions run, streams flushed), but
  without tearing down the imported modules: 2 s with TensorFlow and JAX."""
  import atexit  # pylint: disable=g-import-not-at-top
  code, signum = 0, None
  try:
    program()
  except SystemExit as e:  # None: 0; a number: itself; else printed, 1
    code = e.code or 0
    if not isinstance(code, int):
      print(code, file=sys.stderr)
      code = 1
  except BaseException as e:  # pylint: disable=broad-except
    tb = e.__traceback__
    while tb and tb.tb_frame.f_code.co_filename == __file__:
      tb = tb.tb_next  # the traceback starts in the program, as it would
    sys.excepthook(type(e), e, e.with_traceback(tb).__traceback__)
    code = 1
    signum = signal.SIGINT if isinstance(e, KeyboardInterrupt) else None
  for thread in threading.enumerate():
    if thread is not threading.main_thread() and not thread.daemon:
      thread.join()
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
  if signum:
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
  os._exit(code)  # pylint: disable=protected-access


def _python_path(env):
  return [
      os.path.abspath(p)
      for p in env.get('PYTHONPATH', '').split(os.pathsep)
      if p
  ]


def _run_program(argv):
  import runpy  # pylint: disable=g-import-not-at-top
  if argv[0] == '-m':
    sys.argv = [argv[1], *argv[2:]]
    sys.path[0] = os.getcwd()
    runpy.run_module(argv[1], run_name='__main__', alter_sys=True)
  else:
    assert argv[0] == '-c', argv
    sys.argv = ['-c', *argv[2:]]
    sys.path[0] = ''
    main = sys.modules['__main__'] = types.ModuleType('__main__')
    exec(compile(argv[1], '<string>', 'exec'), main.__dict__)  # pylint: disable=exec-used


# --------------------------------------------------------------- launcher


def _launch(path, argv):
  """Has the server run `argv`; forwards signals; ends like the child. Runs
  the plain command line if the server does not start it."""
  started = _start_child(path, argv)
  if not started:
    os.execv(sys.executable, [sys.executable, *argv])
  replies, pid = started
  for sig in _FORWARDED:
    signal.signal(sig, lambda signum, _: os.kill(pid, signum))
  line = replies.readline()
  if not line:
    sys.exit(f'tests/preloaded.py: the server of child {pid} is gone')
  status = json.loads(line)['status']
  if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
  os._exit(os.waitstatus_to_exitcode(status))  # pylint: disable=protected-access


def _start_child(path, argv):
  """(the server's replies, the child's pid), or None without a server."""
  import resource  # pylint: disable=g-import-not-at-top
  launch = dict(
      argv=argv,
      env=dict(os.environ),
      cwd=os.getcwd(),
      rlimit_as=resource.getrlimit(resource.RLIMIT_AS))
  client = socket.socket(socket.AF_UNIX)
  try:
    client.connect(path)
    data = json.dumps(launch).encode()
    socket.send_fds(client, [len(data).to_bytes(8, 'big')], [0, 1, 2])
    client.sendall(data)
    replies = client.makefile('rb')
    return replies, json.loads(replies.readline())['pid']
  except (OSError, ValueError):
    return None


if __name__ == '__main__':
  if sys.argv[2:] == ['--serve']:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _serve(sys.argv[1])
  else:
    _launch(sys.argv[1], sys.argv[2:])

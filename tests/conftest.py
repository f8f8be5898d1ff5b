"""Test-suite setup: compilation settings and the CPU log.

Many tests train the same tiny models, in this process and in the
subprocesses they start (command lines, several devices, several
processes). With JAX's persistent compilation cache each of those
computations is compiled once per run of the suite and loaded from disk
afterwards. The cache lives in `<repo>/.cache/xla_tests`; the controlling
pytest process empties it when a run starts, so every run starts cold and
its time is that of a fresh clone. Subprocesses inherit the setting through
the environment.

Every process compiles as `compile_settings` says (XLA's optimizations
off, the older fusion emitters, one XLA thread): set here in the environment
before JAX starts, inherited by the subprocesses; the main job's test, which
trains for hundreds of steps, keeps only the one thread.

Test files run longest first: with `-n 2 --dist loadfile` each file goes
whole to one worker, and a long file handed out last would keep one core
busy while the other has nothing left (pytest-xdist would otherwise order
files by their number of tests). `LONGEST_FIRST` lists the files that take
over 25 CPU seconds, longest first, from a `VIT_JAX_TEST_CPU_LOG` run; the
others follow in the usual order. The order changes when tests run, not
what they check.

Most command lines the tests start (`python -m vit_jax.main ...`,
`python -c ...`) go through `preloaded.command`: a server per test process
that imported JAX and TensorFlow once forks each of them (tests/preloaded.py).

`VIT_JAX_TEST_CPU_LOG=FILE` appends one line per test to FILE: its node id,
wall seconds, CPU seconds of the pytest process and of the subprocesses it
waited for, the pytest-xdist worker and the test's end time (tab-separated),
to find where the suite's time goes (a preloaded command's CPU time counts
under its server, in no test's line).
"""

import os
import shutil
import sys

import pytest

import compile_settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XLA_CACHE = os.path.join(REPO, '.cache', 'xla_tests')
LONGEST_FIRST = ('test_notebooks.py', 'test_user_errors.py',
                 'test_interruptions.py', 'test_multihost.py',
                 'test_main_job.py', 'test_train_options.py',
                 'test_speed_equivalence.py', 'test_train.py',
                 'test_train_finetune.py', 'test_predict_pipeline.py',
                 'test_train_resume.py', 'test_original_commands.py',
                 'test_sharding.py', 'test_bench.py', 'test_original_api.py',
                 'test_posemb_ablation.py', 'test_models.py',
                 'test_flowers_tutorial.py', 'test_accumulation.py')


def pytest_configure(config):
  if not os.environ.get('PYTEST_XDIST_WORKER'):  # the controller
    shutil.rmtree(XLA_CACHE, ignore_errors=True)
  os.makedirs(XLA_CACHE, exist_ok=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = XLA_CACHE
  # Cache every computation, however quick its compilation.
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ.update(compile_settings.ENV)
  if 'jax' in sys.modules:  # imported before this hook, e.g. by a plugin
    sys.modules['jax'].config.update('jax_disable_most_optimizations', True)
  flags = os.environ.get('XLA_FLAGS', '')
  if compile_settings.XLA_FLAGS not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {compile_settings.XLA_FLAGS}'.strip()
  if hasattr(config.option, 'loadscopereorder'):  # pytest-xdist
    config.option.loadscopereorder = False  # keep the order set below


def pytest_collection_modifyitems(items):
  """Orders the tests' files by LONGEST_FIRST (a stable sort)."""

  def rank(item):
    name = os.path.basename(str(item.path))
    return (LONGEST_FIRST.index(name)
            if name in LONGEST_FIRST else len(LONGEST_FIRST))

  items.sort(key=rank)


_CPU_LOG = os.environ.get('VIT_JAX_TEST_CPU_LOG')

if _CPU_LOG:
  import resource  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(item, nextitem):
    del nextitem

    def cpu():
      s = resource.getrusage(resource.RUSAGE_SELF)
      c = resource.getrusage(resource.RUSAGE_CHILDREN)
      return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime

    t0, (s0, c0) = time.time(), cpu()
    yield
    s1, c1 = cpu()
    with open(_CPU_LOG, 'a') as f:
      f.write(f'{item.nodeid}\t{time.time() - t0:.1f}\t{s1 - s0:.1f}\t'
              f'{c1 - c0:.1f}\t{os.environ.get("PYTEST_XDIST_WORKER", "-")}'
              f'\t{time.time():.1f}\n')

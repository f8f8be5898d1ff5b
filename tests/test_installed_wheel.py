"""The wheel: vit_jax alone at its top level, the experiment configs by name.

Builds the wheel from a copy of the sources (so the checkout gets no build/
folder), installs it with `pip install --no-deps --target` into a temporary
folder and, from another directory with only that folder on PYTHONPATH,
resolves `--config=<name>` to the shipped files and builds every experiment
config, including those that load a sibling file. No training: .ci/run runs
the main job from the installed wheel.
"""

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ('setup.py', 'pyproject.toml', 'vit_jax', 'configs')


def _offline_build_args():
  """`--no-build-isolation` where this Python can build the wheel itself
  (setuptools >= 70.1, or the `wheel` package); else pip fetches them."""
  if importlib.util.find_spec('setuptools') is None:
    return []
  import setuptools  # pylint: disable=g-import-not-at-top
  version = tuple(int(x) for x in setuptools.__version__.split('.')[:2])
  if version >= (70, 1) or importlib.util.find_spec('wheel') is not None:
    return ['--no-build-isolation']
  return []


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
  """(path of the built wheel, folder it is installed in)."""
  root = tmp_path_factory.mktemp('wheel')
  src = root / 'src'
  src.mkdir()
  for name in SOURCES:
    path = os.path.join(REPO, name)
    if os.path.isdir(path):
      shutil.copytree(
          path,
          src / name,
          ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    else:
      shutil.copy(path, src / name)
  pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check']
  subprocess.run([
      *pip, 'wheel', '--quiet', '--no-deps', *_offline_build_args(), '-w',
      str(root / 'dist'),
      str(src)
  ],
                 check=True,
                 timeout=300)
  [built] = glob.glob(str(root / 'dist' / 'vit_jax-*.whl'))
  site = root / 'site'
  subprocess.run(
      [*pip, 'install', '--quiet', '--no-deps', '--target',
       str(site), built],
      check=True,
      timeout=300)
  return built, str(site)


def _python(site, cwd, *args):
  """`python *args` in `cwd` with only `site` on PYTHONPATH."""
  return subprocess.run([sys.executable, *args],
                        cwd=cwd,
                        env=dict(os.environ, PYTHONPATH=site),
                        capture_output=True,
                        text=True,
                        timeout=300)


def test_top_level_is_vit_jax_alone(wheel):
  built, _ = wheel
  with zipfile.ZipFile(built) as f:
    entries = f.namelist()
  top = {e.split('/')[0] for e in entries}
  assert {t for t in top if not t.endswith('.dist-info')} == {'vit_jax'}
  configs = sorted(
      os.path.basename(p)
      for p in glob.glob(os.path.join(REPO, 'configs', '*.py')))
  shipped = sorted(
      os.path.basename(e)
      for e in entries
      if e.startswith('vit_jax/experiment_configs/'))
  assert shipped == configs


def test_configs_by_name_from_the_installed_package(wheel, tmp_path):
  _, site = wheel
  result = _python(
      site, str(tmp_path), '-c',
      textwrap.dedent(f"""
      import os
      from ml_collections import config_flags
      import vit_jax
      from vit_jax.configs import experiments
      site = {site!r}
      assert vit_jax.__file__.startswith(site), vit_jax.__file__
      shipped = os.path.join(site, 'vit_jax', 'experiment_configs')
      assert experiments.folder() == shipped, experiments.folder()
      assert 'embedded' in experiments.names(), experiments.names()
      for spec, path, arg in [
          ('embedded', 'embedded.py', ''),
          ('flowers.py:tutorial', 'flowers.py', ':tutorial'),
          ('finetune:b16,cifar10', 'finetune.py', ':b16,cifar10'),
          ('configs/imagenet21k.py:s16', 'imagenet21k.py', ':s16')]:
        resolved = experiments.resolve(spec)
        assert resolved == os.path.join(shipped, path) + arg, resolved
        config = config_flags.config_flags.ConfigFileFlagParser(
            'config').parse(resolved)
        assert config.model is not None, spec
      # Configs that load a sibling file (embedded.py, finetune.py).
      for spec in ('embedded_finetune', 'embedded_pretrain', 'embedded_mpp',
                   'imagenet1k'):
        config_flags.config_flags.ConfigFileFlagParser('config').parse(
            experiments.resolve(spec))
      print('ok')
      """))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == 'ok'


def test_unknown_name_lists_the_configs(wheel, tmp_path):
  _, site = wheel
  result = _python(site, str(tmp_path), '-m', 'vit_jax.main',
                   '--config=embeded', f'--workdir={tmp_path / "w"}')
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Config 'embeded' is neither a file nor an experiment config" in (
      result.stderr)
  assert 'embedded, embedded_finetune' in result.stderr
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'w')

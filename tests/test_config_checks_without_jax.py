"""A config value that cannot work is reported before JAX loads.

`validation.check_values` reads the valid values from
`vit_jax.configs.choices`, plain Python; `python -m vit_jax.main` runs it
before it imports JAX, and the device checks after.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from vit_jax.configs import choices
from vit_jax.layers import block_stack
from vit_jax.training import objectives

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARIES = ('jax', 'flax', 'tensorflow')

_CHECK = textwrap.dedent("""
    import sys
    from configs import embedded
    from vit_jax.run_config import validation
    config = embedded.get_config()
    {change}
    try:
      validation.check_values(config)
      print('no error')
    except validation.ConfigError as e:
      print('ConfigError:', e)
    print('loaded:', [m for m in {libraries!r} if m in sys.modules])
    """)


def _run(*args):
  return subprocess.run([sys.executable, *args],
                        cwd=REPO,
                        capture_output=True,
                        text=True,
                        timeout=120,
                        check=False)


@pytest.mark.parametrize('change, words', [
    ("config.model.classifier = 'tokn'", "Unknown config.model.classifier"),
    ("config.model.posemb_where = 'every_layer'; config.model.posemb = "
     "'sincos2d'", "posemb_where='every_layer' places a learned table"),
    ("config.trainable = '('", 'is not a valid regular expression'),
    ("config.pp.crop = 30", 'not a multiple of the patch size'),
    ("config.model_name = 'ViT-B_16'", 'is not the model this config trains'),
])
def test_check_values_imports_no_jax(change, words):
  result = _run('-c', _CHECK.format(change=change, libraries=LIBRARIES))
  assert result.returncode == 0, result.stderr
  assert 'ConfigError: ' in result.stdout and words in result.stdout, (
      result.stdout)
  assert 'loaded: []' in result.stdout, result.stdout


def test_main_reports_a_bad_value_before_importing_jax(tmp_path):
  result = _run('-X', 'importtime', '-m', 'vit_jax.main',
                f'--workdir={tmp_path}', '--config.model.classifier=tokn')
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'Unknown config.model.classifier' in result.stderr
  # Once the log file is set up, stderr (and so -X importtime) goes there.
  with open(tmp_path / 'log.txt') as f:
    lines = (result.stderr + f.read()).splitlines()
  imported = {
      line.rsplit('|', 1)[1].strip()
      for line in lines
      if line.startswith('import time:')
  }
  assert 'vit_jax.run_config.validation' in imported
  assert not [m for m in imported if m.split('.')[0] in LIBRARIES]


def test_the_names_match_what_the_modules_build():
  assert choices.REMAT_POLICY_NAMES == tuple(block_stack.REMAT_POLICIES)
  assert choices.LOSS_NAMES == tuple(objectives.LOSSES)

"""The experiment configs of `configs/`: found by name, loaded by path.

In a checkout they are the files of `configs/` at the repository root; the
wheel ships the same files as `vit_jax/experiment_configs/` (setup.py). So
`--config=embedded` (or `flowers:tutorial`, `NAME[:ARG]`) names the same file
in both, and a config that builds on another (`imagenet21k.py` on
`finetune.py`) loads it with `sibling`, which needs no top-level `configs`
package.
"""

import importlib.util
import os
import re
import sys
import types
from typing import List, Optional

_VIT_JAX = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where the configs are: the wheel's copy, then the checkout's folder.
_FOLDERS = (os.path.join(_VIT_JAX, 'experiment_configs'),
            os.path.join(os.path.dirname(_VIT_JAX), 'configs'))
# The form of the documented commands, `--config=configs/<name>.py`.
_PREFIX = 'configs/'
_EXAMPLES = ('--config=embedded, --config=finetune:b16,cifar10, '
             '--config=flowers:tutorial')


def folder() -> Optional[str]:
  """The folder of the experiment configs, or None if neither exists."""
  for path in _FOLDERS:
    if os.path.isfile(os.path.join(path, 'embedded.py')):
      return path
  return None


def names() -> List[str]:
  """The experiment configs' names (their files without `.py`), sorted."""
  path = folder()
  if path is None:
    return []
  return sorted(f[:-3]
                for f in os.listdir(path)
                if f.endswith('.py') and not f.startswith('_'))


def path_of(name: str) -> str:
  """The file of experiment config `name`; FileNotFoundError if unknown."""
  if name not in names():
    raise FileNotFoundError(_unknown(name, name))
  return os.path.join(folder(), name + '.py')


def resolve(spec: str) -> str:
  """`spec` (`FILE.py[:ARG]` or `NAME[:ARG]`) with its file made explicit.

  An existing file wins. Otherwise `NAME`, `NAME.py` or `configs/NAME.py`
  is the experiment config of that name (the `ARG` is kept). Raises
  FileNotFoundError, listing the names, if it is neither.
  """
  path, colon, arg = spec.partition(':')
  if os.path.isfile(path):
    return spec
  name = path[:-3] if path.endswith('.py') else path
  if name.startswith(_PREFIX):
    name = name[len(_PREFIX):]
  if name in names():
    return path_of(name) + colon + arg
  raise FileNotFoundError(_unknown(path, name))


def _unknown(path: str, name: str) -> str:
  """The error message for `path`, neither a file nor a config's name."""
  if path.endswith('.py') or '/' in path:
    what = (f'Config file {path} does not exist, and {name!r} is not the '
            'name of an experiment config')
  else:
    what = f'Config {path!r} is neither a file nor an experiment config'
  return (f'{what} ({", ".join(names()) or "none found"}). Give one by name '
          f'({_EXAMPLES}) or the path of a config file, e.g. '
          'vit_jax/configs/vit.py:b16,cifar10 for the original vit_jax\'s.')


def sibling(caller_file: str, name: str) -> types.ModuleType:
  """Config file `name`.py of the folder of `caller_file`, loaded by path.

  For configs that build on another (`imagenet21k.py` on `finetune.py`):
  this works whether the caller was imported from `configs/`, run by
  `--config`, or shipped in the wheel. Each file is loaded once.
  """
  path = os.path.join(
      os.path.dirname(os.path.abspath(caller_file)), name + '.py')
  module_name = '_vit_jax_config_' + re.sub(r'\W', '_', path)
  if module_name in sys.modules:
    return sys.modules[module_name]
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[module_name]
    raise
  return module

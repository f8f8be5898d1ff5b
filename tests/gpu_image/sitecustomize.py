"""Python started with this directory on PYTHONPATH imports only what a GPU
image has: from site-packages, only the top-level modules named in
VIT_JAX_ALLOWED_IMPORTS (comma-separated); the standard library and the
other PYTHONPATH entries as usual. Every other module of site-packages is
set to None in sys.modules, as if it were not installed: importing it raises
ModuleNotFoundError and `importlib.util.find_spec` returns None. Used by
tests/test_bench_gpu.py.
"""

import os
import site
import sys


def _hide_site_packages(allowed):
  for directory in site.getsitepackages():
    if not os.path.isdir(directory):
      continue
    for entry in os.listdir(directory):
      name = entry.split('.')[0]
      if (name.isidentifier() and not name.startswith('__') and
          name not in allowed and name not in sys.modules and
          name not in sys.stdlib_module_names):
        sys.modules[name] = None


if os.environ.get('VIT_JAX_ALLOWED_IMPORTS'):
  _hide_site_packages(
      frozenset(os.environ['VIT_JAX_ALLOWED_IMPORTS'].split(',')))

"""Imports real timm for the interop tests, or skips them.

timm imports torchvision. Where the installed torchvision is a CUDA build
beside a CPU torch, its C++ operators cannot load and its import fails
registering their meta kernels (`torchvision._meta_registrations`); timm's
ViT uses none of them (only pure-Python parts), so that one module is
skipped and the rest of torchvision and timm import as they are.
conftest.py does this for every test process (transformers imports
torchvision as well).
"""

import importlib.util
import sys
import types

import pytest


def make_torchvision_importable() -> None:
  """Skips the meta registrations of a torchvision whose C++ operators
  cannot load (see the module docstring); transformers imports it too."""
  if 'torchvision' in sys.modules or not importlib.util.find_spec(
      'torchvision'):
    return
  try:
    import torchvision  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  except RuntimeError:  # operator torchvision::nms does not exist
    for name in [m for m in sys.modules if m.startswith('torchvision')]:
      del sys.modules[name]
    sys.modules['torchvision._meta_registrations'] = types.ModuleType(
        'torchvision._meta_registrations')


def import_timm():
  pytest.importorskip('torch')
  make_torchvision_importable()
  try:
    import torchvision  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  except ImportError:
    pytest.skip('torchvision (needed by timm) is not installed')
  except RuntimeError:  # operator torchvision::nms does not exist
    for name in [m for m in sys.modules if m.startswith('torchvision')]:
      del sys.modules[name]
    sys.modules['torchvision._meta_registrations'] = types.ModuleType(
        'torchvision._meta_registrations')
  return pytest.importorskip('timm')

"""Imports real timm for the interop tests, or skips them.

timm imports torchvision. Where the installed torchvision is a CUDA build
beside a CPU torch, its C++ operators cannot load and its import fails
registering their meta kernels (`torchvision._meta_registrations`); timm's
ViT uses none of them (only pure-Python parts), so that one module is
skipped and the rest of torchvision and timm import as they are.
"""

import sys
import types

import pytest


def import_timm():
  pytest.importorskip('torch')
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

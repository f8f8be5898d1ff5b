"""Makes torchvision importable for the tests that need timm or transformers.

timm imports torchvision, and transformers does when it is installed. Where
the installed torchvision is a CUDA build beside a CPU torch, its C++
operators cannot load and its import fails registering their meta kernels
(`torchvision._meta_registrations`); timm's ViT, transformers' ViT and
torchvision's `VisionTransformer` use none of them (only pure-Python
parts), so that one module is skipped and the rest imports as it is. The
test modules that import timm or transformers call this first, not every
test process: importing torch and torchvision costs seconds of CPU.
"""

import importlib.util
import sys
import types

import pytest


def make_torchvision_importable() -> None:
  """Skips the meta registrations of a torchvision whose C++ operators
  cannot load (see the module docstring); a no-op without torchvision."""
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


class Lazy:
  """A module imported by `load()` on its first attribute access.

  Every pytest-xdist worker imports every test file to collect it; with
  these, only the worker that runs the tests pays for torch's libraries
  (`load` may skip the test that first touches it).
  """

  def __init__(self, load):
    self._load = load
    self._module = None

  def __getattr__(self, name):
    if name.startswith('_'):  # pytest's probes while collecting
      raise AttributeError(name)
    if self._module is None:
      self._module = self._load()
    return getattr(self._module, name)


def import_transformers():
  """transformers (and safetensors), with torchvision importable, or the
  calling test skipped."""
  pytest.importorskip('torch')
  make_torchvision_importable()  # transformers imports it
  pytest.importorskip('safetensors')
  return pytest.importorskip('transformers')


def import_timm():
  """timm, with torchvision importable, or the calling module skipped."""
  pytest.importorskip('torch')
  make_torchvision_importable()
  pytest.importorskip('torchvision', reason='timm needs torchvision')
  return pytest.importorskip('timm')

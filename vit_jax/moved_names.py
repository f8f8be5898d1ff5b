"""Names that moved to another module and still resolve in their old one.

Splitting a module must not break `checkpoint.load_pretrained` (the
original's API) or `convert_hf.save_hf`. The module that lost the names sets

  __getattr__ = moved_names.resolver(__name__, {'save_hf': 'vit_jax.export_hf'})

and Python calls it (PEP 562) for any name it does not define. The import
is lazy because the new modules import the old one.
"""

import importlib
from typing import Any, Callable, Mapping


def resolver(module_name: str,
             moved: Mapping[str, str]) -> Callable[[str], Any]:
  """A module `__getattr__` serving `moved` ({name: the module it is in})."""

  def __getattr__(name: str) -> Any:  # pylint: disable=invalid-name
    if name in moved:
      return getattr(importlib.import_module(moved[name]), name)
    raise AttributeError(f'module {module_name!r} has no attribute {name!r}')

  return __getattr__

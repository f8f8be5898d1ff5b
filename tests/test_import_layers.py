"""No two vit_jax modules import each other, directly or through others.

The layers in pyproject.toml (checked by `lint-imports`) order the packages;
this test covers every module, those inside one layer too. Function-level
imports count: a circle of lazy imports is still a circle.
"""

import graphlib

import grimp


def test_no_import_circles():
  graph = grimp.build_graph('vit_jax')
  modules = set(graph.modules)
  imports = {
      m: graph.find_modules_directly_imported_by(m) & modules for m in modules
  }
  try:
    tuple(graphlib.TopologicalSorter(imports).static_order())
  except graphlib.CycleError as e:
    raise AssertionError(
        f'vit_jax modules that import each other: {e.args[1]}') from None

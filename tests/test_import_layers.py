"""No two vit_jax modules import each other, directly or through others.

The layers in pyproject.toml (checked by `lint-imports`) order the packages;
this test covers every module, those inside one layer too. Function-level
imports count: a circle of lazy imports is still a circle.
"""

import grimp


def _strongly_connected(graph, modules):
  """Tarjan's algorithm: the groups of modules that import each other."""
  imports = {m: graph.find_modules_directly_imported_by(m) & modules
             for m in modules}
  index, low, stack, on_stack, groups = {}, {}, [], set(), []

  def visit(module):
    index[module] = low[module] = len(index)
    stack.append(module)
    on_stack.add(module)
    for other in imports[module]:
      if other not in index:
        visit(other)
        low[module] = min(low[module], low[other])
      elif other in on_stack:
        low[module] = min(low[module], index[other])
    if low[module] == index[module]:
      group = set()
      while module not in group:
        group.add(stack.pop())
      on_stack.difference_update(group)
      if len(group) > 1:
        groups.append(sorted(group))

  for module in sorted(modules):
    if module not in index:
      visit(module)
  return groups


def test_no_import_circles():
  graph = grimp.build_graph('vit_jax')
  circles = _strongly_connected(graph, set(graph.modules))
  assert not circles, f'vit_jax modules that import each other: {circles}'

"""Ratchet on function and module sizes in vit_jax/, bench/ and configs/.

A function over 80 lines or a module over 450 lines is too long to read in
one go (STYLE.md: one module per idea). `KNOWN` lists today's offenders with
their line counts; this script fails when
  * a function or module not in `KNOWN` goes over its limit,
  * one in `KNOWN` grows, or
  * one in `KNOWN` is now within its limit (remove it from the list),
so the list only shrinks. Run from the repository root:
`python .ci/sizes.py`.
"""

import ast
import pathlib
import sys

FUNCTION_LIMIT = 80
MODULE_LIMIT = 450
ROOTS = ('vit_jax', 'bench', 'configs')

# 'path' (a module) or 'path:qualified.name' (a function) -> lines today.
KNOWN = {}


def sizes(root: pathlib.Path):
  """{key: lines} of every module and function over its limit."""
  found = {}
  for folder in ROOTS:
    for path in sorted((root / folder).rglob('*.py')):
      rel = path.relative_to(root).as_posix()
      source = path.read_text()
      lines = len(source.splitlines())
      if lines > MODULE_LIMIT:
        found[rel] = lines
      found.update(_long_functions(rel, ast.parse(source)))
  return found


def _long_functions(rel, tree):
  found = {}

  def visit(node, prefix):
    for child in ast.iter_child_nodes(node):
      if isinstance(child,
                    (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        name = f'{prefix}{child.name}'
        if not isinstance(child, ast.ClassDef):
          first = min([child.lineno] + [d.lineno for d in child.decorator_list])
          lines = child.end_lineno - first + 1
          if lines > FUNCTION_LIMIT:
            found[f'{rel}:{name}'] = lines
        visit(child, f'{name}.')

  visit(tree, '')
  return found


def main() -> int:
  root = pathlib.Path(__file__).resolve().parent.parent
  found = sizes(root)
  errors = []
  for key, lines in sorted(found.items()):
    if key not in KNOWN:
      errors.append(f'{key}: {lines} lines, over the limit (split it)')
    elif lines > KNOWN[key]:
      errors.append(f'{key}: grew from {KNOWN[key]} to {lines} lines')
  for key in sorted(set(KNOWN) - set(found)):
    errors.append(f'{key}: within the limit now; remove it from KNOWN in '
                  f'{pathlib.Path(__file__).name}')
  print(f'sizes: {len(found)} functions/modules over {FUNCTION_LIMIT}/'
        f'{MODULE_LIMIT} lines, {len(KNOWN)} known')
  for error in errors:
    print(f'  {error}')
  return 1 if errors else 0


if __name__ == '__main__':
  sys.exit(main())

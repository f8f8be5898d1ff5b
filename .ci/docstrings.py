"""Share of docstring lines in vit_jax/: at most 20% of its non-blank lines.

A docstring line is a non-blank line of a module, class or function
docstring (the string literal that opens its body, found with `ast`); the
total is every non-blank line of every `vit_jax/**/*.py`. Comments count as
code. Run from the repository root: `python .ci/docstrings.py [--by-file]`.
"""

import ast
import pathlib
import sys

LIMIT = 0.20


def count(path: pathlib.Path):
  """(docstring lines, non-blank lines) of one module."""
  source = path.read_text()
  lines = source.splitlines()
  doc = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                         ast.AsyncFunctionDef)) and node.body:
      first = node.body[0]
      if (isinstance(first, ast.Expr) and
          isinstance(first.value, ast.Constant) and
          isinstance(first.value.value, str)):
        doc.update(range(first.lineno, first.end_lineno + 1))
  nonblank = {i + 1 for i, line in enumerate(lines) if line.strip()}
  return len(doc & nonblank), len(nonblank)


def main() -> int:
  root = pathlib.Path(__file__).resolve().parent.parent
  per_file = {
      p.relative_to(root).as_posix(): count(p)
      for p in sorted((root / 'vit_jax').rglob('*.py'))
  }
  doc = sum(d for d, _ in per_file.values())
  total = sum(t for _, t in per_file.values())
  if '--by-file' in sys.argv:
    for name, (d, t) in sorted(per_file.items(), key=lambda x: -x[1][0]):
      print(f'{d:5d} / {t:5d}  {name}')
  share = doc / total
  print(f'docstrings: {doc} of {total} non-blank lines in vit_jax/ '
        f'({share:.1%}; limit {LIMIT:.0%})')
  return 0 if share <= LIMIT else 1


if __name__ == '__main__':
  sys.exit(main())

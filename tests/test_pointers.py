"""Every file, module and section the code and docs point to exists.

Read: the docstrings and comments of vit_jax/, configs/, bench/ and
setup.py, and the whole of README.md and docs/*.md. Checked:
  * repository paths with a folder, ending in a known extension
    (`vit_jax/layers/attention.py`, `docs/interop.md`) or naming a folder
    of the repository (`vit_jax/checkpoints/`); a path may be relative to
    the repository, to the file that names it or to vit_jax/;
  * dotted modules of this repository (`vit_jax.checkpoints.export`,
    `configs.embedded`), and the name after the module where one follows
    (`vit_jax.models.get_model`);
  * sections: a quoted title after a Markdown file's name (README
    "Installation", docs/training.md "Notebooks") and link anchors
    (`docs/speed.md#on-a-gpu`) must be headings of that file.
A moved module or a renamed heading then fails here, with file:line.
"""

import ast
import io
import os
import pathlib
import re
import tokenize

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYTHON_SOURCES = ('vit_jax', 'configs', 'bench')
EXTENSIONS = ('py', 'md', 'toml', 'ini', 'cfg', 'ipynb', 'json', 'sh', 'txt',
              'yaml', 'yml')
TOP_FOLDERS = ('vit_jax', 'configs', 'bench', 'docs', 'tests', 'notebooks',
               '.ci')
PACKAGES = ('vit_jax', 'configs', 'bench')

# Not after a character of a path, a URL or a shell variable: `/tmp/x.py`,
# `https://github.com/.../vit_jax/models.py` and `$OUT/docs/x.md` are
# someone else's files.
_START = r'(?<![\w./:~$@{}-])'
PATH = re.compile(_START + r'((?:[\w.-]+/)+[\w.-]+\.(?:' +
                  '|'.join(EXTENSIONS) + r'))(?![\w/-])')
FOLDER = re.compile(_START + r'((?:' +
                    '|'.join(re.escape(f) for f in TOP_FOLDERS) +
                    r')(?:/\w+)*/)(?![\w.-])')
# Not a template such as `vit_jax.configs.models.get_<model>_config`.
MODULE = re.compile(r'(?<![\w./-])((?:' + '|'.join(PACKAGES) +
                    r')(?:\.\w+)+)(?![\w<*{])')
SECTION = re.compile(
    r'(?<![\w/.-])((?:[\w.-]+/)*(?:README|[\w.-]+\.md))(?:\'s)?,?\s+'
    r'(?:section\s+)?["\u201c]([^"\u201d]{1,80})["\u201d]')
# A first folder in capitals is a placeholder (`W/summary.json`, W the
# workdir).
PLACEHOLDER = re.compile(r'[A-Z_]+/|(?:[\w.-]+/)*[A-Z_]+\.\w+$')
# In a built wheel only: setup.py ships configs/ as this package folder.
WHEEL_ONLY = {'vit_jax/experiment_configs/': 'configs/'}
# Named on purpose as missing: the error a mistyped config file gives.
MISSING_ON_PURPOSE = ('configs/no_such.py',)
ANCHOR = re.compile(_START + r'((?:[\w.-]+/)*[\w.-]+\.md)#([\w-]+)')
# A Markdown link to a file of the repository (not a URL).
LINK = re.compile(r'\]\((?![\w+.-]+:)([^)\s#]+)[^)\s]*\)')


def _python_prose(path):
  """(first line, text) of each docstring and each run of comment lines."""
  source = path.read_text()
  chunks = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                         ast.AsyncFunctionDef)) and node.body:
      first = node.body[0]
      if (isinstance(first, ast.Expr) and
          isinstance(first.value, ast.Constant) and
          isinstance(first.value.value, str)):
        chunks.append((first.lineno, first.value.value))
  comments = []
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      line, text = token.start[0], token.string.lstrip('#').strip()
      if comments and comments[-1][0] + comments[-1][1].count('\n') == (line -
                                                                        1):
        comments[-1] = (comments[-1][0], comments[-1][1] + '\n' + text)
      else:
        comments.append((line, text))
  return chunks + comments


def _sources():
  """Every file read: the Python sources, setup.py, README.md and docs/."""
  for folder in PYTHON_SOURCES:
    yield from sorted((ROOT / folder).rglob('*.py'))
  yield ROOT / 'setup.py'
  yield from [ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md'))


def _prose(path):
  """[(first line, text), ...] of `path`: all of a Markdown file."""
  if path.suffix == '.py':
    return _python_prose(path)
  return [(1, path.read_text())]


def _find(name, source):
  """The file or folder `name` names, seen from `source`; None if none."""
  for base in (ROOT, source.parent, ROOT / 'vit_jax'):
    found = (base / name).resolve()
    if found.is_relative_to(ROOT) and found.exists():
      return found
  return None


def _headings(path):
  """The titles of a Markdown file's headings, outside fenced code."""
  titles, fenced = set(), False
  for line in path.read_text().splitlines():
    if line.lstrip().startswith('```'):
      fenced = not fenced
    elif not fenced and re.match(r'#{1,6}\s', line):
      titles.add(_plain(line.lstrip('#')))
  return titles


def _plain(title):
  return ' '.join(title.replace('`', '').split()).strip().lower()


def _slug(title):
  """GitHub's anchor of a heading: lower case, punctuation out, '-' for ' '."""
  return re.sub(r'[^\w\- ]', '', title).replace(' ', '-')


def _module_names(path):
  """The top-level names a module defines or imports."""
  names = set()
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      for target in targets:
        names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names.update((a.asname or a.name).split('.')[0] for a in node.names)
  return names


def _module_exists(dotted):
  """Whether `a.b.c` is a module of the repository, or a name in one."""
  parts = dotted.split('.')
  module = None
  for i in range(len(parts), 0, -1):
    base = ROOT.joinpath(*parts[:i])
    if base.with_suffix('.py').is_file():
      module = base.with_suffix('.py')
    elif (base / '__init__.py').is_file():
      module = base / '__init__.py'
    else:
      continue
    rest = parts[i:]
    return not rest or rest[0] in _module_names(module)
  return False


def _in_checkout(pointer):
  for wheel, checkout in WHEEL_ONLY.items():
    if pointer.startswith(wheel):
      return checkout + pointer[len(wheel):]
  return pointer


def _pointers(path, chunks):
  """(line, pointer, what is wrong) of every pointer in `chunks` that fails."""
  for first_line, text in chunks:

    def line_of(match):
      return first_line + text.count('\n', 0, match.start())  # pylint: disable=cell-var-from-loop

    for match in PATH.finditer(text):
      if (PLACEHOLDER.match(match.group(1)) or
          match.group(1) in MISSING_ON_PURPOSE):
        continue
      if _find(_in_checkout(match.group(1)), path) is None:
        yield line_of(match), match.group(1), 'no such file'
    for match in FOLDER.finditer(text):
      if not (ROOT / _in_checkout(match.group(1))).is_dir():
        yield line_of(match), match.group(1), 'no such folder'
    for match in MODULE.finditer(text):
      if match.group(1).rsplit('.', 1)[1] in EXTENSIONS:
        continue  # a file name: PATH's
      if not _module_exists(match.group(1)):
        yield line_of(match), match.group(1), 'no such module or name'
    for match in SECTION.finditer(text):
      name = match.group(1)
      target = _find(name + '.md' if name.endswith('README') else name, path)
      title = match.group(2)
      if target is None:
        yield line_of(match), name, 'no such file'
      elif _plain(title) not in _headings(target):
        yield line_of(match), f'{name} "{title}"', 'no such heading'
    for match in LINK.finditer(text):
      if _find(_in_checkout(match.group(1)), path) is None:
        yield line_of(match), match.group(1), 'no such file'
    for match in ANCHOR.finditer(text):
      target = _find(match.group(1), path)
      if target is None:
        yield line_of(match), match.group(1), 'no such file'
      elif match.group(2) not in {_slug(t) for t in _headings(target)}:
        yield line_of(match), match.group(0), 'no such heading'


# Only the paths at collection: each worker collects every test file.
SOURCES = list(_sources())


@pytest.mark.parametrize(
    'path', SOURCES, ids=[os.path.relpath(p, ROOT) for p in SOURCES])
def test_pointers_exist(path):
  rel = os.path.relpath(path, ROOT)
  stale = list(
      dict.fromkeys(  # one line per pointer, in order
          f'{rel}:{line}: {pointer} ({why})'
          for line, pointer, why in _pointers(path, _prose(path))))
  assert not stale, 'stale pointers:\n' + '\n'.join(stale)


def test_the_patterns_find_pointers():
  """The checks see each kind of pointer, and see a stale one as stale."""
  existing = ('vit_jax/layers/attention.py, vit_jax/checkpoints/, '
              'vit_jax.checkpoints.export, vit_jax.models.get_model, '
              'README "Features", docs/speed.md#on-a-gpu, [t](training.md)')
  not_ours = ('/tmp/x.py, W/summary.json, '
              'vit_jax.configs.models.get_<m>_config, [u](https://x.org/a.md), '
              'https://github.com/google/x/blob/main/vit_jax/a.py')
  stale = ('vit_jax/pretrained.py, ../outside/x.md, vit_jax/params/, '
           'vit_jax.params.npz, '
           'vit_jax.models.nothing, README "Installation", [g](gone.md), '
           'docs/speed.md#nowhere')
  text = f'{existing}.\n{not_ours}.\n{stale}.'
  found = [(line, p, why)
           for line, p, why in _pointers(ROOT / 'docs' / 'x.md', [(1, text)])]
  assert found == [
      (3, 'vit_jax/pretrained.py', 'no such file'),
      (3, '../outside/x.md', 'no such file'),  # not in the repo
      (3, 'vit_jax/params/', 'no such folder'),
      (3, 'vit_jax.params.npz', 'no such module or name'),
      (3, 'vit_jax.models.nothing', 'no such module or name'),
      (3, 'README "Installation"', 'no such heading'),
      (3, 'gone.md', 'no such file'),
      (3, 'docs/speed.md#nowhere', 'no such heading')
  ]

"""Local and URI paths (checkpoints, AugReg index, image folders) alike.

Local paths use the standard library; `scheme://` paths (gs://, s3://,
ram://) go through `tf.io.gfile`, imported only then.
"""

import builtins
import os
from typing import IO, Iterator, List, Tuple

from vit_jax.data import tf_import


def has_scheme(path) -> bool:
  """Whether `path` is a URI (`scheme://...`) rather than a local path."""
  return '://' in os.fspath(path)


def _gfile():
  tf = tf_import.import_tensorflow()
  return tf.io.gfile


def exists(path) -> bool:
  if has_scheme(path):
    return _gfile().exists(os.fspath(path))
  return os.path.exists(path)


def isdir(path) -> bool:
  if has_scheme(path):
    return _gfile().isdir(os.fspath(path))
  return os.path.isdir(path)


def listdir(path) -> List[str]:
  if has_scheme(path):
    return [name.rstrip('/') for name in _gfile().listdir(os.fspath(path))]
  return os.listdir(path)


def walk(top) -> Iterator[Tuple[str, List[str], List[str]]]:
  """`os.walk(top)` for local paths and URIs, top down."""
  if not has_scheme(top):
    yield from os.walk(top)
    return
  for dirpath, dirnames, filenames in _gfile().walk(os.fspath(top)):
    dirnames[:] = [d.rstrip('/') for d in dirnames]
    yield dirpath.rstrip('/'), dirnames, filenames


def makedirs(path) -> None:
  if has_scheme(path):
    _gfile().makedirs(os.fspath(path))
  else:
    os.makedirs(path, exist_ok=True)


def open_file(path, mode: str = 'rb') -> IO:
  """A file object of `path` (seekable when read in binary mode)."""
  if has_scheme(path):
    return _gfile().GFile(os.fspath(path), mode)
  return builtins.open(path, mode)


def replace(source, destination) -> None:
  """Renames `source` over `destination`."""
  if has_scheme(source) or has_scheme(destination):
    _gfile().rename(os.fspath(source), os.fspath(destination), overwrite=True)
  else:
    os.replace(source, destination)


def write_text_atomically(path, text: str) -> None:
  """Writes `text` to `path` via `<path>.tmp` and a rename; creates parents."""
  tmp = f'{os.fspath(path)}.tmp'
  parent = os.path.dirname(os.fspath(path))
  if parent and not has_scheme(parent):
    os.makedirs(parent, exist_ok=True)
  with open_file(tmp, 'w') as f:
    f.write(text)
  replace(tmp, path)


def remove(path) -> None:
  if has_scheme(path):
    _gfile().remove(os.fspath(path))
  else:
    os.remove(path)


def join(directory, *names) -> str:
  """`directory/name`; a URI keeps its `scheme://` and gets `/` separators."""
  directory = os.fspath(directory)
  if has_scheme(directory):
    return '/'.join([directory.rstrip('/')] + [n.strip('/') for n in names])
  return os.path.join(directory, *names)

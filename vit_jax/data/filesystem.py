"""One filesystem layer for checkpoint, AugReg index and image-folder paths.

A local path goes through the standard library. A path with a scheme
(`gs://vit_models/imagenet21k/ViT-B_16.npz`, `s3://...`, TensorFlow's
in-memory `ram://...`, any file system registered with TensorFlow) goes
through `tf.io.gfile`, imported only then, so that local use does not pay for
importing TensorFlow.
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
  """`os.walk(top)`: (dirpath, dirnames, filenames), top down; sorting
  `dirnames` in place orders the descent."""
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
    _gfile().rename(os.fspath(source), os.fspath(destination),
                    overwrite=True)
  else:
    os.replace(source, destination)


def write_text_atomically(path, text: str) -> None:
  """Writes `text` to `path` through `<path>.tmp` and a rename: a reader
  sees the old file or the new one, never part of either. Missing parent
  folders are created."""
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

"""Image folders as datasets: listing, validating and splitting them.

Either layout of `folder_split`; unreadable files are dropped at listing
time, so orders, splits and counts are fixed before the pipeline starts.
Listings are cached per process.
"""

import concurrent.futures
import dataclasses
import functools
import os

from absl import logging
import numpy as np

from vit_jax.data import filesystem
from vit_jax.data import folder_split
from vit_jax.data import sources
from vit_jax.data import tf_import

tf = tf_import.import_tensorflow()

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp')
# Formats tf.io.decode_image reads (MPO: multi-picture JPEG from cameras).
_TF_DECODABLE = ('JPEG', 'MPO', 'PNG', 'GIF', 'BMP')
_FOLDER_LAYOUT = '<dir>/train/<class>/*.jpg and <dir>/test/<class>/*.jpg'


def is_folder(dataset):
  """True if `config.dataset` names an image folder (local or `gs://`)."""
  return (filesystem.has_scheme(dataset) or filesystem.isdir(dataset) or
          dataset.startswith(('/', '.', '~')))


def _check_image(path):
  """Cheap header check; True if tf.io.decode_image should read the file."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with filesystem.open_file(path, 'rb') as f, Image.open(f) as im:
      fmt = im.format
      im.verify()  # PNG: chunk CRCs; JPEG/GIF/BMP: header structure
    return fmt in _TF_DECODABLE
  except Exception:  # pylint: disable=broad-except
    return False


def _class_dirs(split_dir):
  return sorted(
      d for d in filesystem.listdir(split_dir) if not d.startswith('.') and
      filesystem.isdir(filesystem.join(split_dir, d)))


def _list_images(tree_dir, classes):
  """Readable images under `<tree_dir>/<class>/` (recursively), per class.

  Args:
    tree_dir: the folder holding one subfolder per class.
    classes: class folder names; label = position in this list.

  Returns:
    (kept, skipped): `[(path, label)]` in class order (sorted os.walk order
    within a class), and the skipped paths.
  """
  candidates = []
  for label, name in enumerate(classes):
    class_dir = filesystem.join(tree_dir, name)
    for dirpath, dirnames, filenames in filesystem.walk(class_dir):
      dirnames.sort()  # walk order is filesystem dependent
      candidates += [(filesystem.join(dirpath, f), label)
                     for f in sorted(filenames)
                     if f.lower().endswith(IMAGE_EXTENSIONS)]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    ok = list(pool.map(_check_image, [p for p, _ in candidates]))
  skipped = [p for (p, _), good in zip(candidates, ok) if not good]
  if skipped:
    logging.warning('Skipping %d unreadable image(s) in %s, e.g. %s',
                    len(skipped), tree_dir, skipped[:5])
  return [c for c, good in zip(candidates, ok) if good], skipped


@functools.lru_cache(maxsize=None)
def _list_split_folder(root, split):
  """(paths, labels, class_names, num_skipped) of `<root>/<split>`; cached."""
  layout = f'expected the layout {_FOLDER_LAYOUT}'
  split_dir = filesystem.join(root, split)
  if not filesystem.isdir(split_dir):
    raise ValueError(f'Image folder {split_dir!r} does not exist; {layout}.')
  # Class index = position in the sorted union of the class folders of all
  # splits, so train and test agree even if a split lacks a class.
  names = set(_class_dirs(split_dir))
  for other in ('train', 'test'):
    if filesystem.isdir(filesystem.join(root, other)):
      names.update(_class_dirs(filesystem.join(root, other)))
  if not _class_dirs(split_dir):
    raise ValueError(f'Image folder {split_dir!r} has no class subfolders; '
                     f'{layout}.')
  classes = sorted(names)
  kept, skipped = _list_images(split_dir, classes)
  if not kept:
    raise ValueError(f'Image folder {split_dir!r} contains no readable '
                     f'{"/".join(IMAGE_EXTENSIONS)} images; {layout}.')
  paths, labels = zip(*kept)
  return list(paths), np.array(labels, np.int64), classes, len(skipped)


@dataclasses.dataclass(frozen=True)
class Tree:
  """The readable images of a single tree `<root>/<class>/*`."""
  classes: tuple  # class names in index order (empty folders dropped)
  files: dict  # class name -> its readable image paths
  num_skipped: int  # unreadable files
  dropped: tuple  # class folders without a readable image


@functools.lru_cache(maxsize=None)
def list_tree(root):
  """Lists a single tree; cached per process like `_list_split_folder`."""
  names = _class_dirs(root)
  loose = [
      f for f in filesystem.listdir(root)
      if f.lower().endswith(IMAGE_EXTENSIONS)
  ]
  if not names:
    found = (f'{len(loose)} image(s) lie directly in it, e.g. {loose[:3]}'
             if loose else 'it is empty of images')
    raise ValueError(
        f'Image folder {root!r} has no class subfolders ({found}); expected '
        f'{folder_split.LAYOUTS_HELP}. Move the images into one subfolder '
        'per class.')
  if loose:
    logging.warning(
        'Ignoring %d image(s) directly in %s (not in a class '
        'subfolder), e.g. %s', len(loose), root, loose[:3])
  kept, skipped = _list_images(root, names)
  files = {name: [] for name in names}
  for path, label in kept:
    files[names[label]].append(path)
  dropped = tuple(name for name in names if not files[name])
  if len(dropped) == len(names):
    raise ValueError(
        f'Image folder {root!r} contains no readable '
        f'{"/".join(IMAGE_EXTENSIONS)} images in its class subfolders '
        f'{names[:10]}; expected {folder_split.LAYOUTS_HELP}.')
  if dropped:
    # Dropped, not an error: a model cannot learn a class it never sees, and a
    # dead head unit would only lower the reported accuracy's meaning.
    logging.warning(
        'Dropping %d class folder(s) of %s without any readable image: %s. '
        'The %d remaining classes are numbered without them (see '
        'class_names.json in the workdir); add images or delete the '
        'folder(s) to silence this.', len(dropped), root, list(dropped),
        len(names) - len(dropped))
  classes = tuple(name for name in names if files[name])
  return Tree(
      classes=classes,
      files={c: files[c] for c in classes},
      num_skipped=len(skipped),
      dropped=dropped)


@functools.lru_cache(maxsize=None)
def split_tree(root, val_fraction, split_seed):
  """`{class: (train paths, val paths)}` of a single tree (folder_split)."""
  tree = list_tree(root)
  parts = folder_split.split_files(
      tree.files, val_fraction=val_fraction, split_seed=split_seed, root=root)
  single = [c for c in tree.classes if len(tree.files[c]) == 1]
  if single:
    logging.warning(
        'Class(es) %s of %s have a single image: it is used for training, and '
        'the validation split has no example of them. Add images to these '
        'classes to validate them.', single, root)
  return parts


def list_folder(root,
                split,
                val_fraction=folder_split.DEFAULT_VAL_FRACTION,
                split_seed=folder_split.DEFAULT_SPLIT_SEED):
  """(paths, labels, class_names, num_skipped) of a folder's split.

  For a single tree, `num_skipped` counts the whole tree's unreadable files.
  """
  root = os.path.expanduser(root)
  if folder_split.detect_layout(root) == folder_split.TRAIN_TEST:
    return _list_split_folder(root, split)
  part = folder_split.resolve_split(split)
  val_fraction, split_seed = folder_split.check_params(val_fraction, split_seed)
  tree = list_tree(root)
  parts = split_tree(root, val_fraction, split_seed)
  which = 0 if part == folder_split.TRAIN else 1
  paths = [p for c in tree.classes for p in parts[c][which]]
  labels = np.array(
      [i for i, c in enumerate(tree.classes) for _ in parts[c][which]],
      np.int64)
  if not paths:
    raise ValueError(
        f'The {part!r} split of image folder {root!r} is empty: every class '
        'has a single image. Add images (at least 2 per class).')
  return paths, labels, list(tree.classes), tree.num_skipped


def make_source(root, split, process_index, process_count, val_fraction,
                split_seed) -> sources.Source:
  """This process's shard of a folder's split: every `process_count`-th file."""
  paths, labels, classes, _ = list_folder(root, split, val_fraction, split_seed)
  local_paths = paths[process_index::process_count]
  local_labels = labels[process_index::process_count]
  return sources.Source(
      make=lambda: tf.data.Dataset.from_tensor_slices(
          (local_paths, local_labels)),
      decode=sources.decode_file,
      num_classes=len(classes),
      shard_sizes=sources.strided_shard_sizes(len(paths), process_count),
      process_index=process_index,
      in_memory=True,
      may_fail_decode=True)

"""Class names of a classifier's head, from a list, a file or a dataset.

`load_labels` resolves `predict --labels` and the names `trained_model`
finds for a training run: the run's `class_names.json`, ImageNet's names for
a 1000-way head, a `.json`/`.txt` file, or a dataset's label names.
"""

import json
import os
from typing import List, Optional, Sequence, Union

IMAGENET2012 = 'imagenet2012'
CLASS_NAMES_FILE = 'class_names.json'


def _tfds_label_names(name: str) -> Optional[List[str]]:
  """Label names TFDS knows without the data being prepared (may be None)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    label = tfds.builder(name).info.features['label']
    return list(label.names)
  except Exception:  # pylint: disable=broad-except
    return None


def load_labels(spec: Union[None, str, Sequence[str]],
                num_classes: int,
                *,
                checkpoint_dir: Optional[str] = None,
                data_dir: Optional[str] = None) -> List[str]:
  """`num_classes` class names for a head; raises ValueError otherwise.

  `spec` is None (then `checkpoint_dir`'s `class_names.json`, ImageNet's
  names for 1000 classes, else the indices), a list of names,
  'imagenet2012', a `.json` file (a list or `{index: name}`), a `.txt` file
  (one per line) or a dataset name.
  """
  if spec is None:
    candidate = os.path.join(checkpoint_dir or '', CLASS_NAMES_FILE)
    if checkpoint_dir is not None and os.path.isfile(candidate):
      spec = candidate
    elif num_classes == 1000:
      spec = IMAGENET2012
    else:
      return [str(i) for i in range(num_classes)]

  if not isinstance(spec, str):
    names = [str(n) for n in spec]
    source = 'the label list'
  elif spec.endswith('.json'):
    source = spec
    try:
      with open(spec) as f:
        data = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(f'Cannot read labels file {spec}: {e}.') from e
    if isinstance(data, dict):
      try:
        by_index = {int(k): str(v) for k, v in data.items()}
      except ValueError as e:
        raise ValueError(f'{spec}: a labels dict must map class indices to '
                         f'names, e.g. {{"0": "cat"}}; got keys like '
                         f'{list(data)[:3]}.') from e
      names = [by_index.get(i, str(i)) for i in range(num_classes)]
      extra = sorted(i for i in by_index if not 0 <= i < num_classes)
      if extra:
        raise ValueError(f'{spec} names classes {extra[:5]} but the head has '
                         f'{num_classes} classes.')
    elif isinstance(data, list):
      names = [str(n) for n in data]
    else:
      raise ValueError(f'{spec}: expected a JSON list of names or an '
                       '{index: name} object.')
  elif spec.endswith('.txt'):
    source = spec
    try:
      with open(spec) as f:
        names = [line.strip() for line in f if line.strip()]
    except OSError as e:
      raise ValueError(f'Cannot read labels file {spec}: {e}.') from e
  else:
    source = f'dataset {spec!r}'
    names = None
    try:
      from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
      names = list(
          input_pipeline.get_dataset_info(spec, 'train',
                                          data_dir=data_dir)['int2str'])
    except Exception:  # pylint: disable=broad-except
      names = _tfds_label_names(spec)  # known without prepared data
    if names is None:
      raise ValueError(
          f'--labels {spec!r}: not a .json/.txt file, and no dataset of that '
          'name could be read. Use imagenet2012, a class_names.json written '
          'by training, or a prepared dataset name.')
  if len(names) != num_classes:
    raise ValueError(f'{source} has {len(names)} class names but the model '
                     f'head has {num_classes} classes. Pass the labels of the '
                     'dataset this checkpoint was trained on.')
  return names

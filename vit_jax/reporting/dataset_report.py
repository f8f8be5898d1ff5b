"""The dataset report of a run: what class indices mean, how data was split."""

import hashlib
import json
import os

from absl import logging
import numpy as np

from vit_jax import input_pipeline
from vit_jax.data import embedded_mnist
from vit_jax.data import filesystem
from vit_jax.data import folder_split
from vit_jax.data import image_folders

CLASS_NAMES_FILE = 'class_names.json'  # the predict CLI reads this name
SPLIT_FILE = 'split.json'
SPLIT_CHART_FILE = 'split_counts.png'
# More classes than this make an unreadable bar chart (ImageNet: 1000).
MAX_CHART_CLASSES = 100

# pylint: disable=protected-access
# The listing helpers of the input pipeline and its sources: the report
# counts exactly what training reads.


def _split_labels(dataset, split, val_fraction, split_seed):
  """Labels of a split, or None for TFDS (counting would read the split)."""
  if dataset == input_pipeline.EMBEDDED_MNIST:
    return embedded_mnist.load_split(split)[1]
  if image_folders.is_folder(dataset):
    return image_folders.list_folder(dataset, split, val_fraction,
                                     split_seed)[1]
  return None


def _val_files_digest(root, tree, parts):
  """sha256 of the single tree's val files: compare splits across machines."""
  lines = []
  for name in tree.classes:
    class_dir = os.path.join(root, name)
    lines += [
        f'{name}/{folder_split.sort_key(os.path.relpath(p, class_dir))}'
        for p in parts[name][1]
    ]
  return hashlib.sha256('\n'.join(lines).encode('utf-8')).hexdigest()


def _format_table(report):
  """The per-class counts as a fixed-width text table."""
  names = report['class_names']
  splits = report['splits']
  head = [
      f'Dataset {report["dataset"]} ({report["kind"]}' +
      (f', val_fraction={report["val_fraction"]}, '
       f'split_seed={report["split_seed"]}'
       if report.get('val_fraction') is not None else '') +
      f'): {len(names)} classes, train split {splits["train"]!r}, '
      f'val split {splits["val"]!r}'
  ]
  width = max([len('class'), len('total')] + [len(n) for n in names])
  row = f'{{:>5}}  {{:<{width}}}  {{:>8}}  {{:>8}}'
  lines = head + [row.format('index', 'class', 'train', 'val')]
  per_class = report['per_class']
  if per_class is not None:
    lines += [
        row.format(i, n, per_class[n]['train'], per_class[n]['val'])
        for i, n in enumerate(names)
    ]
  else:
    lines.append('       (per-class counts of TFDS datasets are not computed: '
                 'they would need a pass over the data)')
  lines.append(
      row.format('', 'total', report['num_examples']['train'],
                 report['num_examples']['val']))
  return '\n'.join(lines)


def _write_chart(report, path):
  """Grouped bars: train and val images per class (Agg canvas, no pyplot)."""
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  # pylint: enable=g-import-not-at-top
  names = report['class_names']
  x = np.arange(len(names))
  width, height = max(4.0, 1.5 + 0.8 * len(names)), 4.5
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  for offset, role, color in ((-0.2, 'train', '#4c72b0'), (0.2, 'val',
                                                           '#dd8452')):
    counts = [report['per_class'][n][role] for n in names]
    bars = ax.bar(
        x + offset,
        counts,
        width=0.4,
        color=color,
        label=f'{role} ({report["splits"][role]!r})')
    ax.bar_label(bars, fontsize=7)
  ax.margins(y=0.25)  # room for the count labels and the legend
  ax.set_xticks(x)
  tilt = max(len(n) for n in names) > 7
  ax.set_xticklabels(
      names, rotation=30 if tilt else 0, ha='right' if tilt else 'center')
  ax.set_ylabel('images')
  name = os.path.basename(os.path.normpath(report['dataset']))
  ax.set_title(f'Images per class: {name}')
  ax.legend(loc='upper right', ncol=2, fontsize=8)
  # Margins estimated from the labels (tight_layout would draw it twice).
  tick_in = 0.1 + 0.04 * max(len(n) for n in names) if tilt else 0.15
  fig.subplots_adjust(
      left=0.8 / width,
      right=1 - 0.15 / width,
      bottom=(0.25 + tick_in) / height,
      top=1 - 0.4 / height)
  fig.savefig(path, dpi=100)


def _write_json(path, data):
  # ASCII (escaped): readable under any locale.
  filesystem.write_text_atomically(path, json.dumps(data, indent=1) + '\n')


def write_dataset_report(config, workdir: str) -> dict:
  """Writes what the class indices mean and how the data was split.

  Called once per run, by process 0, before training. Writes
  `class_names.json` (read by `vit_jax.predict`), `split.json` (the returned
  report) and `split_counts.png` (per-class bars, at most 100 classes) into
  `workdir`, and logs the per-class counts. TFDS gets split sizes only.

  Returns:
    The report: `dataset`, `kind`, `splits`, `val_fraction`, `split_seed`,
    `num_classes`, `class_names`, `num_examples`, `per_class` (None for
    TFDS), `num_skipped`, `dropped_classes`, `val_files_sha256` (of the
    sorted `<class>/<path>` lines of a single tree's val files, else None),
    `table` and `files`.
  """
  dataset = config.get('dataset', input_pipeline.EMBEDDED_MNIST)
  data_dir = config.get('tfds_data_dir')
  train_split, test_split = input_pipeline._split_names(config)
  val_fraction, split_seed = input_pipeline._folder_split_params(config)
  splits = {'train': train_split, 'val': test_split}
  infos = {
      role:
          input_pipeline.get_dataset_info(
              dataset,
              split,
              data_dir=data_dir,
              val_fraction=val_fraction,
              split_seed=split_seed) for role, split in splits.items()
  }
  names = [str(n) for n in infos['train']['int2str']]
  num_classes = infos['train']['num_classes']

  report = dict(
      dataset=dataset,
      kind=None,
      splits=splits,
      val_fraction=None,
      split_seed=None,
      num_classes=num_classes,
      class_names=names,
      num_examples={
          r: i['num_examples'] for r, i in infos.items()
      },
      per_class=None,
      num_skipped=None,
      dropped_classes=[],
      val_files_sha256=None)
  val_fraction, split_seed = _describe_source(report, infos, val_fraction,
                                              split_seed)
  report['per_class'] = _per_class_counts(report, val_fraction, split_seed)

  report['table'] = _format_table(report)
  logging.info('%s', report['table'])
  report['files'] = _write_files(report, workdir)
  return report


def _describe_source(report, infos, val_fraction, split_seed):
  """Sets the report's `kind` and the fields of an image folder's split.

  Returns:
    (val_fraction, split_seed), checked for a single tree, else as given.
  """
  dataset = report['dataset']
  if dataset == input_pipeline.EMBEDDED_MNIST:
    report['kind'] = 'embedded'
  elif image_folders.is_folder(dataset):
    root = os.path.expanduser(dataset)
    layout = infos['train']['layout']
    report['kind'] = f'folder {layout}'
    if layout == folder_split.SINGLE_TREE:
      val_fraction, split_seed = folder_split.check_params(
          val_fraction, split_seed)
      tree = image_folders.list_tree(root)
      report.update(
          val_fraction=val_fraction,
          split_seed=split_seed,
          num_skipped=tree.num_skipped,
          dropped_classes=list(tree.dropped),
          val_files_sha256=_val_files_digest(
              root, tree,
              image_folders.split_tree(root, val_fraction, split_seed)))
    else:
      report['num_skipped'] = {r: i['num_skipped'] for r, i in infos.items()}
  else:
    report['kind'] = 'tfds'
  return val_fraction, split_seed


def _per_class_counts(report, val_fraction, split_seed):
  """{name: {'train': n, 'val': n}}, or None for TFDS."""
  labels = {
      role: _split_labels(report['dataset'], split, val_fraction, split_seed)
      for role, split in report['splits'].items()
  }
  if not all(v is not None for v in labels.values()):
    return None
  counts = {
      r: np.bincount(v, minlength=report['num_classes']).tolist()
      for r, v in labels.items()
  }
  return {
      n: {
          'train': counts['train'][i],
          'val': counts['val'][i]
      } for i, n in enumerate(report['class_names'])
  }


def _write_files(report, workdir):
  """Writes class_names.json, split.json and the chart; {role: path}."""
  os.makedirs(workdir, exist_ok=True)
  files = {
      'class_names': os.path.join(workdir, CLASS_NAMES_FILE),
      'split': os.path.join(workdir, SPLIT_FILE),
      'chart': None
  }
  _write_json(files['class_names'], report['class_names'])
  _write_json(files['split'], {k: v for k, v in report.items() if k != 'table'})
  if (report['per_class'] is not None and
      report['num_classes'] <= MAX_CHART_CLASSES):
    files['chart'] = os.path.join(workdir, SPLIT_CHART_FILE)
    _write_chart(report, files['chart'])
  return files

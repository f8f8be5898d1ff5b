"""Pictures of a finished run in its workdir: `curves.png`, `confusion.png`.

matplotlib's Agg canvas without pyplot: no display needed, notebook figures
left alone.
"""

import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from vit_jax.reporting import progress

CURVES_FILE = 'curves.png'
CONFUSION_FILE = 'confusion.png'


def _new_figure(size):
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  # pylint: enable=g-import-not-at-top
  fig = Figure(figsize=size)
  FigureCanvasAgg(fig)
  return fig


def _series(records: Sequence[Dict[str, Any]], key: str):
  points = [(r['step'], r[key]) for r in records if key in r]
  return tuple(np.array(v) for v in zip(*points)) if points else ([], [])


def write_curves(records: Sequence[Dict[str, Any]],
                 path: str,
                 *,
                 title: str = '') -> None:
  """Training loss (log scale) and test accuracy against the step, to `path`.

  Args:
    records: `progress.read_metrics(workdir)`.
    path: the PNG to write.
    title: shown above both panels.
  """
  curves_figure(records, title=title).savefig(path, dpi=100)


def curves_figure(records: Sequence[Dict[str, Any]], *, title: str = ''):
  """The matplotlib Figure of `write_curves`."""
  fig = _new_figure((10, 3.8))
  ax_loss, ax_acc = fig.subplots(1, 2)
  steps, loss = _series(records, 'train_loss')
  ax_loss.plot(steps, loss, color='#4c72b0')
  if len(loss) and np.all(np.asarray(loss) > 0):
    from matplotlib import ticker  # pylint: disable=g-import-not-at-top
    ax_loss.set_yscale('log')
    # Labels at 1, 2 and 5 times each power of ten, none on minor ticks:
    # matplotlib's default labels every minor tick of a short log range.
    ax_loss.yaxis.set_major_locator(
        ticker.LogLocator(base=10, subs=(1., 2., 5.)))
    ax_loss.yaxis.set_major_formatter(ticker.FormatStrFormatter('%g'))
    ax_loss.yaxis.set_minor_formatter(ticker.NullFormatter())
  ax_loss.set_xlabel('step')
  ax_loss.set_title('training loss')
  steps, acc = _series(records, 'accuracy_test')
  ax_acc.plot(steps, acc, marker='o', color='#dd8452')
  if len(acc):
    ax_acc.annotate(
        f'{acc[-1]:.4f}', (steps[-1], acc[-1]),
        textcoords='offset points',
        xytext=(-10, -14),
        ha='right')
  ax_acc.set_xlabel('step')
  ax_acc.set_title('test accuracy')
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  # Fixed margins: the panels' labels are short and known; tight_layout would
  # draw the figure once more to measure them.
  fig.subplots_adjust(
      left=0.06,
      right=0.98,
      bottom=0.13,
      top=0.8 if title else 0.9,
      wspace=0.15)
  return fig


def write_confusion(matrix: np.ndarray,
                    path: str,
                    *,
                    class_names: Optional[List[str]] = None,
                    title: str = '') -> None:
  """The confusion matrix (rows true, columns predicted) as a heat map PNG.

  Args:
    matrix: [classes, classes] counts.
    path: the PNG to write.
    class_names: tick labels (default: indices); none beyond 40 classes.
    title: prefix of the title, which ends with the accuracy.
  """
  matrix = np.asarray(matrix)
  k = matrix.shape[0]
  names = [str(n) for n in (class_names or range(k))]
  side = min(14., 2.5 + 0.45 * k)
  fig = _new_figure((side + 1, side))
  ax = fig.add_subplot(1, 1, 1)
  # Row-normalised colours, so rare classes' errors show as clearly.
  rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
  image = ax.imshow(rows, cmap='Blues', vmin=0, vmax=1)
  fig.colorbar(
      image,
      ax=ax,
      fraction=0.046,
      pad=0.04,
      label='fraction of the true class')
  if k <= 40:
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(names, rotation=90 if max(map(len, names)) > 3 else 0)
    ax.set_yticklabels(names)
    for i, j in zip(*np.nonzero(matrix)):
      ax.text(
          j,
          i,
          str(int(matrix[i, j])),
          ha='center',
          va='center',
          fontsize=7,
          color='white' if rows[i, j] > 0.5 else 'black')
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  total = matrix.sum()
  accuracy = np.trace(matrix) / total if total else float('nan')
  ax.set_title(f'{title}{" - " if title else ""}test accuracy {accuracy:.4f} '
               f'({int(np.trace(matrix))}/{int(total)})')
  _fit_margins(fig, side, max(map(len, names)) if k <= 40 else len(str(k)))
  fig.savefig(path, dpi=100)


def _fit_margins(fig, side, longest_name):
  """Margins for the tick labels, estimated from the longest class name.

  Cheaper than tight_layout, which draws the figure once more to measure.
  """
  label_in = 0.45 + 0.07 * longest_name  # axis label + tick labels, inches
  fig.subplots_adjust(
      left=min(0.5, label_in / (side + 1)),
      bottom=min(0.5, label_in / side),
      right=1 - 0.75 / (side + 1),  # the colour bar's ticks and label
      top=1 - 0.45 / side)


def write_run_plots(workdir: str,
                    *,
                    last_step: int,
                    confusion=None,
                    class_names=None,
                    title: str = '') -> List[str]:
  """Writes curves.png (and confusion.png if given); returns their names."""
  written = []
  write_curves(
      progress.read_metrics(workdir, last_step),
      os.path.join(workdir, CURVES_FILE),
      title=title)
  written.append(CURVES_FILE)
  if confusion is not None:
    write_confusion(
        confusion,
        os.path.join(workdir, CONFUSION_FILE),
        class_names=class_names,
        title=title)
    written.append(CONFUSION_FILE)
  return written

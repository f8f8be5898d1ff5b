"""curves.png: readable loss-axis labels, a marker at every evaluation."""

import numpy as np
import pytest

from vit_jax.reporting import run_plots


def visible_labels(ax, fig):
  """(text, window extent) of the y tick labels drawn inside the axis."""
  renderer = fig.canvas.get_renderer()
  low, high = sorted(ax.get_ylim())
  labels = []
  for tick in ax.yaxis.get_major_ticks() + ax.yaxis.get_minor_ticks():
    label = tick.label1
    if (label.get_visible() and label.get_text() and
        low <= tick.get_loc() <= high):
      labels.append((label.get_text(), label.get_window_extent(renderer)))
  return labels


@pytest.mark.parametrize('first,last', [(2.3, 0.02), (0.31, 0.12),
                                        (0.09, 0.004)])
def test_loss_axis_labels_do_not_overlap(first, last):
  steps = np.arange(100, 2001, 100)
  loss = np.geomspace(first, last, len(steps))
  records = [{
      'step': int(s),
      'train_loss': float(l)
  } for s, l in zip(steps, loss)]
  records += [{
      'step': s,
      'accuracy_test': a
  } for s, a in ((500, 0.9), (1000, 0.95), (1500, 0.97))]
  fig = run_plots.curves_figure(records)
  fig.canvas.draw()
  ax_loss, ax_acc = fig.axes
  labels = visible_labels(ax_loss, fig)
  assert len(labels) >= 2, [t for t, _ in labels]
  boxes = sorted((box.y0, box.y1, text) for text, box in labels)
  for (_, top, text), (bottom, _, next_text) in zip(boxes, boxes[1:]):
    assert top <= bottom, f'{text!r} overlaps {next_text!r}'
  # Each label is a number that names its tick.
  for text, _ in labels:
    float(text)
  # One marker per evaluation.
  (line,) = ax_acc.get_lines()
  assert list(line.get_xdata()) == [500, 1000, 1500]
  assert line.get_marker() == 'o'

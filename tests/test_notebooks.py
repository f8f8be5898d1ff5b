"""The notebooks in notebooks/ run top to bottom and show what they say.

Each notebook is executed with nbclient in a fresh kernel from a temporary
folder: its outputs stay in memory and in `tmp_path` (the executed copy is
written there), so nothing in the repository changes. The kernel is
ipykernel's, run by this interpreter (`sys.executable`) forked from a
preloaded one (tests/preloaded.py); a cell appended to the copy checks the
interpreter. The notebooks
find the repository through `VIT_JAX_REPO` and write their training runs and
figures to `VIT_JAX_NOTEBOOK_WORKDIR`. One device: XLA_FLAGS holds only
the suite's compile settings (tests/compile_settings.py).

Both notebooks train the same 100-step model into `<workdir>/train`, and
they share one workdir (a module fixture): paper_figures, run after
quickstart, finds quickstart's finished run there and only evaluates it
(`train_and_evaluate` resumes from the newest checkpoint), as a person
re-running a notebook would see. Run alone, it trains.

Besides "no cell failed", the printed numbers are checked: accuracies far
above chance (0.1; the notebooks print 0.739 after their 100 steps), the
exported file reproducing the training accuracy, the official fixture's
logits matching the original's, the figure files and the few-shot table.
"""

import json
import os
import re
import sys

from jupyter_client import kernelspec
from jupyter_client import manager
import nbclient
import nbformat
import numpy as np
import pytest

import compile_settings
import preloaded

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, 'notebooks')
CELL_TIMEOUT_S = 300  # one training cell takes ~20-40 s on 2 CPU cores
CHECK_KERNEL = 'import sys\nprint("KERNEL_PREFIX", sys.prefix)'
# 100 steps reach 0.739, 30 fine-tuning steps at 42x42 0.426; chance is 0.1.
MIN_ACCURACY = 0.3


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """The notebooks' shared VIT_JAX_NOTEBOOK_WORKDIR."""
  return tmp_path_factory.mktemp('notebooks') / 'work'


def _execute(name, tmp_path, workdir):
  """Runs notebooks/<name>.ipynb; returns (stdout text, outputs)."""
  nb = nbformat.read(os.path.join(NOTEBOOKS, f'{name}.ipynb'), as_version=4)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      cell.outputs, cell.execution_count = [], None
  nb.cells.append(nbformat.v4.new_code_cell(CHECK_KERNEL))
  env = dict(
      os.environ,
      XLA_FLAGS=compile_settings.XLA_FLAGS,
      VIT_JAX_REPO=REPO,
      VIT_JAX_NOTEBOOK_WORKDIR=str(workdir),
      TF_CPP_MIN_LOG_LEVEL='2')
  client = nbclient.NotebookClient(
      nb,
      km=_kernel_manager(tmp_path, env),
      timeout=CELL_TIMEOUT_S,
      resources={'metadata': {
          'path': str(tmp_path)
      }})
  try:
    client.execute(env=env)  # raises CellExecutionError naming the cell
  finally:
    nbformat.write(nb, str(tmp_path / f'{name}.executed.ipynb'))
  outputs = [
      o for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs
  ]
  stdout = ''.join(o.text
                   for o in outputs
                   if o.output_type == 'stream' and o.name == 'stdout')
  assert f'KERNEL_PREFIX {sys.prefix}\n' in stdout, (
      'the kernel did not run in this environment', stdout[-500:])
  return stdout, outputs


def _kernel_manager(tmp_path, env):
  """ipykernel's `python3` kernel, started from a preloaded interpreter
  (tests/preloaded.py) under a kernel spec of its own."""
  folder = tmp_path / 'kernels' / 'python3_preloaded'
  folder.mkdir(parents=True)
  argv = preloaded.command(env, '-m', 'ipykernel_launcher', '-f',
                           '{connection_file}')
  (folder / 'kernel.json').write_text(
      json.dumps(dict(argv=argv, display_name='Python 3', language='python')))
  specs = kernelspec.KernelSpecManager(kernel_dirs=[str(folder.parent)])
  return manager.KernelManager(
      kernel_name='python3_preloaded', kernel_spec_manager=specs)


def _number(pattern, text):
  match = re.search(pattern, text)
  assert match, f'{pattern!r} not printed:\n{text[-3000:]}'
  return [float(g.replace(',', '')) for g in match.groups()]


def _png_outputs(outputs):
  return [
      o for o in outputs
      if o.output_type in ('display_data',
                           'execute_result') and 'image/png' in o.data
  ]


def _summary(workdir):
  with open(workdir / 'train' / 'summary.json') as f:
    return json.load(f)


def test_quickstart(tmp_path, workdir):
  stdout, outputs = _execute('quickstart', tmp_path, workdir)

  accuracy, = _number(r'Test accuracy after 100 steps: ([0-9.]+)', stdout)
  assert accuracy > MIN_ACCURACY
  reloaded, reported = _number(
      r'Accuracy of the exported file on 1000 test digits: ([0-9.]+) '
      r'\(training reported ([0-9.]+)\)', stdout)
  assert reloaded == reported == accuracy
  assert os.path.isfile(workdir / 'vit_mnist.npz')

  assert 'position embedding (1, 17, 64) -> (1, 37, 64)' in stdout
  assert 'head after load_pretrained is all zeros: True' in stdout
  ft_accuracy, = _number(
      r'Fine-tuned test accuracy at 42x42 after 30 steps: ([0-9.]+)', stdout)
  assert ft_accuracy > MIN_ACCURACY

  fixture = os.path.join(REPO, 'tests', 'data', 'official',
                         'tiny_vit_token_params_prelinen_names.npz')
  with np.load(fixture) as f:
    expected_count = sum(f[k].size for k in f.files)
  count, = _number(
      r'tiny_vit_token_params_prelinen_names.npz: ([0-9,]+) '
      'parameters', stdout)
  assert count == expected_count
  diff, = _number(r'max \|logits - original implementation\| = (\S+)', stdout)
  assert diff < 1e-5
  # The top-3 grid and the training curves.
  assert len(_png_outputs(outputs)) >= 2


def test_paper_figures(tmp_path, workdir):
  trained = _summary(workdir) if (workdir / 'train').is_dir() else None
  stdout, outputs = _execute('paper_figures', tmp_path, workdir)

  accuracy, = _number(r'Test accuracy after 100 steps: ([0-9.]+)', stdout)
  assert accuracy > MIN_ACCURACY
  if trained:  # quickstart's run, evaluated again
    assert _summary(workdir)['start_step'] == trained['step'] == 100
    assert accuracy == trained['accuracy']
  for figure in ('filters_pca', 'posemb_similarity', 'attention_distance',
                 'attention_rollout'):
    with open(workdir / 'figures' / f'{figure}.png', 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', figure
  # The four figures and the rollout maps.
  assert len(_png_outputs(outputs)) >= 5

  layers = re.findall(r'layer \d: (.*) pixels \(per head\)', stdout)
  assert len(layers) == 4
  distances = np.array([[float(d) for d in line.split()] for line in layers])
  assert distances.shape == (4,
                             4) and np.all((distances > 0) & (distances < 30))

  table = re.findall(
      r'^\s*(\d+)\s+([0-9.]+) \+- [0-9.]+\s+([0-9.]+) \+- ', stdout, flags=re.M)
  assert [int(k) for k, _, _ in table] == [1, 5, 10, 25], stdout[-1500:]
  for k, trained, untrained in table:
    assert float(trained) > float(untrained) + 0.1, (k, trained, untrained)
  assert float(table[-1][1]) > MIN_ACCURACY

"""notebooks/colab_tpu.ipynb: its Python cells run top to bottom on a CPU with a smoke config.

The shell lines (``!git clone``, ``%cd``, ``!pip``) are Colab's setup and are skipped; the
rest runs as one script in a fresh process, as a notebook kernel would run the cells.
"""

import json
import os
import subprocess
import sys

from tests import conftest

NOTEBOOK = os.path.join(conftest.REPO_ROOT, 'notebooks', 'colab_tpu.ipynb')


def _python_of_cells():
  with open(NOTEBOOK) as f:
    notebook = json.load(f)
  lines = []
  for cell in notebook['cells']:
    if cell['cell_type'] == 'code':
      source = ''.join(cell['source']).splitlines()
      lines += [line for line in source if not line.lstrip().startswith(('!', '%'))] + ['']
  return '\n'.join(lines)


def test_code_cells_train_and_plot_on_cpu(fashion_mnist_data_dir, tmp_path):
  workdir = tmp_path / 'run'
  env = dict(
    os.environ,
    SAF_JAX_SMOKE='1',
    SAF_JAX_WORKDIR=str(workdir),
    TFDS_DATA_DIR=fashion_mnist_data_dir,  # TFDS's default data_dir (config.input.data_dir=None).
    MPLBACKEND='Agg',
    TF_CPP_MIN_LOG_LEVEL='3',
    XLA_FLAGS='--xla_force_host_platform_device_count=8',  # The 8 cores of a TPU v2-8.
  )
  proc = subprocess.run(
    [sys.executable, '-c', _python_of_cells()],
    cwd=conftest.REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '8 cpu devices' in proc.stdout
  assert 'saf: 4 epochs, batch 64 over 8 devices' in proc.stdout
  assert 'method=saf epochs=4 test/accuracy=' in proc.stdout
  assert os.path.getsize(workdir / 'curves.png') > 10_000
  with open(workdir / 'metrics.jsonl') as f:
    assert [json.loads(line)['epoch'] for line in f] == [1, 2, 3, 4]

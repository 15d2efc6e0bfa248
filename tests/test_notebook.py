"""notebooks/colab_tpu.ipynb: its Python cells run top to bottom on a CPU with a smoke config.

The shell lines (``%cd``, ``!pip``) are Colab's setup and are skipped; the rest runs as one
script in a fresh process, as a notebook kernel would run the cells (the first cell fetches
the code only on Colab). The install cells must leave Colab's JAX and TensorFlow alone, and
the saved outputs must be those of a whole CPU smoke run.
"""

import json
import os
import subprocess
import sys

from tests import conftest

NOTEBOOK = os.path.join(conftest.REPO_ROOT, 'notebooks', 'colab_tpu.ipynb')


def _notebook():
  with open(NOTEBOOK) as f:
    return json.load(f)


def _code_cells():
  return [''.join(c['source']) for c in _notebook()['cells'] if c['cell_type'] == 'code']


def _python_of_cells():
  lines = []
  for cell in _notebook()['cells']:
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


def test_install_cells_keep_colabs_jax_and_tensorflow_and_need_no_editing():
  setup = '\n'.join(_code_cells()[:2])
  # No placeholder to edit: the URL is one variable whose default ('') asks for an upload.
  assert "SAF_JAX_REPO = ''" in setup and 'YOUR_ACCOUNT' not in setup
  # Colab's jax, jaxlib, libtpu and tensorflow are held at their installed versions.
  assert "!grep -iE '^(jax[-_a-z0-9]*|libtpu[-_a-z]*|tensorflow)==' /tmp/pip.txt" in setup
  assert "!pip install -q -c /tmp/pins.txt '.[train,analysis]'" in setup
  for absent in ('tensorflow-cpu', 'tensorflow_cpu', 'requirements', 'pytest', 'ruff', '[test'):
    assert absent not in setup, absent


def test_saved_outputs_are_a_cpu_smoke_run():
  cells = [c for c in _notebook()['cells'] if c['cell_type'] == 'code']
  assert all(c['execution_count'] for c in cells)  # Run top to bottom, every cell.
  text = {}
  for i, cell in enumerate(cells):
    text[i] = ''.join(''.join(o.get('text', '')) for o in cell['outputs'])
  assert '1 cpu devices' in text[2]
  assert 'saf: 4 epochs, batch 64 over 1 devices' in text[3]
  assert 'method=saf epochs=4 test/accuracy=' in text[4]
  assert 'epoch 4/4  loss ' in text[4]
  assert any('image/png' in o.get('data', {}) for o in cells[5]['outputs'])  # The curves.
  assert not any(o['output_type'] == 'error' for c in cells for o in c['outputs'])

"""End to end: `python main.py` as a subprocess, on real Fashion-MNIST, like a user runs it."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from saf_jax import checkpoint
from tests import conftest

SMOKE_EPOCHS = 4  # configs/default.py:smoke: E_start = 1 and, for SAF, E_tilde = 2.
SAM_FAMILY_RUNS = ('sam', 'asam', 'gsam', 'looksam', 'esam', 'saf+sam')


def _main(workdir, config_arg, data_dir, *overrides, check=True, num_cpu_devices=None):
  cmd = [
    sys.executable,
    'main.py',
    f'--config=configs/default.py:{config_arg}',
    f'--workdir={workdir}',
    f'--config.input.data_dir={data_dir}',
    *overrides,
  ]
  env = dict(os.environ)  # TensorFlow's own log level unset: main.py keeps the console quiet.
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)
  if num_cpu_devices is not None:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_cpu_devices}'
  proc = subprocess.run(
    cmd, cwd=conftest.REPO_ROOT, capture_output=True, text=True, env=env, timeout=900
  )
  if check and proc.returncode != 0:
    raise AssertionError(f'main.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
  return proc


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def smoke_runs(fashion_mnist_data_dir, tmp_path_factory):
  """One smoke run of each method, same seed: {method: (workdir, records, stdout, stderr)}."""
  runs = {}
  for method in ('sgd', 'saf', 'mesa', *SAM_FAMILY_RUNS):
    workdir = str(tmp_path_factory.mktemp(method.replace('+', '_')))
    proc = _main(workdir, f'method={method},smoke', fashion_mnist_data_dir)
    runs[method] = (workdir, _records(workdir), proc.stdout, proc.stderr)
  return runs


@pytest.mark.parametrize('method', ['sgd', 'saf', 'mesa', *SAM_FAMILY_RUNS])
def test_smoke_run_writes_metrics_and_config(smoke_runs, method):
  workdir, records, stdout, _ = smoke_runs[method]
  assert [r['epoch'] for r in records] == list(range(1, SMOKE_EPOCHS + 1))
  steps_per_epoch = 512 // 64
  assert [r['step'] for r in records] == [steps_per_epoch * e for e in range(1, 5)]
  for r in records:
    for key in (
      'train/loss',
      'train/ce_loss',
      'train/trajectory_loss',
      'train/images_per_sec',
      'test/accuracy',
      'test/loss',
    ):
      assert np.isfinite(r[key]), key
    # The total is CE + lam * trajectory (per step, so also in the epoch mean).
    lam = {'saf': 0.3, 'mesa': 0.8}.get(method.split('+')[0], 0.0)
    np.testing.assert_allclose(
      r['train/loss'], r['train/ce_loss'] + lam * r['train/trajectory_loss'], rtol=1e-5
    )
  # Trajectory loss: 0 in epoch 1 (<= E_start), positive afterwards for SAF and MESA,
  # except SAF's epoch 2, whose targets (epoch 2 - E_tilde = 0) do not exist: all masked.
  assert records[0]['train/trajectory_loss'] == 0.0
  trajectory = method.split('+')[0]
  if trajectory in ('saf', 'mesa'):
    assert [r['train/trajectory_active'] for r in records] == [0, 1, 1, 1]
    first_valid = 2 if trajectory == 'saf' else 1
    assert all(r['train/trajectory_loss'] == 0 for r in records[:first_valid])
    assert all(r['train/trajectory_loss'] > 0 for r in records[first_valid:])
  # 512 examples, 256 test examples: a trained tiny CNN is well above chance (0.1); the
  # SAM family's ascent slows such a short run down.
  assert records[-1]['test/accuracy'] > (0.3 if method in ('sgd', 'saf', 'mesa') else 0.2)
  assert f'method={method} epochs={SMOKE_EPOCHS} test/accuracy=' in stdout
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['method']['name'] == method


def test_console_is_start_up_quiet_with_short_epoch_lines(smoke_runs):
  _, records, _, stderr = smoke_runs['mesa']
  # TensorFlow's start-up lines (printed before its logging starts), TFDS's file notices.
  for noise in ('absl::InitializeLog', 'oneDNN', 'cpu_feature_guard', 'dataset_info.py'):
    assert noise not in stderr, noise
  # absl's prefix shortened to 'I 23:42:38 train.py] ', then the epoch line.
  lines = stderr.replace('\r', '\n').splitlines()  # Without the progress bars' redraws.
  lines = [line for line in lines if ' train.py] epoch ' in line]
  assert len(lines) == SMOKE_EPOCHS
  for full, r in zip(lines, records, strict=True):
    assert len(full) < 120, full
    assert re.fullmatch(r'I \d\d:\d\d:\d\d train\.py\] .*', full), full
    line = full.split('] ', 1)[1]
    assert line.startswith(f'epoch {r["epoch"]}/{SMOKE_EPOCHS}  loss {r["train/loss"]:.4g}  ')
    test, teacher = 100 * r['test/accuracy'], 100 * r['test_ema/accuracy']
    assert f'  test {test:.1f}%  teacher {teacher:.1f}%  ' in line
    assert line.endswith(f'  {r["train/images_per_sec"]:.0f} images/s')


def test_saf_table_valid_fraction(smoke_runs):
  _, records, *_ = smoke_runs['saf']
  # E_tilde = 2 and 512 = 8 * 64 (no example dropped): epochs 1 and 2 have no targets.
  assert [r['train/table_valid_fraction'] for r in records] == [0.0, 0.0, 1.0, 1.0]


def test_mesa_reports_ema_accuracy(smoke_runs):
  _, records, *_ = smoke_runs['mesa']
  assert all(0.0 <= r['test_ema/accuracy'] <= 1.0 for r in records)
  # EMA (beta = 0.9 in smoke) lags the student: a different model, different numbers.
  assert any(r['test_ema/loss'] != r['test/loss'] for r in records)


def test_methods_share_init_data_order_and_schedule(smoke_runs):
  # Epoch 1 is before E_start for SAF and MESA: all three are the same SGD run there.
  first = {m: smoke_runs[m][1][0] for m in smoke_runs}
  for method in ('saf', 'mesa'):
    for key in ('train/loss', 'train/accuracy', 'test/accuracy', 'test/loss'):
      np.testing.assert_allclose(first[method][key], first['sgd'][key], rtol=1e-5, err_msg=key)
  # After E_start the trajectory loss makes them differ.
  assert smoke_runs['saf'][1][-1]['train/loss'] != smoke_runs['sgd'][1][-1]['train/loss']
  # Likewise 'saf+sam' is SAM until E_start, then SAM on CE + lam * trajectory.
  for key in ('train/loss', 'train/accuracy', 'test/accuracy', 'test/loss'):
    np.testing.assert_allclose(first['saf+sam'][key], first['sam'][key], rtol=1e-5, err_msg=key)
  assert smoke_runs['saf+sam'][1][-1]['train/loss'] != smoke_runs['sam'][1][-1]['train/loss']
  # SAM's clean loss of epoch 1 differs from SGD's: its updates use the perturbed gradient.
  assert first['sam']['train/loss'] != first['sgd']['train/loss']


def test_resume_after_an_epoch_reproduces_the_run(smoke_runs, fashion_mnist_data_dir, tmp_path):
  workdir, records, *_ = smoke_runs['saf']
  resumed = tmp_path / 'resumed'
  # The state after epoch 3, as if the run had stopped during epoch 4. With E_tilde = 2
  # epoch 4 reads the rows written in epoch 2 from the restored table.
  import shutil

  shutil.copytree(workdir, resumed)
  last = max(checkpoint.saved_steps(str(resumed)))  # Step 32: 4 epochs of 8 steps.
  shutil.rmtree(resumed / 'checkpoints' / str(last))  # The SAF table too: it is on the device.
  assert not (resumed / 'checkpoints_table').exists()
  _main(str(resumed), 'method=saf,smoke', fashion_mnist_data_dir)
  again = _records(str(resumed))
  assert [r['epoch'] for r in again] == [1, 2, 3, 4]
  for key in ('train/loss', 'train/trajectory_loss', 'test/accuracy', 'test/loss'):
    np.testing.assert_allclose(again[-1][key], records[-1][key], rtol=1e-6, err_msg=key)


def test_bad_value_fails_before_anything_is_written(fashion_mnist_data_dir, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('keep me')
  proc = _main(
    str(workdir),
    'method=saf,smoke',
    fashion_mnist_data_dir,
    '--config.method.saf.tau=0.0',
    check=False,
  )
  assert proc.returncode != 0
  assert 'config.method.saf.tau must be a number > 0, got 0.0' in proc.stderr
  assert sorted(os.listdir(workdir)) == ['notes.txt']
  assert (workdir / 'notes.txt').read_text() == 'keep me'


def test_incompatible_checkpoint_is_refused_and_kept(smoke_runs, fashion_mnist_data_dir):
  workdir, records, *_ = smoke_runs['sgd']
  listing = sorted(os.walk(workdir))
  proc = _main(
    workdir, 'method=sgd,smoke', fashion_mnist_data_dir, '--config.model.width=16', check=False
  )
  assert proc.returncode != 0
  assert 'model.width: workdir has 8, config has 16' in proc.stderr
  assert sorted(os.walk(workdir)) == listing
  assert _records(workdir) == records


def test_per_device_run_refuses_to_resume_on_another_device_count(fashion_mnist_data_dir, tmp_path):
  """With the per-device scope the device count sets SAM's m: a resume must keep it."""
  workdir = str(tmp_path / 'm')
  args = ('method=sam,smoke', fashion_mnist_data_dir, '--config.num_epochs=1')
  scope = '--config.method.perturbation_scope=per_device'
  _main(workdir, *args, scope, num_cpu_devices=2)
  records = _records(workdir)
  listing = sorted(os.walk(workdir))
  config_json = (tmp_path / 'm' / 'config.json').read_text()
  proc = _main(workdir, *args, scope, '--config.mesh.data=1', check=False, num_cpu_devices=2)
  assert proc.returncode != 0
  assert 'was trained on 2 devices but this run has 1: set config.mesh.data=2' in proc.stderr
  assert sorted(os.walk(workdir)) == listing
  assert (tmp_path / 'm' / 'config.json').read_text() == config_json
  assert _records(workdir) == records
  # The same command on the same device count finds the run finished.
  proc = _main(workdir, *args, scope, num_cpu_devices=2)
  assert 'all 1 epochs were already done' in proc.stdout


def _error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith('error: ')]


@pytest.mark.parametrize(
  'args, message',
  [
    (('--config.optimizer.lrr=0.1',), '--config has no field \'lrr\'. Did you mean "lr"'),
    (('--config.input.batch_size=0',), 'config.input.batch_size must be an integer >= 1, got 0.'),
    (('--config.input.dataset=folder:/no/such/dir',), '/no/such/dir does not exist'),
  ],
)
def test_a_mistake_is_one_error_line_and_status_2(fashion_mnist_data_dir, tmp_path, args, message):
  proc = _main(
    str(tmp_path / 'run'), 'method=saf,smoke', fashion_mnist_data_dir, *args, check=False
  )
  assert proc.returncode == 2
  (line,) = _error_lines(proc.stderr)  # Exactly one.
  assert message in line
  assert 'Traceback' not in proc.stderr
  assert not os.path.exists(tmp_path / 'run' / 'config.json')
  # --verbose shows the traceback instead.
  proc = _main(
    str(tmp_path / 'run'),
    'method=saf,smoke',
    fashion_mnist_data_dir,
    *args,
    '--verbose',
    check=False,
  )
  assert proc.returncode != 0 and 'Traceback' in proc.stderr and not _error_lines(proc.stderr)


def test_a_bad_config_argument_or_file_is_one_error_line(tmp_path):
  for config, message in (
    ('configs/default.py:methd=saf', "Unknown config argument 'methd' in 'methd=saf'"),
    ('configs/no_such.py', "--config: [Errno 2] No such file or directory: 'configs/no_such.py'"),
  ):
    cmd = [sys.executable, 'main.py', f'--config={config}', f'--workdir={tmp_path}']
    proc = subprocess.run(cmd, cwd=conftest.REPO_ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = _error_lines(proc.stderr)
    assert message in line and 'Traceback' not in proc.stderr

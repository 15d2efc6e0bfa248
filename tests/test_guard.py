"""The workdir's guards: one run at a time, a writable workdir, finite checkpoints only.

The faults are reproduced as a user meets them: `python main.py` in subprocesses on real
Fashion-MNIST, two at once on one workdir, a run killed with SIGKILL while it holds the
lock, a read-only mount (a private mount namespace: `unshare -m`, skipped where the test
environment cannot make one), and a diverging run that saves a checkpoint every step.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import default
from saf_jax import checkpoint, guard
from saf_jax.data import base
from tests import conftest
from tests.test_main import _main, _records

SMOKE = ('--config.analysis.sharpness_every_epochs=0',)


def _listing(workdir):
  """Every file of ``workdir`` with its bytes."""
  files = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, workdir)] = f.read()
  return files


def _wait_for_holder(workdir, proc, timeout=300):
  """Waits until ``proc`` has written itself into the workdir's lock file."""
  path = os.path.join(workdir, guard.LOCK_FILE)
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    if os.path.exists(path) and os.path.getsize(path):
      with open(path) as f:
        return json.load(f)
    time.sleep(0.05)
  raise AssertionError('the run never took the lock')


def test_lock_refuses_a_second_holder_naming_the_first_and_is_released(tmp_path):
  workdir = str(tmp_path)
  with guard.lock(workdir):
    with open(os.path.join(workdir, guard.LOCK_FILE)) as f:
      holder = json.load(f)
    assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname()
    # flock is per open file: a second open in the same process conflicts too.
    with pytest.raises(ValueError, match=rf'in use by another run \(pid {os.getpid()} on host'):
      with guard.lock(workdir):
        pass
  assert os.path.getsize(os.path.join(workdir, guard.LOCK_FILE)) == 0  # Released.
  with guard.lock(workdir):  # Free again.
    pass


def test_lock_of_a_sigkilled_holder_does_not_block_the_next_run(tmp_path):
  workdir = str(tmp_path)
  holder = subprocess.Popen(
    [
      sys.executable,
      '-c',
      'import sys, time; from saf_jax import guard\nwith guard.lock(sys.argv[1]): time.sleep(600)',
      workdir,
    ],
    cwd=conftest.REPO_ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    assert _wait_for_holder(workdir, holder)['pid'] == holder.pid
    with pytest.raises(ValueError, match=rf'pid {holder.pid} on host'):
      with guard.lock(workdir):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The file still names the dead holder; its flock died with it.
  assert os.path.getsize(os.path.join(workdir, guard.LOCK_FILE)) > 0
  with guard.lock(workdir):
    with open(os.path.join(workdir, guard.LOCK_FILE)) as f:
      assert json.load(f)['pid'] == os.getpid()


def test_a_second_run_on_a_workdir_in_use_is_refused_and_the_first_is_unharmed(
  fashion_mnist_data_dir, tmp_path
):
  workdir = str(tmp_path / 'run')
  command = [
    sys.executable,
    'main.py',
    '--config=configs/default.py:method=saf,smoke',
    f'--workdir={workdir}',
    f'--config.input.data_dir={fashion_mnist_data_dir}',
    *SMOKE,
  ]
  first = subprocess.Popen(
    command, cwd=conftest.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  holder = _wait_for_holder(workdir, first)
  second = subprocess.run(command, cwd=conftest.REPO_ROOT, capture_output=True, text=True)
  _, stderr = first.communicate(timeout=900)
  assert first.returncode == 0, stderr[-3000:]
  assert second.returncode == 2
  errors = [line for line in second.stderr.splitlines() if line.startswith('error:')]
  assert errors == [
    f'error: Workdir {workdir!r} is in use by another run (pid {holder["pid"]} on host '
    f'{holder["host"]}, started {holder["started"]}); wait for it to end, or use another '
    '--workdir. (--verbose shows the traceback)'
  ]
  assert 'Mesh' not in second.stderr  # Refused before the data and the experiment.
  assert [r['epoch'] for r in _records(workdir)] == [1, 2, 3, 4]
  assert os.path.getsize(os.path.join(workdir, guard.LOCK_FILE)) == 0


def test_analyze_runs_while_the_workdir_is_locked(fashion_mnist_data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  _main(workdir, 'method=sgd,smoke', fashion_mnist_data_dir, *SMOKE, '--config.num_epochs=1')
  with guard.lock(workdir):
    proc = subprocess.run(
      [
        sys.executable,
        '-m',
        'saf_jax.tools.analyze',
        f'--workdir={workdir}',
        '--tools=sharpness',
        f'--data_dir={fashion_mnist_data_dir}',
        '--num_examples=64',
        '--batch_size=64',
      ],
      cwd=conftest.REPO_ROOT,
      capture_output=True,
      text=True,
      timeout=600,
    )
  assert proc.returncode == 0, proc.stderr[-3000:]


def _unshare(script):
  """Runs ``script`` (sh) in a private mount namespace; skips where none can be made."""
  probe = subprocess.run(
    ['unshare', '-m', 'sh', '-c', 'mount -t tmpfs -o size=1M none /mnt'],
    capture_output=True,
    text=True,
  )
  if probe.returncode != 0:
    pytest.skip(f'no private mount namespace here: {probe.stderr.strip()}')
  return subprocess.run(
    ['unshare', '-m', 'sh', '-c', script],
    cwd=conftest.REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_a_read_only_workdir_is_refused_in_one_line_before_any_data(
  fashion_mnist_data_dir, tmp_path
):
  mount = tmp_path / 'mnt'
  mount.mkdir()
  proc = _unshare(
    f'mount -t tmpfs -o ro,size=1M none {mount} && '
    f'{sys.executable} main.py --config=configs/default.py:method=saf,smoke '
    f'--workdir={mount}/run --config.input.data_dir={fashion_mnist_data_dir}'
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr and 'Mesh' not in proc.stderr
  assert [line for line in proc.stderr.splitlines() if not line.startswith('I ')] == [
    f"error: --workdir '{mount}/run' is not writable (Read-only file system): a run writes "
    'its config, metrics and checkpoints there; use a writable --workdir. (--verbose shows '
    'the traceback)'
  ]


def test_check_writable_names_a_full_disk(tmp_path):
  mount = tmp_path / 'mnt'
  mount.mkdir()
  proc = _unshare(
    f'mount -t tmpfs -o size=64k none {mount} && '
    f'head -c 1000000 /dev/zero > {mount}/filler; mkdir {mount}/run && '
    f'{sys.executable} -c "from saf_jax import guard; guard.check_writable(\'{mount}/run\')"'
  )
  assert proc.returncode == 1
  assert 'is not writable (No space left on device)' in proc.stderr


def test_changed_dataset_shape_is_refused_naming_both(tmp_path):
  config = default.get_config('method=saf,smoke')
  info = base.DatasetInfo('folder:x', 10, 4, 3, (12, 12, 3))
  guard.write_config(config, str(tmp_path), info)
  guard.check_dataset(str(tmp_path), info)  # The same dataset.
  guard.check_config(config, str(tmp_path))  # The record is not a config field.
  with pytest.raises(ValueError, match=r'has 3 classes, this run has 4 classes: its dataset'):
    guard.check_dataset(str(tmp_path), base.DatasetInfo('folder:x', 10, 4, 4, (12, 12, 3)))
  with pytest.raises(ValueError, match=r'has 10 training examples, this run has 12 training'):
    guard.check_dataset(str(tmp_path), base.DatasetInfo('folder:x', 12, 4, 3, (12, 12, 3)))
  with pytest.raises(ValueError, match=r'has images of shape \(12, 12, 3\), this run has'):
    guard.check_dataset(str(tmp_path), base.DatasetInfo('folder:x', 10, 4, 3, (16, 16, 3)))
  guard.check_dataset(str(tmp_path), base.DatasetInfo('folder:x', 10, 9, 3, (12, 12, 3)))
  # A config.json of an earlier saf_jax has no record: not checked.
  with open(guard.config_path(str(tmp_path)), 'w') as f:
    f.write(config.to_json())
  guard.check_dataset(str(tmp_path), base.DatasetInfo('folder:x', 1, 1, 1, (1, 1, 1)))


def _all_finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


def test_a_diverging_run_never_saves_a_non_finite_state(fashion_mnist_data_dir, tmp_path):
  """The reproduction of the fault: BatchNorm variances turn inf while the loss is finite."""
  workdir = str(tmp_path / 'diverged')
  args = (
    'method=saf,smoke',
    fashion_mnist_data_dir,
    '--config.optimizer.lr=50',
    '--config.optimizer.schedule=constant',
    '--config.checkpoint.every_steps=1',
  )
  proc = _main(workdir, *args, check=False)
  assert proc.returncode == 2
  stopped = re.search(
    r'error: Non-finite state at step (\d+); training stopped without saving', proc.stderr
  )
  assert stopped, proc.stderr[-3000:]
  assert 'batch_stats/' in proc.stderr
  bad_step = int(stopped[1])
  steps = checkpoint.saved_steps(workdir)
  assert steps and steps[-1] == bad_step - 1  # The newest finite one is kept.
  for step in steps:
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=100)
    try:
      state, _, _ = ckpt.restore(step, None, None)
    finally:
      ckpt.close()
    assert _all_finite(state), step
  before = _listing(os.path.join(workdir, 'checkpoints'))
  # A rerun resumes from the finite checkpoint, diverges at the same step, saves nothing.
  again = _main(workdir, *args, check=False)
  assert again.returncode == 2
  assert f'Resumed at step {bad_step - 1}' in again.stderr
  assert f'error: Non-finite state at step {bad_step};' in again.stderr
  assert _listing(os.path.join(workdir, 'checkpoints')) == before
  shutil.rmtree(workdir)

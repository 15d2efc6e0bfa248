"""Data parallelism changes nothing: SGD, SAF and MESA on 1 and on 8 devices train the same.

Each method trains with ``python main.py`` (as a subprocess, since the device count must be
fixed before JAX starts) in one environment of 8 CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), once with ``config.mesh.data=1``
and once with ``config.mesh.data=8``: the same XLA flags, the same data, init and schedule,
only the mesh differs. The 8-device run splits each batch of 64 over 8 devices (8 examples
each), so every cross-example reduction (the mean loss and its gradients, BatchNorm's batch
statistics, accuracy) becomes a cross-device one; SAF writes and reads its logit table with
the example ids of sharded batches, MESA keeps its EMA teacher replicated. Any of these done
per device instead of over the global batch would change the numbers by far more than
rounding: at init, BatchNorm statistics over 8 instead of 64 examples move the logits by ~20%
and the gradient of 8 examples differs from the batch's by more than its own norm.

Checked, per method: every metric of every epoch in ``metrics.jsonl`` (train/loss,
train/ce_loss, train/trajectory_loss, train/accuracy, train/l2_*, test/*, MESA's test_ema/*;
timings excepted) and, restored with ``saf_jax.analysis.runs.load_run``, the final ``params``,
``batch_stats`` and optimizer state (MESA: also ``ema_params``, ``ema_batch_stats``). Also
that the runs used the devices they were asked for, that the trajectory loss was active and
positive (so the comparison covers it), that SAF's table is complete on 8 devices as on 1
(``train/table_valid_fraction``), and that ``mesh.data=1`` under 8 forced devices is the run
of a 1-device process (so the 1-device reference is the plain one).

Tolerance: ``rtol=1e-5, atol=1e-6``, float32. The 8-device program sums in another order, so
results are not bit-identical; over these 12 steps (3 epochs of 4 steps: 256 examples, batch
64) the measured differences were at most 3e-7 in params, 4e-7 in batch statistics and
2.4e-7 (1e-7 relative) in the metrics, for all three methods (the trajectory loss, a small
KL, differs by up to 1.6e-7 absolute); ``mesh.data=1`` under 8 forced devices equalled the
1-device process bit for bit.

The optimizer state, SGD's momentum, is the last few steps' gradients: sums over 64 examples
and all pixels that largely cancel, so their rounding differences are larger relative to the
values than the params' (which the small learning rate damps), most so where the trajectory
loss adds its own: measured up to 1.4e-5 absolute, or 1.3e-4 of the leaf's largest entry
(MESA; SGD 5e-6, SAF 3e-5). It is compared with ``atol`` raised by 1e-3 of each leaf's
largest entry, still far below what a gradient over one device's 8 examples would give.

The run is kept this short on purpose: rounding differences grow with the steps, and once
one ReLU of one example crosses zero in one run and not in the other (here after ~11 steps
with 512 examples), the gradient jumps and params differ by ~1e-4, exactly as between two
1-device runs compiled with and without XLA's optimizations. If a change of data order puts
such a crossing inside these 12 steps, shorten the run rather than widen the tolerance,
which would hide real bugs.
"""

import json
import os
import re

import jax
import numpy as np
import pytest

from saf_jax.analysis import runs as analysis_runs
from tests import test_main

NUM_DEVICES = 8
METHODS = ('sgd', 'saf', 'mesa')
RTOL, ATOL = 1e-5, 1e-6
# Gradients (the momentum): atol = ATOL + GRAD_ATOL_SCALE * max |leaf|, see the docstring.
GRAD_ATOL_SCALE = 1e-3
NUM_EPOCHS = 3
OVERRIDES = (
  f'--config.num_epochs={NUM_EPOCHS}',
  '--config.input.num_train_examples=256',  # 4 steps of 64 (8 per device) per epoch.
  # Smoke has E_start = 1 for SAF and MESA: the trajectory loss is on in epochs 2 and 3;
  # E_tilde = 1 gives SAF targets in both (epoch 2 reads epoch 1's logits, 3 reads 2's).
  '--config.method.saf.E_tilde=1',
  '--config.analysis.sharpness_every_epochs=0',
)
# Only wall-clock measurements may differ between the runs.
_TIMING = re.compile(r'_sec$')
_MESH_LINE = re.compile(r'Mesh \{.*\} over (\d+) devices\.')
_PLACEMENT_LINE = re.compile(r'Placement: training set .* -> (\w+);.*SAF table .* -> (\w+)\.')
# Both the data and SAF's table on the host: the run the device placement must equal.
HOST = ('--config.input.placement=host', '--config.method.saf.table_placement=host')


def _run(workdir, method, data_dir, *overrides, num_cpu_devices):
  proc = test_main._main(
    workdir,
    f'method={method},smoke',
    data_dir,
    *OVERRIDES,
    *overrides,
    num_cpu_devices=num_cpu_devices,
  )
  mesh = _MESH_LINE.findall(proc.stderr)
  return {
    'workdir': workdir,
    'records': test_main._records(workdir),
    'mesh_devices': [int(n) for n in mesh],
    'placement': _PLACEMENT_LINE.findall(proc.stderr),
  }


@pytest.fixture(scope='module')
def runs(fashion_mnist_data_dir, tmp_path_factory):
  """``{(method, mesh.data): run}``, all under 8 forced CPU devices, plus ('sgd', 'single').

  ('sgd', 'single') is a process with 1 CPU device and the default ``mesh.data=-1``. The
  default placement puts this small training set and SAF table on the devices; ('saf',
  mesh.data, 'host') are the same SAF runs with both on the host.
  """
  result = {}
  with pytest.MonkeyPatch.context() as mp:
    # Compile time dominates these short runs (~13 s instead of ~18 s each); the flag is
    # the same for every run, so the comparison is unaffected.
    mp.setenv('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
    for method in METHODS:
      for data in (1, NUM_DEVICES):
        workdir = str(tmp_path_factory.mktemp(f'{method}_{data}'))
        result[method, data] = _run(
          workdir,
          method,
          fashion_mnist_data_dir,
          f'--config.mesh.data={data}',
          num_cpu_devices=NUM_DEVICES,
        )
    for data in (1, NUM_DEVICES):
      workdir = str(tmp_path_factory.mktemp(f'saf_{data}_host'))
      result['saf', data, 'host'] = _run(
        workdir,
        'saf',
        fashion_mnist_data_dir,
        f'--config.mesh.data={data}',
        *HOST,
        num_cpu_devices=NUM_DEVICES,
      )
    # The data on the devices with the table on the host, and 4 steps per call.
    for name, flags in (
      ('mixed', ('--config.input.placement=device', '--config.method.saf.table_placement=host')),
      ('k4', ('--config.steps_per_dispatch=4',)),
    ):
      workdir = str(tmp_path_factory.mktemp(f'saf_1_{name}'))
      result['saf', 1, name] = _run(
        workdir,
        'saf',
        fashion_mnist_data_dir,
        '--config.mesh.data=1',
        *flags,
        num_cpu_devices=NUM_DEVICES,
      )
    workdir = str(tmp_path_factory.mktemp('sgd_single'))
    result['sgd', 'single'] = _run(workdir, 'sgd', fashion_mnist_data_dir, num_cpu_devices=1)
  return result


@pytest.fixture(scope='module')
def states(runs, fashion_mnist_data_dir):
  """``key -> TrainState`` of the run's last checkpoint, restored on first use."""
  cache = {}

  def get(key):
    if key not in cache:
      run = analysis_runs.load_run(runs[key]['workdir'], data_dir=fashion_mnist_data_dir)
      assert run.epoch == NUM_EPOCHS
      cache[key] = jax.device_get(run.state)
    return cache[key]

  return get


def _assert_records_close(records, expected):
  assert [r['epoch'] for r in records] == [r['epoch'] for r in expected]
  for r, e in zip(records, expected, strict=True):
    assert sorted(r) == sorted(e), f'epoch {e["epoch"]}'
    for key in sorted(e):
      if not _TIMING.search(key):
        np.testing.assert_allclose(
          r[key], e[key], rtol=RTOL, atol=ATOL, err_msg=f'epoch {e["epoch"]} {key}'
        )


def _assert_trees_close(tree, expected, name, *, atol_scale=0.0):
  """Same structure, leaves within RTOL and ATOL + ``atol_scale`` * the leaf's max |entry|."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(expected)
  leaves, other_treedef = jax.tree_util.tree_flatten(tree)
  assert other_treedef == treedef, name
  for (path, e), x in zip(paths, leaves, strict=True):
    atol = ATOL + atol_scale * float(np.max(np.abs(e), initial=0.0))
    np.testing.assert_allclose(
      x, e, rtol=RTOL, atol=atol, err_msg=f'{name}{jax.tree_util.keystr(path)}'
    )


def test_runs_use_the_requested_devices(runs):
  # Without this the comparison could pass by comparing two 1-device runs.
  for (method, data, *_), run in runs.items():
    expected = 1 if data == 'single' else data
    assert run['mesh_devices'] == [expected], (method, data)


@pytest.mark.parametrize('method', METHODS)
def test_metrics_match_on_1_and_8_devices(runs, method):
  one, eight = runs[method, 1]['records'], runs[method, NUM_DEVICES]['records']
  assert [r['epoch'] for r in one] == list(range(1, NUM_EPOCHS + 1))
  assert [r['step'] for r in one] == [4 * e for e in range(1, NUM_EPOCHS + 1)]
  _assert_records_close(eight, one)
  if method == 'sgd':
    assert all(r['train/trajectory_loss'] == 0 for r in one)
  else:
    # The comparison covers the trajectory loss (Eq. 9 and 13 of Du et al. 2022).
    assert [r['train/trajectory_active'] for r in one] == [0, 1, 1]
    assert one[-1]['train/trajectory_loss'] > 0
    assert eight[-1]['train/trajectory_loss'] > 0
  if method == 'mesa':
    assert all('test_ema/loss' in r and 'test_ema/accuracy' in r for r in one)


@pytest.mark.parametrize('method', METHODS)
def test_final_state_matches_on_1_and_8_devices(states, method):
  one, eight = states((method, 1)), states((method, NUM_DEVICES))
  assert int(eight.step) == int(one.step) == 4 * NUM_EPOCHS
  names = ['params', 'batch_stats']
  if method == 'mesa':
    names += ['ema_params', 'ema_batch_stats']
  for name in names:
    expected = getattr(one, name)
    assert jax.tree.leaves(expected), name  # Something to compare.
    _assert_trees_close(getattr(eight, name), expected, name)
  _assert_trees_close(eight.opt_state, one.opt_state, 'opt_state', atol_scale=GRAD_ATOL_SCALE)


def test_saf_table_is_complete_on_8_devices(runs):
  # With E_tilde = 1 and 256 = 4 * 64 (no example dropped), every example has epoch e-1's
  # logits in epoch e >= 2: the table is exact, whatever device computed each logit.
  one, eight = runs['saf', 1]['records'], runs['saf', NUM_DEVICES]['records']
  fractions = [r['train/table_valid_fraction'] for r in eight]
  assert fractions == [r['train/table_valid_fraction'] for r in one]
  assert fractions == [0.0, 1.0, 1.0]


def test_mesh_of_one_device_is_the_single_device_run(runs, states):
  # The 1-device reference above runs under 8 forced devices; it is the plain 1-device run.
  _assert_records_close(runs['sgd', 1]['records'], runs['sgd', 'single']['records'])
  one, single = states(('sgd', 1)), states(('sgd', 'single'))
  for name in ('params', 'batch_stats', 'opt_state'):
    _assert_trees_close(getattr(one, name), getattr(single, name), name)


def test_config_json_records_the_mesh(runs):
  for (method, data, *_), run in runs.items():
    with open(os.path.join(run['workdir'], 'config.json')) as f:
      config = json.load(f)
    assert config['method']['name'] == method
    assert config['mesh']['data'] == (-1 if data == 'single' else data)


@pytest.mark.parametrize('data', [1, NUM_DEVICES])
def test_saf_with_data_and_table_on_the_devices_equals_the_host_run(runs, states, data):
  """The in-program batches and table give the host pipeline's and table's numbers."""
  device, host = runs['saf', data], runs['saf', data, 'host']
  assert device['placement'] == [('device', 'device')]
  assert host['placement'] == [('host', 'host')]
  records, expected = device['records'], host['records']
  assert [r['epoch'] for r in records] == [r['epoch'] for r in expected]
  for r, e in zip(records, expected, strict=True):
    assert sorted(r) == sorted(e)
    for key in sorted(e):
      if not _TIMING.search(key):
        np.testing.assert_allclose(r[key], e[key], rtol=0, atol=1e-6, err_msg=f'{key}')
  assert records[-1]['train/trajectory_loss'] > 0
  got, want = states(('saf', data)), states(('saf', data, 'host'))
  for name in ('params', 'batch_stats'):
    leaves = zip(
      jax.tree.leaves(getattr(got, name)), jax.tree.leaves(getattr(want, name)), strict=True
    )
    for x, y in leaves:
      np.testing.assert_allclose(x, y, rtol=0, atol=1e-6, err_msg=name)


def test_device_data_with_a_host_table_and_several_steps_per_call(runs, states):
  """Device batches feeding a host table: the host run's numbers. 4 steps per call (one
  unrolled program): the same steps, summed in another order, so close but not equal."""
  host = runs['saf', 1, 'host']['records']
  mixed, k4 = runs['saf', 1, 'mixed'], runs['saf', 1, 'k4']
  assert mixed['placement'] == [('device', 'host')] and k4['placement'] == [('device', 'device')]
  _assert_records_close(mixed['records'], host)
  assert [r['step'] for r in k4['records']] == [r['step'] for r in host]
  for r, e in zip(k4['records'], host, strict=True):
    for key in sorted(e):
      if not _TIMING.search(key):
        np.testing.assert_allclose(r[key], e[key], rtol=1e-4, atol=1e-5, err_msg=key)
  assert [r['train/table_valid_fraction'] for r in k4['records']] == [0.0, 1.0, 1.0]

"""saf_jax.analysis.runs and its CLI (tools.analyze) on smoke runs of real Fashion-MNIST."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from matplotlib import image as mpimg
from tensorboard.backend.event_processing import event_accumulator

from configs import default
from saf_jax import checkpoint, guard, metrics
from saf_jax.analysis import landscape, runs, sharpness
from tests import conftest, test_config_upgrade
from tests.test_main import _main, _records

# configs/default.py:smoke: 4 epochs of 512 examples in batches of 64 (8 steps), and the
# default analysis section: SAM sharpness every epoch on 8 fixed batches, rho = 0.05.
SMOKE_EPOCHS = 4
STEPS_PER_EPOCH = 8
SHARPNESS_BATCHES = 8
BATCH_SIZE = 64
OUTPUTS = ['curves.png', 'hessian.json', 'landscape.npz', 'landscape.png', 'sharpness.json']


@pytest.fixture(scope='module')
def workdirs(fashion_mnist_data_dir, tmp_path_factory):
  """Smoke runs of MESA and SGD, same seed: {method: workdir} (checkpoints of epochs 3, 4).

  Tests that write analysis outputs into a workdir other than ``analysis/`` of the MESA run
  work on copies (:func:`_copy`).
  """
  workdirs = {}
  for method in ('mesa', 'sgd'):
    workdir = str(tmp_path_factory.mktemp(f'analyze_{method}'))
    _main(workdir, f'method={method},smoke', fashion_mnist_data_dir)
    workdirs[method] = workdir
  return workdirs


@pytest.fixture(scope='module')
def mesa_run(workdirs):
  return runs.load_run(workdirs['mesa'])


@pytest.fixture(scope='module')
def mesa_sharpness(mesa_run):
  """``run_sharpness`` of the MESA run's latest checkpoint, and its sharpness.json."""
  record = runs.run_sharpness(mesa_run)
  with open(os.path.join(mesa_run.workdir, 'analysis', 'sharpness.json')) as f:
    return record, json.load(f)


def _copy(workdir, dst):
  """A copy of a trained workdir without its analysis outputs."""
  shutil.copytree(workdir, dst, ignore=shutil.ignore_patterns(runs.ANALYSIS_DIR))
  return str(dst)


def _listing(path):
  return sorted((root, sorted(dirs), sorted(files)) for root, dirs, files in os.walk(path))


def _analyze(*args):
  """``python -m saf_jax.tools.analyze`` as a user runs it, from the repository root."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run(
    [sys.executable, '-m', 'saf_jax.tools.analyze', *args],
    cwd=conftest.REPO_ROOT,
    capture_output=True,
    text=True,
    env=env,
    timeout=900,
  )


def _batch_loss_and_accuracy(run, params, batch_stats, batches):
  """Mean eval-mode cross-entropy and top-1 accuracy over ``batches``, computed in numpy."""
  losses, correct = [], []
  for batch in batches:
    logits = run.experiment.model.apply(
      {'params': params, 'batch_stats': batch_stats}, batch['image'], train=False
    )
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(batch['label'])
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    losses.append(-np.mean(log_probs[np.arange(len(labels)), labels]))
    correct.append(np.mean(np.argmax(logits, -1) == labels))
  return float(np.mean(losses)), float(np.mean(correct))


def test_offline_sharpness_equals_the_training_measurement(workdirs, mesa_run, mesa_sharpness):
  record, stored = mesa_sharpness
  last = _records(workdirs['mesa'])[-1]
  assert (mesa_run.epoch, mesa_run.step) == (SMOKE_EPOCHS, SMOKE_EPOCHS * STEPS_PER_EPOCH)
  assert (last['epoch'], last['step']) == (mesa_run.epoch, mesa_run.step)
  # Same checkpoint, same fixed unaugmented batches, same rho: the same number.
  np.testing.assert_allclose(record['sam_sharpness'], last['train/sam_sharpness'], atol=1e-6)
  assert record['sam_sharpness'] > 0  # The loss rises along the gradient.
  assert stored == record
  assert {k: record[k] for k in ('method', 'epoch', 'step', 'weights', 'workdir')} == {
    'method': 'mesa',
    'epoch': SMOKE_EPOCHS,
    'step': SMOKE_EPOCHS * STEPS_PER_EPOCH,
    'weights': 'params',
    'workdir': workdirs['mesa'],
  }
  assert (record['rho'], record['num_batches'], record['batch_size'], record['subset_seed']) == (
    0.05,
    SHARPNESS_BATCHES,
    BATCH_SIZE,
    0,
  )
  # The loss at theta, checked against a forward pass written out here.
  params, batch_stats = mesa_run.weights('params')
  batches = mesa_run.subset(
    num_examples=SHARPNESS_BATCHES * BATCH_SIZE, batch_size=BATCH_SIZE, seed=0
  )
  loss, _ = _batch_loss_and_accuracy(mesa_run, params, batch_stats, batches)
  np.testing.assert_allclose(record['loss'], loss, rtol=1e-5)


def test_earlier_checkpoint_matches_its_epoch(workdirs, tmp_path):
  workdir = _copy(workdirs['mesa'], tmp_path / 'mesa')
  run = runs.load_run(workdir, epoch=3)
  assert (run.epoch, run.step) == (3, 3 * STEPS_PER_EPOCH)
  record = runs.run_sharpness(run)
  by_epoch = {r['epoch']: r for r in _records(workdir)}
  np.testing.assert_allclose(record['sam_sharpness'], by_epoch[3]['train/sam_sharpness'], atol=1e-6)
  assert abs(record['sam_sharpness'] - by_epoch[4]['train/sam_sharpness']) > 1e-4


def test_landscape_centre_is_the_sharpness_subset_loss(mesa_run, mesa_sharpness):
  _, stored_sharpness = mesa_sharpness
  surface = runs.run_landscape(
    mesa_run, grid=3, num_examples=SHARPNESS_BATCHES * BATCH_SIZE, batch_size=BATCH_SIZE
  )
  out = os.path.join(mesa_run.workdir, 'analysis')
  loaded = runs.load_landscape(os.path.join(out, 'landscape.npz'))
  assert sorted(loaded) == ['accuracy', 'cosine', 'loss', 'meta', 'xs', 'ys']
  np.testing.assert_array_equal(loaded['xs'], [-1.0, 0.0, 1.0])
  np.testing.assert_array_equal(loaded['ys'], [-1.0, 0.0, 1.0])
  for key in ('xs', 'ys', 'loss', 'accuracy', 'cosine'):
    np.testing.assert_array_equal(loaded[key], surface[key], err_msg=key)
  assert loaded['loss'].shape == loaded['accuracy'].shape == (3, 3)
  assert loaded['loss'].dtype == np.float64
  # Same examples, eval-mode loss at theta: the sharpness measurement's loss.
  np.testing.assert_allclose(loaded['loss'][1, 1], stored_sharpness['loss'], atol=1e-5)
  # A full filter norm away the network is far worse than at theta.
  assert np.argmin(loaded['loss']) == 4
  assert np.all((loaded['accuracy'] >= 0) & (loaded['accuracy'] <= 1))
  params, batch_stats = mesa_run.weights('params')
  batches = mesa_run.subset(
    num_examples=SHARPNESS_BATCHES * BATCH_SIZE, batch_size=BATCH_SIZE, seed=0
  )
  _, accuracy = _batch_loss_and_accuracy(mesa_run, params, batch_stats, batches)
  np.testing.assert_allclose(loaded['accuracy'][1, 1], accuracy, atol=1e-6)
  # Entry [i, j] is at (x_j, y_i): [1, 2] moves along the first direction only.
  delta, _ = landscape.random_directions(jax.random.key(0), params)
  moved = jax.tree.map(lambda p, d: p + d, params, delta)
  loss_x, _ = _batch_loss_and_accuracy(mesa_run, moved, batch_stats, batches)
  np.testing.assert_allclose(loaded['loss'][1, 2], loss_x, rtol=1e-4)
  assert 0 < abs(float(loaded['cosine'])) < 0.2
  assert loaded['meta'] == json.loads(str(surface['meta']))
  meta = loaded['meta']
  assert {k: meta[k] for k in ('method', 'epoch', 'step', 'weights')} == {
    'method': 'mesa',
    'epoch': SMOKE_EPOCHS,
    'step': SMOKE_EPOCHS * STEPS_PER_EPOCH,
    'weights': 'params',
  }
  assert (meta['grid'], meta['extent'], meta['direction_seed']) == (3, 1.0, 0)
  assert (meta['num_examples'], meta['subset_seed']) == (SHARPNESS_BATCHES * BATCH_SIZE, 0)
  assert mpimg.imread(os.path.join(out, 'landscape.png')).shape == (500, 1200, 4)


def test_hessian_top_eigenvalues_agree_with_power_iteration(mesa_run):
  num_examples = 2 * BATCH_SIZE
  record = runs.run_hessian(mesa_run, num_examples=num_examples, batch_size=BATCH_SIZE, k=2)
  with open(os.path.join(mesa_run.workdir, 'analysis', 'hessian.json')) as f:
    assert json.load(f) == record
  eigenvalues, residuals = np.array(record['eigenvalues']), np.array(record['residuals'])
  assert eigenvalues.shape == residuals.shape == (2,)
  assert eigenvalues[0] >= eigenvalues[1] and eigenvalues[0] > 0
  assert record['converged'] and record['iterations'] <= 100
  assert np.all(residuals <= record['tol'] * np.abs(eigenvalues))
  assert (record['num_examples'], record['subset_seed'], record['tol']) == (num_examples, 0, 1e-4)
  assert (record['trace'], record['trace_stderr'], record['trace_samples']) == (None, None, 0)
  # Plain power iteration on the mean Hessian of the same two batches (the top eigenvalue
  # dominates: the smallest is about -2.4, the second about 11.5).
  params, batch_stats = mesa_run.weights('params')
  loss_fn = sharpness.model_loss_fn(mesa_run.experiment.model, batch_stats)
  batches = mesa_run.subset(num_examples=num_examples, batch_size=BATCH_SIZE, seed=0)
  flat, unravel = ravel_pytree(params)

  @jax.jit
  def mean_hvp(v):
    products = [
      ravel_pytree(sharpness.hessian_vector_product(loss_fn, params, b, unravel(v)))[0]
      for b in batches
    ]
    return sum(products) / len(products)

  v = jax.random.normal(jax.random.key(1), flat.shape)
  v = v / jnp.linalg.norm(v)
  for _ in range(40):
    w = mean_hvp(v)
    rayleigh = float(v @ w)
    v = w / jnp.linalg.norm(w)
  np.testing.assert_allclose(eigenvalues[0], rayleigh, rtol=1e-4)


def test_ema_weights_are_measured_into_separate_files(mesa_run, mesa_sharpness):
  params_record, _ = mesa_sharpness
  record = runs.run_sharpness(mesa_run, weights='ema')
  path = os.path.join(mesa_run.workdir, 'analysis', 'sharpness_ema.json')
  with open(path) as f:
    assert json.load(f) == record
  assert record['weights'] == 'ema'
  # The EMA teacher's weights and BatchNorm statistics, measured here directly.
  ema_params, ema_batch_stats = mesa_run.weights('ema')
  batches = mesa_run.subset(
    num_examples=SHARPNESS_BATCHES * BATCH_SIZE, batch_size=BATCH_SIZE, seed=0
  )
  expected = sharpness.sam_sharpness(
    sharpness.model_loss_fn(mesa_run.experiment.model, ema_batch_stats), ema_params, batches
  )
  np.testing.assert_allclose(record['sam_sharpness'], expected['sharpness'], atol=1e-6)
  np.testing.assert_allclose(record['loss'], expected['loss'], atol=1e-6)
  assert abs(record['sam_sharpness'] - params_record['sam_sharpness']) > 1e-4
  # The params' sharpness.json is left alone.
  with open(os.path.join(mesa_run.workdir, 'analysis', 'sharpness.json')) as f:
    assert json.load(f) == params_record


def test_ema_weights_of_a_run_without_them_are_refused(workdirs):
  workdir = workdirs['sgd']
  before = _listing(workdir)
  run = runs.load_run(workdir)
  with pytest.raises(ValueError, match=r"weights='ema' needs MESA's EMA weights.*trained 'sgd'"):
    runs.run_sharpness(run, weights='ema')
  with pytest.raises(
    ValueError, match=r"weights must be one of \['params', 'ema'\], got 'teacher'"
  ):
    run.weights('teacher')
  assert _listing(workdir) == before


def test_cli_end_to_end_two_workdirs(workdirs, fashion_mnist_data_dir, tmp_path):
  mesa = _copy(workdirs['mesa'], tmp_path / 'mesa')
  sgd = _copy(workdirs['sgd'], tmp_path / 'sgd')
  out_dir = str(tmp_path / 'figures')  # Created by the tool.
  proc = _analyze(
    f'--workdir={mesa},{sgd}',
    f'--out_dir={out_dir}',
    f'--data_dir={fashion_mnist_data_dir}',
    '--grid=3',
    f'--num_examples={BATCH_SIZE}',
    f'--batch_size={BATCH_SIZE}',
    '--trace_samples=2',
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = proc.stdout.splitlines()
  assert len(lines) == 7, proc.stdout
  assert lines[-1] == f'Combined figures in {out_dir}.'
  for i, (method, workdir) in enumerate((('mesa', mesa), ('sgd', sgd))):
    out = os.path.join(workdir, 'analysis')
    assert sorted(os.listdir(out)) == OUTPUTS
    with open(os.path.join(out, 'sharpness.json')) as f:
      sharp = json.load(f)
    with open(os.path.join(out, 'hessian.json')) as f:
      hessian = json.load(f)
    surface = runs.load_landscape(os.path.join(out, 'landscape.npz'))
    # The sharpness uses the training loop's batches, whatever --num_examples says.
    last = _records(workdir)[-1]
    np.testing.assert_allclose(sharp['sam_sharpness'], last['train/sam_sharpness'], atol=1e-6)
    assert sharp['num_batches'] == SHARPNESS_BATCHES
    assert (hessian['num_examples'], hessian['trace_samples']) == (BATCH_SIZE, 2)
    assert len(hessian['eigenvalues']) == 1 and hessian['eigenvalues'][0] > 0
    assert np.isfinite(hessian['trace']) and hessian['trace_stderr'] > 0
    assert surface['loss'].shape == (3, 3)
    assert surface['meta']['num_examples'] == BATCH_SIZE
    sharp_line, hessian_line, landscape_line = lines[3 * i : 3 * i + 3]
    prefix = f'{workdir}: {method} epoch {SMOKE_EPOCHS} '
    assert sharp_line.startswith(
      f'{prefix}SAM sharpness (rho=0.05) {sharp["sam_sharpness"]:.5f} over 8x64 examples, '
      f'loss {sharp["loss"]:.4f}, '
    )
    assert hessian_line.startswith(
      f'{prefix}Hessian top eigenvalues [{round(hessian["eigenvalues"][0], 4)}]'
    )
    assert f'trace {hessian["trace"]:.2f} ± {hessian["trace_stderr"]:.2f}, 64 examples' in (
      hessian_line
    )
    assert landscape_line.startswith(
      f'{prefix}landscape 3x3 loss at θ {surface["loss"][1, 1]:.4f}, range '
      f'[{surface["loss"].min():.4f}, {surface["loss"].max():.4f}], direction cosine '
      f'{float(surface["cosine"]):.4f}'
    )
    assert mpimg.imread(os.path.join(out, 'curves.png')).shape == (800, 1200, 4)
    assert mpimg.imread(os.path.join(out, 'landscape.png')).shape == (500, 1200, 4)
  assert sorted(os.listdir(out_dir)) == ['curves.png', 'landscapes.png']
  assert mpimg.imread(os.path.join(out_dir, 'curves.png')).shape == (800, 1200, 4)
  assert mpimg.imread(os.path.join(out_dir, 'landscapes.png')).shape == (700, 2 * 350, 4)


def test_workdir_without_checkpoint_is_refused(workdirs, tmp_path):
  shutil.copy(os.path.join(workdirs['mesa'], 'config.json'), tmp_path)
  before = _listing(tmp_path)
  with pytest.raises(ValueError, match='has no checkpoint in checkpoints/: train it first'):
    runs.load_run(str(tmp_path))
  assert _listing(tmp_path) == before


def test_a_run_of_an_earlier_version_loads_with_the_old_values(workdirs, tmp_path):
  """A config.json without any field added since the first version: the same checkpoint."""
  workdir = _copy(workdirs['mesa'], tmp_path / 'mesa')
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    config = json.load(f)
  for field, _, _ in test_config_upgrade.OLD_VALUES:
    test_config_upgrade.delete_field(config, field)
  with open(path, 'w') as f:
    json.dump(config, f)
  run = runs.load_run(workdir)
  assert (run.epoch, run.step) == (SMOKE_EPOCHS, SMOKE_EPOCHS * STEPS_PER_EPOCH)
  for field, old_value, _ in test_config_upgrade.OLD_VALUES:
    assert test_config_upgrade.get_field(run.config, field) == old_value, field


def test_directory_without_config_is_refused(tmp_path):
  with pytest.raises(ValueError, match='has no config.json: not a saf_jax workdir'):
    runs.load_run(str(tmp_path))
  with pytest.raises(ValueError, match='has no config.json'):
    runs.write_curves([str(tmp_path)], str(tmp_path / 'curves.png'))
  assert os.listdir(tmp_path) == []


def test_checkpoint_of_another_model_is_refused(workdirs, tmp_path):
  workdir = _copy(workdirs['mesa'], tmp_path / 'mesa')
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    config = json.load(f)
  assert config['model']['width'] == 8
  config['model']['width'] = 16
  with open(path, 'w') as f:
    json.dump(config, f)
  before = _listing(workdir)
  with pytest.raises(
    ValueError,
    match=r"The checkpoint of epoch 4 in .* does not match its config.json .*'width': 16",
  ):
    runs.load_run(workdir)
  assert _listing(workdir) == before


def test_missing_epoch_lists_the_saved_ones(workdirs):
  with pytest.raises(ValueError, match=r'No checkpoint of epoch 99 .*; saved epochs: \[3, 4\]'):
    runs.load_run(workdirs['mesa'], epoch=99)


@pytest.mark.parametrize(
  'kwargs, match',
  [
    ({'direction_seed': 1.5}, 'direction_seed must be an integer, got 1.5'),
    ({'direction_seed': True}, 'direction_seed must be an integer, got True'),
    ({'grid': 2}, 'The grid size must be an integer >= 3, got 2'),
    ({'extent': 0.0}, 'The grid extent must be > 0, got 0.0'),
  ],
)
def test_bad_landscape_arguments_write_nothing(mesa_run, tmp_path, kwargs, match):
  run = dataclasses.replace(mesa_run, workdir=str(tmp_path))  # Outputs would go here.
  with pytest.raises(ValueError, match=match):
    runs.run_landscape(run, **{'grid': 3, **kwargs})
  assert os.listdir(tmp_path) == []


def test_cli_refuses_bad_flags_before_loading_anything(workdirs, tmp_path):
  not_a_workdir = str(tmp_path)
  # The grid is checked before the workdir is read (which would fail: no config.json).
  proc = _analyze(f'--workdir={not_a_workdir}', '--grid=2')
  assert proc.returncode != 0
  assert 'The grid size must be an integer >= 3, got 2' in proc.stderr
  assert 'has no config.json' not in proc.stderr
  proc = _analyze(f'--workdir={not_a_workdir}', '--direction_seed=abc')
  assert proc.returncode != 0
  assert 'flag --direction_seed=abc' in proc.stderr
  proc = _analyze(f'--workdir={workdirs["mesa"]},{workdirs["sgd"]}', '--tools=curves')
  assert proc.returncode != 0
  assert 'Several --workdir values need --out_dir for the combined figures.' in proc.stderr
  assert os.listdir(tmp_path) == []
  assert not os.path.exists(os.path.join(workdirs['sgd'], 'analysis'))


def _scalars(logdir):
  accumulator = event_accumulator.EventAccumulator(logdir)
  accumulator.Reload()
  return accumulator


def test_tensorboard_events_match_metrics_jsonl(workdirs):
  workdir = workdirs['mesa']
  records = _records(workdir)
  accumulator = _scalars(workdir)
  numeric = {k for r in records for k, v in r.items() if k != 'step' and isinstance(v, int | float)}
  assert set(accumulator.Tags()['scalars']) == numeric  # The epoch is a scalar of its own.
  steps = [r['step'] for r in records]
  assert steps == [e * steps[0] for e in range(1, SMOKE_EPOCHS + 1)] and steps[0] > 1
  for tag in ('epoch', 'train/sam_sharpness', 'test/accuracy', 'test_ema/accuracy'):
    events = accumulator.Scalars(tag)
    assert [e.step for e in events] == steps, tag  # At the global step, as Flax logs.
    np.testing.assert_allclose(
      [e.value for e in events], [r[tag] for r in records], rtol=1e-6, err_msg=tag
    )


_STEPS_PER_EPOCH = 7


def _write_epochs(workdir, epochs, value, *, keep_epochs_up_to):
  writers = [
    metrics.JsonlWriter(workdir, keep_epochs_up_to=keep_epochs_up_to),
    metrics.TensorBoardWriter(workdir, keep_steps_up_to=_STEPS_PER_EPOCH * keep_epochs_up_to),
  ]
  for epoch in epochs:
    for writer in writers:
      record = {'epoch': epoch, 'step': _STEPS_PER_EPOCH * epoch, 'x': value + epoch}
      writer.write(record | {'note': 'text'})
  writers[1].close()


def _series(workdir):
  records = _records(workdir)
  events = _scalars(workdir).Scalars('x')
  return [(r['epoch'], r['x']) for r in records], [
    (e.step // _STEPS_PER_EPOCH, e.value) for e in events
  ]


def test_resumed_run_rewrites_the_epochs_after_its_checkpoint(tmp_path):
  workdir = str(tmp_path)
  _write_epochs(workdir, [1, 2, 3], 0.0, keep_epochs_up_to=0)
  # tensorboardX names event files by the second: a second writer in the same second
  # would reuse (truncate) the first file.
  time.sleep(1.1)
  # Resumed from the checkpoint of epoch 2: epoch 3 again, then 4.
  _write_epochs(workdir, [3, 4], 10.0, keep_epochs_up_to=2)
  jsonl, events = _series(workdir)
  expected = [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
  assert jsonl == expected
  assert events == expected
  assert sorted(_scalars(workdir).Tags()['scalars']) == ['epoch', 'x']


def test_restart_before_the_first_checkpoint_rewrites_every_epoch(tmp_path):
  workdir = str(tmp_path)
  # E.g. checkpoint.every_epochs=5 and a crash in epoch 3: no checkpoint, so epoch 1 again.
  _write_epochs(workdir, [1, 2, 3], 0.0, keep_epochs_up_to=0)
  time.sleep(1.1)
  _write_epochs(workdir, [1, 2], 10.0, keep_epochs_up_to=0)
  jsonl, events = _series(workdir)
  assert jsonl == [(1, 11.0), (2, 12.0)]
  assert events == jsonl


def test_cli_checks_hessian_and_subset_sizes_before_loading(tmp_path):
  """--hessian_iterations < --hessian_k and --num_examples < --batch_size stop at the flags."""
  not_a_workdir = str(tmp_path)
  proc = _analyze(f'--workdir={not_a_workdir}', '--hessian_k=5', '--hessian_iterations=3')
  assert proc.returncode != 0
  assert '--hessian_iterations must be >= --hessian_k=5, got 3' in proc.stderr
  proc = _analyze(f'--workdir={not_a_workdir}', '--num_examples=100', '--batch_size=256')
  assert proc.returncode != 0
  assert '--num_examples must be >= --batch_size=256, got 100' in proc.stderr
  assert os.listdir(not_a_workdir) == []


def test_training_refuses_more_sharpness_batches_than_the_data_before_writing(
  fashion_mnist_data_dir, tmp_path
):
  """The full split's size is known only after loading; the check still precedes any write."""
  from configs import default
  from saf_jax import train

  config = default.get_config('method=sgd,smoke')
  config.input.data_dir = fashion_mnist_data_dir
  config.input.num_train_examples = -1
  config.analysis.sharpness_num_batches = 1000
  workdir = str(tmp_path / 'run')
  with pytest.raises(ValueError, match=r'config.analysis.sharpness_num_batches must be at most'):
    train.train_and_evaluate(config, workdir)
  # Only the guards' traces: the workdir, created by the writability check, and its empty,
  # released lock file.
  assert os.listdir(workdir) == [guard.LOCK_FILE]
  assert os.path.getsize(os.path.join(workdir, guard.LOCK_FILE)) == 0
  # A subset in the config: 9 batches of 64 need 576 of its 512 examples.
  config.input.num_train_examples, config.analysis.sharpness_num_batches = 512, 9
  match = r'sharpness_num_batches must be at most num_train // batch_size = 8, got 9\.'
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, workdir)
  # Only the guards' traces: the workdir, created by the writability check, and its empty,
  # released lock file.
  assert os.listdir(workdir) == [guard.LOCK_FILE]
  assert os.path.getsize(os.path.join(workdir, guard.LOCK_FILE)) == 0


@pytest.mark.parametrize(
  'bad, args, match',
  [
    ('no_checkpoint', [], 'has no checkpoint'),
    ('sgd', ['--weights=ema'], "weights='ema' needs MESA's EMA weights"),
  ],
)
def test_every_workdir_is_checked_before_the_first_is_measured(
  workdirs, tmp_path, bad, args, match
):
  """A bad last workdir fails at once, not after hours of grids on the earlier ones."""
  good = _copy(workdirs['mesa'], tmp_path / 'mesa')
  if bad == 'no_checkpoint':
    last = str(tmp_path / 'empty')
    os.makedirs(last)
    shutil.copy(os.path.join(workdirs['sgd'], 'config.json'), last)
  else:
    last = _copy(workdirs['sgd'], tmp_path / 'sgd')
  before = _listing(str(tmp_path))
  proc = _analyze(
    f'--workdir={good},{last}',
    f'--out_dir={tmp_path / "out"}',
    f'--num_examples={SHARPNESS_BATCHES * BATCH_SIZE}',
    f'--batch_size={BATCH_SIZE}',
    *args,
  )
  assert proc.returncode != 0
  assert match in proc.stderr
  assert _listing(str(tmp_path)) == before


def test_subset_larger_than_the_training_set_is_refused_at_the_flags(workdirs, tmp_path):
  """The default --num_examples=1024 on a 512-example smoke run names the flag, writes nothing."""
  work = _copy(workdirs['mesa'], tmp_path / 'mesa')
  before = _listing(work)
  proc = _analyze(f'--workdir={work}', '--tools=sharpness,hessian')
  assert proc.returncode != 0
  assert '--num_examples=1024 exceeds the 512 training examples' in proc.stderr
  assert _listing(work) == before


def test_curves_say_which_landscape_is_missing(workdirs, tmp_path):
  """--tools curves redraws landscapes.png only when every workdir has one, else says so."""
  first, second = _copy(workdirs['mesa'], tmp_path / 'a'), _copy(workdirs['sgd'], tmp_path / 'b')
  out_dir = tmp_path / 'out'
  proc = _analyze(f'--workdir={first},{second}', '--tools=curves', f'--out_dir={out_dir}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'landscapes.png not drawn: no ' in proc.stdout
  assert os.path.join(first, 'analysis', 'landscape.npz') in proc.stdout
  assert sorted(os.listdir(out_dir)) == ['curves.png']


def test_workdir_with_only_mid_epoch_checkpoints_says_so(tmp_path):
  """A run stopped by SIGTERM in its first epoch has checkpoints, none at an epoch's end."""
  guard.write_config(default.get_config('method=sgd,smoke'), str(tmp_path))
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2)
  meta = {'epoch': 1, 'batches_done': 3, 'steps_per_epoch': 8, 'step': 3}
  ckpt.save(3, {'x': np.zeros(2, np.float32)}, None, meta)
  ckpt.close()
  with pytest.raises(
    ValueError, match=r'checkpoints only from the middle of an epoch \(steps \[3\]'
  ):
    runs.check_loadable(str(tmp_path))

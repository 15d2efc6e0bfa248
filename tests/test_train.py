"""The training loop's SAF bookkeeping: each example's row holds that example's own logits."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import default
from saf_jax import data, experiment, resume, train

NUM_TRAIN, BATCH = 10, 4  # 2 examples dropped per epoch.


class _EchoModel(nn.Module):
  """Test-only model whose logits are its input pixels: they encode (example id, epoch)."""

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    unused = self.param('unused', nn.initializers.zeros, ())
    return x.reshape((x.shape[0], -1)) + 0.0 * unused


def _encode(ids, epoch):
  ids = np.asarray(ids, np.float32)
  return np.stack([ids, np.full_like(ids, epoch), 10 * ids + epoch], axis=-1)  # [B, 3]


class _FakeDatasets:
  """Reshuffles every epoch (like the real pipeline) and drops the remainder."""

  def __init__(self):
    self.orders = {}

  def train_epoch(self, epoch, *, batch_size):
    order = np.random.default_rng(epoch).permutation(NUM_TRAIN)
    self.orders[epoch] = order[: (NUM_TRAIN // batch_size) * batch_size]
    for s in range(NUM_TRAIN // batch_size):
      ids = order[s * batch_size : (s + 1) * batch_size].astype(np.int32)
      yield {
        'image': _encode(ids, epoch).reshape(batch_size, 1, 1, 3),
        'label': np.zeros(batch_size, np.int32),
        'index': ids,
      }


@pytest.mark.parametrize(
  'prefetch,table_placement,steps_per_dispatch',
  [(1, 'host', 1), (3, 'host', 1), (3, 'host', 2), (1, 'device', 1), (1, 'device', 2)],
)
def test_run_steps_writes_each_examples_own_logits(prefetch, table_placement, steps_per_dispatch):
  config = default.get_config('method=saf,smoke')
  config.input.batch_size = BATCH
  config.input.prefetch = prefetch
  config.input.placement = 'host'  # The fake batches come from the host.
  config.method.saf.table_placement = table_placement
  config.steps_per_dispatch = steps_per_dispatch
  config.method.saf.E_start = 1
  config.method.saf.E_tilde = 2
  info = data.DatasetInfo(
    name='fake', num_train=NUM_TRAIN, num_test=0, num_classes=3, image_shape=(1, 1, 3)
  )
  exp = experiment.create(config, info, model=_EchoModel())
  assert exp.placement.table == table_placement
  state, table, fake = exp.init_state(), exp.new_table(), _FakeDatasets()
  for epoch in (1, 2, 3, 4):
    state, metrics, _ = train.run_steps(
      exp, state, fake.train_epoch(epoch, batch_size=BATCH), epoch=epoch, table=table
    )
    seen = fake.orders[epoch]
    slot = epoch % 2
    arrays = jax.device_get(table.state_dict())
    np.testing.assert_array_equal(arrays['values'][slot, seen], _encode(seen, epoch))
    np.testing.assert_array_equal(arrays['written_epoch'][slot, seen], epoch)
    # Valid targets in epoch e are the examples that were seen in epoch e - 2.
    valid = np.isin(seen, fake.orders.get(epoch - 2, [])).mean()
    assert np.mean([m['table_valid_fraction'] for m in metrics]) == pytest.approx(valid)
  assert int(state.step) == 4 * (NUM_TRAIN // BATCH)
  # With a nonzero trajectory loss and echo logits, the loss is computed on real targets.
  assert metrics[-1]['trajectory_loss'] > 0 or valid == 0


def test_epoch_line_is_short_with_every_evaluation():
  record = {
    'epoch': 200,
    'train/loss': 12.3456789,
    'train/accuracy': 0.98765,
    'train/images_per_sec': 123456.7,
    'test/accuracy': 0.95555,
    'test_ema/accuracy': 0.9612,
    'test_model_ema/accuracy': 0.9701,
    'train_eval/accuracy': 1.0,
    'train/l2_params': 123.4,  # Only in metrics.jsonl.
  }
  line = train.epoch_line(record, num_epochs=200)
  assert line == (
    'epoch 200/200  loss 12.35  top-1 98.8%  test 95.6%  teacher 96.1%  EMA 97.0%  '
    'train-eval 100.0%  123457 images/s'
  )
  assert len(line) < 120
  # An epoch without evaluation (config.eval.every_epochs > 1): the training figures alone.
  del record['test/accuracy'], record['test_ema/accuracy']
  del record['test_model_ema/accuracy'], record['train_eval/accuracy']
  assert train.epoch_line(record, 200) == 'epoch 200/200  loss 12.35  top-1 98.8%  123457 images/s'


def test_a_position_round_trips_through_a_checkpoints_json_meta():
  metrics = [{'loss': np.float32(0.1), 'accuracy': np.float32(1 / 3)}] * 3
  mid = resume.Position(epoch=2, batches_done=3, metrics=metrics, seconds=1.25)
  meta = json.loads(json.dumps(mid.to_meta(step=8, steps_per_epoch=5, num_devices=2)))
  assert (meta['step'], meta['num_devices'], meta['num_processes']) == (8, 2, 1)
  back = resume.Position.after(meta, steps_per_epoch=5)
  assert (back.epoch, back.batches_done, back.seconds) == (2, 3, 1.25)
  assert back.metrics == metrics  # float32 values, exactly.
  end = resume.Position(epoch=2, batches_done=5, metrics=metrics, seconds=1.0)
  meta = end.to_meta(step=10, steps_per_epoch=5, num_devices=1)
  assert resume.Position.after(meta, steps_per_epoch=5) == resume.Position(epoch=3)
  # Meta of checkpoints saved only at epoch ends has no batches_done.
  assert resume.Position.after({'epoch': 4}, steps_per_epoch=5) == resume.Position(epoch=5)


class _DenseModel(nn.Module):
  """Test-only linear classifier of the flattened pixels: nonzero gradients, fast compiles."""

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def _steps(method, steps_per_dispatch, num_epochs=2, stop_after=None, looksam_k=2, **overrides):
  """Trains ``method`` over _FakeDatasets' epochs; returns (state, per-step metrics, stops)."""
  config = default.get_config(f'method={method},smoke')
  config.input.batch_size = BATCH // 2  # 5 steps per epoch of 10 examples: k = 5 divides.
  config.input.placement = 'host'
  config.steps_per_dispatch = steps_per_dispatch
  config.method.looksam.k = looksam_k
  for field, value in overrides.items():
    config.method.saf[field] = value
  info = data.DatasetInfo(
    name='fake', num_train=NUM_TRAIN, num_test=0, num_classes=3, image_shape=(1, 1, 3)
  )
  exp = experiment.create(config, info, model=_DenseModel())
  state, table, fake = exp.init_state(), exp.new_table(), _FakeDatasets()
  metrics, asked = [], []

  def stop(step):
    asked.append(step)
    return stop_after is not None and step >= stop_after

  for epoch in range(1, num_epochs + 1):
    batches = fake.train_epoch(epoch, batch_size=BATCH // 2)
    state, step_metrics, _ = train.run_steps(
      exp, state, batches, epoch=epoch, table=table, stop=stop
    )
    metrics += step_metrics
  return jax.device_get(state), metrics, asked


@pytest.mark.parametrize('method, looksam_k', [('looksam', 2), ('looksam', 5), ('saf', 2)])
def test_several_steps_per_call_train_as_one_step_per_call(method, looksam_k):
  # LookSAM against two programs chosen by step number (k = 1): with looksam.k = 2 one
  # program decides SAM or reuse in the graph; with looksam.k = 5 the 5 steps of a call
  # are its SAM step and 4 reuse steps in place. SAF: its host table written once per call.
  # SAF with E_tilde = 1: epoch 2 (trajectory loss on) reads every row epoch 1 wrote.
  kwargs = {'E_tilde': 1, 'looksam_k': looksam_k}
  (one, m1, asked1), (five, m5, asked5) = _steps(method, 1, **kwargs), _steps(method, 5, **kwargs)
  assert int(one.step) == int(five.step) == 10
  assert asked1 == list(range(1, 11)) and asked5 == [5, 10]  # SIGTERM checks between calls.
  assert len(m1) == len(m5) == 10
  for a, b in zip(m1, m5, strict=True):
    np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(one.params), jax.tree.leaves(five.params), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  if method == 'saf':
    assert [m['table_valid_fraction'] for m in m5] == [0.0] * 5 + [1.0] * 5
    assert all(m['trajectory_loss'] > 0 for m in m5[5:])
  if method == 'looksam':  # The SAM steps (0, 2, 4, ...) moved the params unlike SGD's.
    sgd, _, _ = _steps('sgd', 1, looksam_k=looksam_k)
    assert not np.allclose(jax.tree.leaves(sgd.params)[0], jax.tree.leaves(one.params)[0])


def test_a_stop_request_ends_the_run_after_the_current_call():
  state, metrics, asked = _steps('sgd', 5, num_epochs=1, stop_after=1)
  assert asked == [5] and len(metrics) == 5 and int(state.step) == 5

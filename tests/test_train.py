"""The training loop's SAF bookkeeping: each example's row holds that example's own logits."""

import json

import flax.linen as nn
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


@pytest.mark.parametrize('prefetch', [1, 3])
def test_run_steps_writes_each_examples_own_logits(prefetch):
  config = default.get_config('method=saf,smoke')
  config.input.batch_size = BATCH
  config.input.prefetch = prefetch
  config.method.saf.E_start = 1
  config.method.saf.E_tilde = 2
  info = data.DatasetInfo(
    name='fake', num_train=NUM_TRAIN, num_test=0, num_classes=3, image_shape=(1, 1, 3)
  )
  exp = experiment.create(config, info, model=_EchoModel())
  state, table, fake = exp.init_state(), exp.new_table(), _FakeDatasets()
  for epoch in (1, 2, 3, 4):
    state, metrics, _ = train.run_steps(
      exp, state, fake.train_epoch(epoch, batch_size=BATCH), epoch=epoch, table=table
    )
    seen = fake.orders[epoch]
    slot = epoch % 2
    arrays = table.state_dict()
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

"""The training loop's SAF bookkeeping: each example's row holds that example's own logits."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from saf_jax import input_pipeline, train

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
  info = input_pipeline.DatasetInfo(
    name='fake', num_train=NUM_TRAIN, num_test=0, num_classes=3, image_shape=(1, 1, 3)
  )
  exp = train.build_experiment(config, info, model=_EchoModel())
  state, table, data = exp.init_state(), exp.new_table(), _FakeDatasets()
  for epoch in (1, 2, 3, 4):
    state, metrics, _ = exp.run_steps(
      state, data.train_epoch(epoch, batch_size=BATCH), epoch=epoch, table=table
    )
    seen = data.orders[epoch]
    slot = epoch % 2
    np.testing.assert_array_equal(table.values[slot, seen], _encode(seen, epoch))
    np.testing.assert_array_equal(table.written_epoch[slot, seen], epoch)
    # Valid targets in epoch e are the examples that were seen in epoch e - 2.
    valid = np.isin(seen, data.orders.get(epoch - 2, [])).mean()
    assert np.mean([m['table_valid_fraction'] for m in metrics]) == pytest.approx(valid)
  assert int(state.step) == 4 * (NUM_TRAIN // BATCH)
  # With a nonzero trajectory loss and echo logits, the loss is computed on real targets.
  assert metrics[-1]['trajectory_loss'] > 0 or valid == 0


def test_trajectory_active_follows_e_start():
  config = default.get_config('method=mesa,smoke')
  config.input.batch_size = BATCH
  config.method.mesa.E_start = 3
  info = input_pipeline.DatasetInfo(
    name='fake', num_train=NUM_TRAIN, num_test=0, num_classes=3, image_shape=(1, 1, 3)
  )
  exp = train.build_experiment(config, info, model=_EchoModel())
  assert [exp.trajectory_active(e) for e in (1, 2, 3, 4, 5)] == [False, False, False, True, True]
  config_sgd = default.get_config('method=sgd,smoke')
  config_sgd.input.batch_size = BATCH
  exp_sgd = train.build_experiment(config_sgd, info, model=_EchoModel())
  assert not any(exp_sgd.trajectory_active(e) for e in range(1, 10))


def test_create_optimizer_is_pytorch_sgd_with_l2_and_cosine():
  config = default.get_config('method=sgd')
  config.num_epochs = 2
  tx = train.create_optimizer(config, steps_per_epoch=5)  # 10 steps.
  params = {'w': jnp.ones((2, 2)), 'b': jnp.ones((2,))}
  grads = {'w': jnp.full((2, 2), 0.5), 'b': jnp.full((2,), 0.5)}
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  # Step 0: lr = 0.05; d = g + wd * w for 2-D params (1-D not decayed); buf = d.
  np.testing.assert_allclose(updates['w'], -0.05 * (0.5 + 5e-4), rtol=1e-6)
  np.testing.assert_allclose(updates['b'], -0.05 * 0.5, rtol=1e-6)
  updates, state = tx.update(grads, state, params)
  # Step 1: lr = 0.05 * 0.5 * (1 + cos(pi / 10)); buf = 0.9 * d + d.
  lr1 = 0.05 * 0.5 * (1 + np.cos(np.pi / 10))
  np.testing.assert_allclose(updates['w'], -lr1 * 1.9 * (0.5 + 5e-4), rtol=1e-6)

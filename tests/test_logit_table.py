"""SAF's logit table: every valid target is the same example's logits from E_tilde epochs ago."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from saf_jax import logit_table

NUM_EXAMPLES, NUM_CLASSES, BATCH = 50, 4, 8  # 50 % 8 = 2 examples dropped each epoch.


def _stub_logits(ids, epoch):
  """A 'model' whose logits encode (example id, epoch) exactly."""
  ids = np.asarray(ids)
  out = np.zeros((len(ids), NUM_CLASSES), np.float32)
  out[:, 0] = ids
  out[:, 1] = epoch
  out[:, 2] = ids * 0.5 + epoch
  return out


@pytest.mark.parametrize('E_tilde', [1, 2, 3])
@pytest.mark.parametrize('asynchronous', [False, True])
def test_targets_are_same_example_from_e_tilde_epochs_ago(E_tilde, asynchronous):
  table = logit_table.LogitTable(NUM_EXAMPLES, NUM_CLASSES, E_tilde=E_tilde)
  rng = np.random.default_rng(0)
  seen = {}  # epoch -> ids that were written (in a full batch) that epoch.
  num_valid = 0
  for epoch in range(1, 5):
    order = rng.permutation(NUM_EXAMPLES)  # Reshuffled every epoch.
    steps = NUM_EXAMPLES // BATCH  # drop_remainder: the last 2 are dropped.
    seen[epoch] = set(order[: steps * BATCH].tolist())
    for s in range(steps):
      ids = order[s * BATCH : (s + 1) * BATCH]
      targets, mask = table.gather(ids, epoch=epoch)
      for i, example in enumerate(ids):
        expected_valid = example in seen.get(epoch - E_tilde, set())
        assert mask[i] == float(expected_valid), (epoch, example)
        if expected_valid:
          np.testing.assert_array_equal(targets[i], _stub_logits([example], epoch - E_tilde)[0])
          num_valid += 1
      logits = _stub_logits(ids, epoch)
      if asynchronous:
        table.write_async(ids, jnp.asarray(logits), epoch=epoch)
      else:
        table.write(ids, logits, epoch=epoch)
    table.flush()
  assert num_valid > 0


def test_dropped_examples_come_back_masked_not_zero():
  table = logit_table.LogitTable(10, 3, E_tilde=1)
  table.write(np.arange(8), np.full((8, 3), 7.0, np.float32), epoch=1)  # 8, 9 dropped.
  targets, mask = table.gather(np.array([0, 8, 9, 1]), epoch=2)
  np.testing.assert_array_equal(mask, [1, 0, 0, 1])
  np.testing.assert_array_equal(targets[0], [7, 7, 7])
  assert table.valid_fraction(2) == pytest.approx(0.8)


def test_first_epochs_are_masked():
  table = logit_table.LogitTable(4, 2, E_tilde=3)
  for epoch in (1, 2, 3):
    _, mask = table.gather(np.arange(4), epoch=epoch)
    assert not mask.any()
    table.write(np.arange(4), np.ones((4, 2), np.float32), epoch=epoch)
  _, mask = table.gather(np.arange(4), epoch=4)
  assert mask.all()


def test_stale_row_from_a_wrong_epoch_is_masked():
  # E_tilde=2: a row written in epoch 1 but not epoch 3 must not serve epoch 5.
  table = logit_table.LogitTable(3, 2, E_tilde=2)
  table.write(np.arange(3), np.ones((3, 2), np.float32), epoch=1)
  table.write(np.array([0, 1]), np.ones((2, 2), np.float32), epoch=3)
  _, mask = table.gather(np.arange(3), epoch=5)
  np.testing.assert_array_equal(mask, [1, 1, 0])


@pytest.mark.parametrize(
  'ids, match',
  [
    (np.array([0, 10]), r'\[0, 10\)'),
    (np.array([-1, 2]), r'\[0, 10\)'),
    (np.array([3, 3]), 'distinct'),
    (np.array([[1, 2]]), '1-D integer'),
    (np.array([0.5, 1.0]), '1-D integer'),
  ],
)
def test_bad_ids_raise(ids, match):
  table = logit_table.LogitTable(10, 3, E_tilde=1)
  with pytest.raises(ValueError, match=match):
    table.gather(ids, epoch=1)
  with pytest.raises(ValueError, match=match):
    table.write(ids, np.zeros((ids.size, 3), np.float32), epoch=1)


def test_logits_shape_must_match_ids_and_classes():
  table = logit_table.LogitTable(10, 3, E_tilde=1)
  with pytest.raises(ValueError, match='do not match'):
    table.write(np.arange(4), np.zeros((4, 5), np.float32), epoch=1)
  with pytest.raises(ValueError, match='do not match'):
    table.write(np.arange(4), np.zeros((3, 3), np.float32), epoch=1)


def test_async_write_checks_shape_at_once_and_reraises_background_errors():
  table = logit_table.LogitTable(10, 3, E_tilde=1)
  with pytest.raises(ValueError, match='do not match'):
    table.write_async(np.arange(2), jnp.zeros((2, 7)), epoch=1)  # Shape known up front.

  class _FailsOnTransfer:
    """Right shape, but reading its values fails (as a failed device computation would)."""

    shape = (2, 3)

    def __array__(self, dtype=None, copy=None):
      raise RuntimeError('device computation failed')

  table.write_async(np.arange(2), _FailsOnTransfer(), epoch=1)
  with pytest.raises(RuntimeError, match='device computation failed'):
    table.flush()
  table.flush()  # The error is reported once; the table keeps working.
  table.write_async(np.arange(2), jnp.ones((2, 3)), epoch=1)
  table.flush()
  np.testing.assert_array_equal(table.gather(np.arange(2), epoch=2)[1], [1, 1])


def test_bad_construction_raises():
  with pytest.raises(ValueError, match='E_tilde'):
    logit_table.LogitTable(10, 3, E_tilde=0)
  with pytest.raises(ValueError, match='table_dtype'):
    logit_table.LogitTable(10, 3, E_tilde=1, dtype='float16')


def test_bfloat16_storage_halves_memory_and_rounds():
  f32 = logit_table.LogitTable(1000, 10, E_tilde=3)
  bf16 = logit_table.LogitTable(1000, 10, E_tilde=3, dtype='bfloat16')
  assert f32.nbytes == 3 * 1000 * 10 * 4 + 3 * 1000 * 4
  assert bf16.nbytes == 3 * 1000 * 10 * 2 + 3 * 1000 * 4
  logits = np.array([[1.0 / 3.0] * 10], np.float32)
  bf16.write(np.array([5]), logits, epoch=1)
  targets, mask = bf16.gather(np.array([5]), epoch=4)
  assert mask[0] == 1 and targets.dtype == np.float32
  np.testing.assert_array_equal(targets, logits.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_load_state_dict_restores_and_checks_shapes():
  table = logit_table.LogitTable(5, 2, E_tilde=2)
  table.write(np.array([1, 3]), np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), epoch=1)
  restored = logit_table.LogitTable(5, 2, E_tilde=2)
  restored.load_state_dict(table.state_dict())
  targets, mask = restored.gather(np.array([1, 2, 3]), epoch=3)
  np.testing.assert_array_equal(mask, [1, 0, 1])
  np.testing.assert_array_equal(targets[[0, 2]], [[1.0, 2.0], [3.0, 4.0]])
  with pytest.raises(ValueError, match='E_tilde differ'):
    logit_table.LogitTable(5, 2, E_tilde=3).load_state_dict(table.state_dict())

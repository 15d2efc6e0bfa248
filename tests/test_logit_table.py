"""SAF's logit table: every valid target is the same example's logits from E_tilde epochs ago."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from saf_jax import logit_table, losses

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
  with pytest.raises(ValueError, match=r"table_dtype must be one of.*'int8'"):
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


def _softmax64(logits, tau):
  x = np.asarray(logits, np.float64) / tau
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize('topk', [0, 3])
def test_first_id_maps_global_ids_to_this_partition(topk):
  table = logit_table.LogitTable(10, 5, E_tilde=2, first_id=100, topk=topk, tau=2.0)
  ids = np.arange(100, 110)
  logits = np.arange(50, dtype=np.float32).reshape(10, 5)  # Row r: 5r .. 5r + 4.
  table.write(ids[::-1], logits[::-1], epoch=1)
  written = table.state_dict()['written_epoch']
  np.testing.assert_array_equal(written[1], [1] * 10)  # Rows 0..9, not ids.
  targets, mask = table.gather(np.array([103, 100, 109]), epoch=3)
  np.testing.assert_array_equal(mask, [1, 1, 1])
  # Top-3 of 5 keeps the 3 largest exactly; both layouts must return row 3, 0, 9.
  np.testing.assert_array_equal(targets[:, 2:], logits[[3, 0, 9], 2:])
  if not topk:
    np.testing.assert_array_equal(targets, logits[[3, 0, 9]])
  for bad in (99, 110, 0):
    with pytest.raises(ValueError, match=r"\[100, 110\).*not in this process's partition"):
      table.gather(np.array([105, bad]), epoch=3)
    with pytest.raises(ValueError, match=r'\[100, 110\)'):
      table.write(np.array([bad]), np.zeros((1, 5), np.float32), epoch=3)
    with pytest.raises(ValueError, match=r'\[100, 110\)'):
      table.write_async(np.array([bad]), np.zeros((1, 5), np.float32), epoch=3)
  with pytest.raises(ValueError, match='first_id'):
    logit_table.LogitTable(10, 5, E_tilde=1, first_id=-1)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_topk_keeps_topk_probabilities_and_tail_mass(dtype):
  rng = np.random.default_rng(0)
  num, num_classes, k, tau = 6, 20, 5, 2.0
  logits = (3.0 * rng.normal(size=(num, num_classes))).astype(np.float32)
  table = logit_table.LogitTable(num, num_classes, E_tilde=1, dtype=dtype, topk=k, tau=tau)
  arrays = table.state_dict()
  assert 'values' not in arrays
  assert arrays['topk_values'].dtype == np.dtype(dtype) and arrays['topk_ids'].dtype == np.uint16
  table.write(np.arange(num), logits, epoch=1)
  targets, mask = table.gather(np.arange(num), epoch=2)
  assert mask.all() and targets.dtype == np.float32
  top = np.argsort(-logits, axis=-1)[:, :k]  # [N, k]
  tail = np.ones_like(logits, bool)
  np.put_along_axis(tail, top, False, axis=-1)
  kept = np.take_along_axis(logits, top, axis=-1)
  if dtype == 'bfloat16':
    kept = kept.astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(np.take_along_axis(targets, top, axis=-1), kept)
  # The other classes share one value: the tail's mass spread uniformly.
  tail_values = targets[tail].reshape(num, num_classes - k)
  np.testing.assert_array_equal(tail_values, tail_values[:, :1].repeat(num_classes - k, 1))
  # Softened: the kept logits' rounding aside, probabilities as the original's.
  p = _softmax64(np.where(tail, logits, targets), tau)  # The original with kept logits rounded.
  p_hat = _softmax64(targets, tau)
  np.testing.assert_allclose(
    np.take_along_axis(p_hat, top, axis=-1), np.take_along_axis(p, top, axis=-1), rtol=2e-6
  )
  np.testing.assert_allclose((p_hat * tail).sum(-1), (p * tail).sum(-1), rtol=2e-6)
  if dtype == 'float32':  # Then p is exactly the original's softened target.
    np.testing.assert_allclose(p, _softmax64(logits, tau), rtol=1e-12)
  # Not a trivial pass: the tail really was reshaped.
  assert np.abs(p_hat - p).max() > 1e-3


def test_topk_rest_lse_is_the_tails_logsumexp_at_tau():
  logits = np.array([[0.0, 1.0, 5.0, 2.0, -1.0]], np.float32)
  table = logit_table.LogitTable(1, 5, E_tilde=1, topk=2, tau=0.5)
  table.write(np.array([0]), logits, epoch=1)
  arrays = table.state_dict()
  assert sorted(arrays['topk_ids'][0, 0].tolist()) == [2, 3]
  tail = np.array([0.0, 1.0, -1.0]) / 0.5
  np.testing.assert_allclose(arrays['rest_lse'][0, 0], np.log(np.exp(tail).sum()), rtol=1e-6)
  targets, _ = table.gather(np.array([0]), epoch=2)
  fill = 0.5 * (np.log(np.exp(tail).sum()) - np.log(3))
  np.testing.assert_allclose(targets[0], [fill, fill, 5.0, 2.0, fill], rtol=1e-6)


def test_topk_k_is_num_classes_minus_1_is_exact():
  rng = np.random.default_rng(1)
  targets = rng.normal(size=(8, 6)).astype(np.float32) * 4
  student = rng.normal(size=(8, 6)).astype(np.float32) * 4
  stats = logit_table.topk_compression_error(targets, student, k=5, tau=3.0)
  assert stats['trajectory_loss_full'] > 0.1
  assert stats['abs_error'] < 1e-5 * stats['trajectory_loss_full']
  assert stats['max_row_abs_error'] < 1e-5
  assert stats['mean_kl_target'] < 1e-10


def test_topk_error_vanishes_for_a_flat_tail_and_not_otherwise():
  rng = np.random.default_rng(2)
  num, num_classes, k, tau = 10, 12, 3, 5.0
  targets = np.full((num, num_classes), -2.0, np.float32)  # Flat tail ...
  targets[:, :k] = rng.normal(size=(num, k)) + 3.0  # ... under k larger logits.
  targets = rng.permuted(targets, axis=1)
  student = (2.0 * rng.normal(size=(num, num_classes))).astype(np.float32)
  flat = logit_table.topk_compression_error(targets, student, k=k, tau=tau)
  assert flat['trajectory_loss_full'] > 0.1
  assert flat['abs_error'] < 1e-6 * flat['trajectory_loss_full']
  assert flat['max_row_abs_error'] < 1e-5 and flat['mean_kl_target'] < 1e-10
  bumpy = targets + np.where(targets == -2.0, rng.normal(size=targets.shape), 0.0)
  rough = logit_table.topk_compression_error(bumpy.astype(np.float32), student, k=k, tau=1.0)
  assert rough['mean_kl_target'] > 1e-3 and rough['max_row_abs_error'] > 1e-3


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_topk_compression_error_agrees_with_losses(dtype):
  rng = np.random.default_rng(3)
  num, num_classes, k, tau = 16, 10, 3, 2.0
  targets = (3.0 * rng.normal(size=(num, num_classes))).astype(np.float32)
  student = (3.0 * rng.normal(size=(num, num_classes))).astype(np.float32)
  stats = logit_table.topk_compression_error(targets, student, k=k, tau=tau, dtype=dtype)
  table = logit_table.LogitTable(num, num_classes, E_tilde=1, dtype=dtype, topk=k, tau=tau)
  table.write(np.arange(num), targets, epoch=1)
  reconstructed, _ = table.gather(np.arange(num), epoch=2)
  full = float(losses.trajectory_loss(jnp.asarray(student), jnp.asarray(targets), temperature=tau))
  topk = float(
    losses.trajectory_loss(jnp.asarray(student), jnp.asarray(reconstructed), temperature=tau)
  )
  assert stats['trajectory_loss_full'] == pytest.approx(full, rel=1e-5)
  assert stats['trajectory_loss_topk'] == pytest.approx(topk, rel=1e-5)
  diff = stats['trajectory_loss_full'] - stats['trajectory_loss_topk']
  assert stats['abs_error'] == pytest.approx(abs(diff), rel=1e-12)
  assert stats['rel_error'] == pytest.approx(abs(diff) / stats['trajectory_loss_full'], rel=1e-12)
  assert stats['abs_error'] > 1e-3  # A real difference, at this k.
  p, p_hat, q = (_softmax64(x, tau) for x in (targets, reconstructed, student))
  kl = np.sum(p * np.log(p / p_hat), axis=-1)
  assert stats['mean_kl_target'] == pytest.approx(kl.mean(), rel=1e-6)
  rows = tau**2 * (np.sum(p * np.log(p / q), -1) - np.sum(p_hat * np.log(p_hat / q), -1))
  assert stats['max_row_abs_error'] == pytest.approx(np.abs(rows).max(), rel=1e-6)
  if dtype == 'float32':  # The module docstring's decomposition of the difference.
    cross = np.sum((p - p_hat) * np.log(q), axis=-1)
    assert diff == pytest.approx(tau**2 * (kl - cross).mean(), rel=1e-5)


def test_topk_compression_error_checks_shapes():
  with pytest.raises(ValueError, match=r'\[N, K\]'):
    logit_table.topk_compression_error(np.zeros((2, 5)), np.zeros((2, 4)), k=2, tau=1.0)
  with pytest.raises(ValueError, match='table_topk'):
    logit_table.topk_compression_error(np.zeros((2, 5)), np.zeros((2, 5)), k=5, tau=1.0)


def test_topk_compression_error_names_the_range_without_full_storage():
  with pytest.raises(ValueError, match=r'table_topk must be an integer in \[1, 5\) for 5 classes'):
    logit_table.topk_compression_error(np.zeros((2, 5)), np.zeros((2, 5)), k=0, tau=1.0)
  with pytest.raises(ValueError, match=r'table_topk must be 0 \(store all logits\) or'):
    logit_table.topk_compression_error(np.zeros((2, 5)), np.zeros((2, 5)), k=5, tau=1.0)


def test_topk_class_ids_widen_past_65535_classes():
  num_classes = 70000
  table = logit_table.LogitTable(1, num_classes, E_tilde=1, topk=2, tau=1.0)
  assert table.state_dict()['topk_ids'].dtype == np.int32
  for classes, id_dtype in ((65535, np.uint16), (65536, np.int32)):
    narrow = logit_table.LogitTable(1, classes, E_tilde=1, topk=2, tau=1.0)
    assert narrow.state_dict()['topk_ids'].dtype == id_dtype
  logits = np.zeros((1, num_classes), np.float32)
  logits[0, [69999, 65536]] = [9.0, 8.0]
  table.write(np.array([0]), logits, epoch=1)
  targets, _ = table.gather(np.array([0]), epoch=2)
  assert targets[0, 69999] == 9.0 and targets[0, 65536] == 8.0
  np.testing.assert_allclose(targets[0, :3], 0.0, atol=1e-5)  # Flat zero tail: exact.


@pytest.mark.parametrize('topk', [-1, 4, 5])
def test_bad_topk_raises(topk):
  with pytest.raises(ValueError, match=r'table_topk.*\[1, 4\)'):
    logit_table.LogitTable(3, 4, E_tilde=1, topk=topk, tau=1.0)
  with pytest.raises(ValueError, match='table_topk'):
    logit_table.table_nbytes(3, 4, E_tilde=1, topk=topk)


@pytest.mark.parametrize('tau', [None, 0.0, -1.0])
def test_topk_needs_a_positive_tau(tau):
  with pytest.raises(ValueError, match='tau must be > 0'):
    logit_table.LogitTable(3, 4, E_tilde=1, topk=2, tau=tau)
  assert logit_table.LogitTable(3, 4, E_tilde=1, tau=tau).tau is None  # Unused when full.


@pytest.mark.parametrize(
  'num_examples, num_classes, E_tilde, dtype, topk, row_bytes',
  [
    (7, 5, 1, 'float32', 0, 5 * 4 + 4),
    (7, 5, 3, 'bfloat16', 0, 5 * 2 + 4),
    (7, 5, 2, 'float32', 2, 2 * (4 + 2) + 4 + 4),
    (7, 5, 2, 'bfloat16', 4, 4 * (2 + 2) + 4 + 4),
    (3, 70000, 1, 'bfloat16', 3, 3 * (2 + 4) + 4 + 4),
    # int8: uint8 codes, plus float32 row_min and row_scale per row.
    (7, 5, 2, 'int8', 0, 5 * 1 + 4 + 4 + 4),
    (7, 5, 3, 'int8', 2, 2 * (1 + 2) + 4 + 4 + 4 + 4),
    (3, 70000, 1, 'int8', 3, 3 * (1 + 4) + 4 + 4 + 4 + 4),
  ],
)
def test_nbytes_is_table_nbytes(num_examples, num_classes, E_tilde, dtype, topk, row_bytes):
  expected = E_tilde * num_examples * row_bytes
  table = logit_table.LogitTable(
    num_examples, num_classes, E_tilde=E_tilde, dtype=dtype, topk=topk, tau=1.0
  )
  assert table.nbytes == expected
  nbytes = logit_table.table_nbytes(
    num_examples, num_classes, E_tilde=E_tilde, dtype=dtype, topk=topk
  )
  assert nbytes == expected


def test_imagenet_table_nbytes():
  n, classes, e_tilde = 1_281_167, 1000, 3  # ImageNet-1k train split; E_tilde of the paper.
  f32 = logit_table.table_nbytes(n, classes, E_tilde=e_tilde)
  bf16 = logit_table.table_nbytes(n, classes, E_tilde=e_tilde, dtype='bfloat16')
  top10 = logit_table.table_nbytes(n, classes, E_tilde=e_tilde, topk=10)
  int8 = logit_table.table_nbytes(n, classes, E_tilde=e_tilde, dtype='int8')
  int8_top10 = logit_table.table_nbytes(n, classes, E_tilde=e_tilde, dtype='int8', topk=10)
  assert f32 == 3 * n * 1000 * 4 + 3 * n * 4 == 15_389_378_004  # 15,389 MB, 14,676 MiB.
  assert bf16 == 3 * n * 1000 * 2 + 3 * n * 4 == 7_702_376_004  # 7,702 MB, 7,346 MiB.
  # 10 float32 logits + 10 uint16 ids + rest_lse + written_epoch = 68 bytes per row.
  assert top10 == 3 * n * (10 * 4 + 10 * 2 + 4 + 4) == 261_358_068  # 261 MB, 249 MiB.
  # 1000 uint8 codes + row_min + row_scale + written_epoch = 1012 bytes per row.
  assert int8 == 3 * n * (1000 + 4 + 4 + 4) == 3_889_623_012  # 3,890 MB, 3,709 MiB.
  assert int8_top10 == 3 * n * (10 * 1 + 10 * 2 + 4 * 4) == 176_801_046  # 177 MB.
  # Table 2 of the paper: 14,643 MB for SAF on ImageNet; within 0.3 % if those are MiB.
  assert abs(f32 / 2**20 - 14_643) / 14_643 < 0.003


def test_memmap_table_lives_in_npy_files(tmp_path):
  directory = str(tmp_path / 'table')
  table = logit_table.LogitTable(6, 3, E_tilde=2, memmap_dir=directory)
  arrays = table.state_dict()
  assert isinstance(arrays['values'], np.memmap)
  assert isinstance(arrays['written_epoch'], np.memmap)
  assert sorted(p.name for p in (tmp_path / 'table').iterdir()) == [
    'values.npy',
    'written_epoch.npy',
  ]
  logits = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
  table.write(np.array([4, 1]), logits, epoch=1)
  table.state_dict()  # Syncs the files.
  values = np.load(f'{directory}/values.npy', mmap_mode='r')
  written = np.load(f'{directory}/written_epoch.npy', mmap_mode='r')
  np.testing.assert_array_equal(values[1, [4, 1]], logits)
  never = logit_table.NEVER_WRITTEN
  np.testing.assert_array_equal(written[1], [never, 1, never, never, 1, never])
  del values, written
  table.close()
  with pytest.raises(RuntimeError, match='closed'):
    table.gather(np.array([1]), epoch=3)
  # A new table in the same directory starts empty.
  fresh = logit_table.LogitTable(6, 3, E_tilde=2, memmap_dir=directory)
  assert not fresh.gather(np.arange(6), epoch=3)[1].any()
  np.testing.assert_array_equal(np.load(f'{directory}/values.npy'), 0.0)
  np.testing.assert_array_equal(
    np.load(f'{directory}/written_epoch.npy'), logit_table.NEVER_WRITTEN
  )


def test_state_dict_and_close_sync_memmaps_to_disk(tmp_path, monkeypatch):
  synced = []
  monkeypatch.setattr(np.memmap, 'flush', lambda self: synced.append(self.shape))
  table = logit_table.LogitTable(5, 4, E_tilde=2, topk=2, tau=1.0, memmap_dir=str(tmp_path))
  table.state_dict()
  assert sorted(synced) == [(2, 5), (2, 5), (2, 5, 2), (2, 5, 2)]
  table.close()
  assert len(synced) == 8
  logit_table.LogitTable(5, 4, E_tilde=2).state_dict()  # In RAM: nothing to sync.
  assert len(synced) == 8


def test_memmap_load_state_dict_copies_in_place(tmp_path):
  source = logit_table.LogitTable(5, 2, E_tilde=2)
  source.write(np.array([1, 3]), np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), epoch=1)
  table = logit_table.LogitTable(5, 2, E_tilde=2, memmap_dir=str(tmp_path))
  values = table.state_dict()['values']
  table.load_state_dict(source.state_dict())
  assert table.state_dict()['values'] is values and isinstance(values, np.memmap)
  targets, mask = table.gather(np.array([1, 2, 3]), epoch=3)
  np.testing.assert_array_equal(mask, [1, 0, 1])
  np.testing.assert_array_equal(targets[[0, 2]], [[1.0, 2.0], [3.0, 4.0]])
  state = table.state_dict()
  assert sorted(state) == ['values', 'written_epoch']
  np.testing.assert_array_equal(np.load(tmp_path / 'values.npy')[1, 3], [3.0, 4.0])


def test_memmap_topk_bfloat16_round_trip(tmp_path):
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(4, 6)).astype(np.float32)
  kwargs = dict(E_tilde=1, dtype='bfloat16', topk=2, tau=1.5)
  table = logit_table.LogitTable(4, 6, memmap_dir=str(tmp_path / 'a'), **kwargs)
  table.write(np.arange(4), logits, epoch=1)
  expected, _ = table.gather(np.arange(4), epoch=2)
  state = table.state_dict()
  assert {k: (v.shape, v.dtype) for k, v in state.items()} == {
    'topk_values': ((1, 4, 2), np.dtype(ml_dtypes.bfloat16)),
    'topk_ids': ((1, 4, 2), np.dtype(np.uint16)),
    'rest_lse': ((1, 4), np.dtype(np.float32)),
    'written_epoch': ((1, 4), np.dtype(np.int32)),
  }
  on_disk = np.load(tmp_path / 'a' / 'topk_values.npy').view(ml_dtypes.bfloat16)  # uint16 bits.
  np.testing.assert_array_equal(on_disk, state['topk_values'])
  restored = logit_table.LogitTable(4, 6, memmap_dir=str(tmp_path / 'b'), **kwargs)
  restored.load_state_dict({k: np.array(v) for k, v in state.items()})
  assert all(isinstance(v, np.memmap) for v in restored.state_dict().values())
  targets, mask = restored.gather(np.arange(4), epoch=2)
  assert mask.all()
  np.testing.assert_array_equal(targets, expected)


def test_layout_mismatch_raises():
  full = logit_table.LogitTable(5, 4, E_tilde=2)
  topk = logit_table.LogitTable(5, 4, E_tilde=2, topk=2, tau=1.0)
  with pytest.raises(ValueError, match=r'\(full logits\).*stores top-k logits.*table_topk'):
    topk.load_state_dict(full.state_dict())
  with pytest.raises(ValueError, match=r'\(top-k logits\).*stores full logits'):
    full.load_state_dict(topk.state_dict())
  with pytest.raises(ValueError, match='table_topk or E_tilde differ'):
    logit_table.LogitTable(5, 4, E_tilde=2, topk=3, tau=1.0).load_state_dict(topk.state_dict())
  bad_ids = dict(topk.state_dict(), topk_ids=np.full((2, 5, 2), 4, np.uint16))
  with pytest.raises(ValueError, match='num_classes differ'):
    topk.load_state_dict(bad_ids)


def _int8_round_trip(logits, **kwargs):
  """(targets read back, row_min, row_scale) of float32 [N, K] logits through an int8 table."""
  num, num_classes = logits.shape
  table = logit_table.LogitTable(num, num_classes, E_tilde=1, dtype='int8', **kwargs)
  table.write(np.arange(num), logits, epoch=1)
  targets, mask = table.gather(np.arange(num), epoch=2)
  assert mask.all() and targets.dtype == np.float32
  arrays = table.state_dict()
  return targets, arrays['row_min'][0], arrays['row_scale'][0], table


@pytest.mark.parametrize('spread', [0.01, 3.0, 300.0])
def test_int8_round_trip_error_is_at_most_half_the_row_scale(spread):
  rng = np.random.default_rng(5)
  logits = (spread * rng.normal(size=(64, 100)) + 7.0).astype(np.float32)
  targets, row_min, row_scale, table = _int8_round_trip(logits)
  arrays = table.state_dict()
  assert arrays['values'].dtype == np.uint8 and arrays['row_min'].dtype == np.float32
  np.testing.assert_array_equal(row_min, logits.min(-1))
  want_scale = (logits.max(-1).astype(np.float64) - logits.min(-1)) / 255
  np.testing.assert_allclose(row_scale, want_scale, rtol=1e-7)
  codes = arrays['values'][0]
  assert (codes.min(-1) == 0).all() and (codes.max(-1) == 255).all()  # The full 8 bits.
  np.testing.assert_array_equal(targets, codes * row_scale[:, None] + row_min[:, None])
  error = np.abs(targets.astype(np.float64) - logits)  # [N, K]
  # Half a step, plus the float32 rounding of codes * scale + min.
  bound = row_scale[:, None] / 2 * (1 + 1e-6) + 2.5e-7 * np.abs(logits).max(-1, keepdims=True)
  assert (error <= bound).all()
  # Not exact: rounding to 256 levels errs by up to half a step, ~1/4 step on average.
  ratio = error / row_scale[:, None]
  assert ratio.max() > 0.45 and 0.2 < ratio.mean() < 0.3


def test_int8_constant_and_non_finite_rows():
  logits = np.array([[2.5] * 4, [-1.0, 0.0, 1.0, 2.0], [0.0, np.inf, 1.0, 2.0]], np.float32)
  targets, row_min, row_scale, table = _int8_round_trip(logits)
  assert row_scale[0] == 0.0 and row_min[0] == 2.5
  np.testing.assert_array_equal(table.state_dict()['values'][0, 0], 0)
  np.testing.assert_array_equal(targets[0], logits[0])  # A constant row is exact.
  np.testing.assert_allclose(targets[1], logits[1], atol=3.0 / 255 / 2 + 1e-6)
  assert np.isnan(row_min[2]) and np.isnan(row_scale[2])  # Handed on as NaN, not clipped.
  assert np.isnan(targets[2]).all()


def test_int8_softened_target_kl_is_within_the_module_bound():
  # KL(p || p_hat) <= s^2 / (8 tau^2) (Hoeffding) and |p_hat - p|_1 <= s / (2 tau) (Pinsker).
  rng = np.random.default_rng(6)
  tau = 2.0
  logits = (4.0 * rng.normal(size=(200, 10))).astype(np.float32)
  student = (4.0 * rng.normal(size=(200, 10))).astype(np.float32)
  targets, _, row_scale, _ = _int8_round_trip(logits)
  p, p_hat = _softmax64(logits, tau), _softmax64(targets, tau)
  kl = np.sum(p * np.log(p / p_hat), axis=-1)  # [N]
  s = row_scale.astype(np.float64)
  assert (kl <= s**2 / (8 * tau**2) * (1 + 1e-3) + 1e-12).all()
  assert (np.abs(p_hat - p).sum(-1) <= s / (2 * tau) * (1 + 1e-3)).all()
  assert kl.mean() > 1e-7  # Not a trivial pass.
  stats = logit_table.storage_error(logits, student, tau=tau, dtype='int8')
  assert stats['mean_kl_target'] == pytest.approx(kl.mean(), rel=1e-6)
  assert stats['mean_kl_target'] < 1e-4 and stats['rel_error'] < 1e-3
  assert stats['grad_rel_error'] < 0.02


def test_int8_topk_quantises_the_kept_logits():
  rng = np.random.default_rng(7)
  num, num_classes, k, tau = 6, 20, 5, 2.0
  logits = (3.0 * rng.normal(size=(num, num_classes))).astype(np.float32)
  targets, row_min, row_scale, table = _int8_round_trip(logits, topk=k, tau=tau)
  arrays = table.state_dict()
  assert 'values' not in arrays and arrays['topk_values'].dtype == np.uint8
  exact = logit_table.LogitTable(num, num_classes, E_tilde=1, topk=k, tau=tau)
  exact.write(np.arange(num), logits, epoch=1)
  exact_arrays = exact.state_dict()
  np.testing.assert_array_equal(arrays['topk_ids'], exact_arrays['topk_ids'])
  # rest_lse is the tail's, from the unquantised logits.
  np.testing.assert_array_equal(arrays['rest_lse'], exact_arrays['rest_lse'])
  top = np.sort(logits, axis=-1)[:, -k:]  # [N, k]
  np.testing.assert_array_equal(row_min, top[:, 0])
  np.testing.assert_allclose(row_scale, (top[:, -1] - top[:, 0]) / 255, rtol=1e-6)
  kept = np.take_along_axis(targets, arrays['topk_ids'][0].astype(np.intp), axis=-1)
  want = np.take_along_axis(logits, arrays['topk_ids'][0].astype(np.intp), axis=-1)
  assert (np.abs(kept - want) <= row_scale[:, None] / 2 + 1e-6).all()
  assert np.abs(kept - want).max() > 0  # Really rounded.
  expected, _ = exact.gather(np.arange(num), epoch=2)
  tail = np.ones_like(logits, bool)
  np.put_along_axis(tail, arrays['topk_ids'][0].astype(np.intp), False, axis=-1)
  np.testing.assert_array_equal(targets[tail], expected[tail])  # The flat tail as before.


def test_memmap_int8_state_dict_round_trip(tmp_path):
  rng = np.random.default_rng(8)
  logits = (5.0 * rng.normal(size=(4, 6))).astype(np.float32)
  table = logit_table.LogitTable(5, 6, E_tilde=2, dtype='int8', memmap_dir=str(tmp_path / 'a'))
  table.write(np.array([0, 2, 3, 4]), logits, epoch=1)
  expected, _ = table.gather(np.array([0, 2, 3, 4]), epoch=3)
  state = table.state_dict()
  assert {k: (v.shape, v.dtype) for k, v in state.items()} == {
    'values': ((2, 5, 6), np.dtype(np.uint8)),
    'row_min': ((2, 5), np.dtype(np.float32)),
    'row_scale': ((2, 5), np.dtype(np.float32)),
    'written_epoch': ((2, 5), np.dtype(np.int32)),
  }
  assert all(isinstance(v, np.memmap) for v in state.values())
  for name, array in state.items():  # Native .npy dtypes: the files are the arrays.
    np.testing.assert_array_equal(np.load(tmp_path / 'a' / f'{name}.npy'), array)
  assert table.nbytes == logit_table.table_nbytes(5, 6, E_tilde=2, dtype='int8')
  restored = logit_table.LogitTable(5, 6, E_tilde=2, dtype='int8', memmap_dir=str(tmp_path / 'b'))
  restored.load_state_dict({k: np.array(v) for k, v in state.items()})
  targets, mask = restored.gather(np.arange(5), epoch=3)
  np.testing.assert_array_equal(mask, [1, 0, 1, 1, 1])
  np.testing.assert_array_equal(targets[[0, 2, 3, 4]], expected)
  np.testing.assert_allclose(expected, logits, atol=np.ptp(logits, -1).max() / 255 / 2 + 1e-6)


def test_int8_layout_mismatch_raises():
  f32 = logit_table.LogitTable(5, 4, E_tilde=2)
  int8 = logit_table.LogitTable(5, 4, E_tilde=2, dtype='int8')
  int8_topk = logit_table.LogitTable(5, 4, E_tilde=2, dtype='int8', topk=2, tau=1.0)
  with pytest.raises(
    ValueError, match=r'\(full logits\).*stores full logits \(int8\).*table_dtype'
  ):
    int8.load_state_dict(f32.state_dict())
  with pytest.raises(ValueError, match=r'\(full logits \(int8\)\).*stores full logits in'):
    f32.load_state_dict(int8.state_dict())
  with pytest.raises(ValueError, match=r'\(top-k logits \(int8\)\).*stores full logits \(int8'):
    int8.load_state_dict(int8_topk.state_dict())
  float_codes = dict(int8.state_dict(), values=np.zeros((2, 5, 4), np.float32))
  with pytest.raises(ValueError, match='needs uint8 codes'):
    int8.load_state_dict(float_codes)


@pytest.mark.parametrize('dtype, topk', [('bfloat16', 0), ('int8', 0), ('int8', 3)])
def test_storage_error_agrees_with_losses(dtype, topk):
  rng = np.random.default_rng(9)
  num, num_classes, tau = 16, 10, 2.0
  targets = (3.0 * rng.normal(size=(num, num_classes))).astype(np.float32)
  student = (3.0 * rng.normal(size=(num, num_classes))).astype(np.float32)
  stats = logit_table.storage_error(targets, student, tau=tau, dtype=dtype, topk=topk)
  table = logit_table.LogitTable(num, num_classes, E_tilde=1, dtype=dtype, topk=topk, tau=tau)
  table.write(np.arange(num), targets, epoch=1)
  stored, _ = table.gather(np.arange(num), epoch=2)
  full = float(losses.trajectory_loss(jnp.asarray(student), jnp.asarray(targets), temperature=tau))
  loss = float(losses.trajectory_loss(jnp.asarray(student), jnp.asarray(stored), temperature=tau))
  assert stats['trajectory_loss_full'] == pytest.approx(full, rel=1e-5)
  assert stats['trajectory_loss_stored'] == pytest.approx(loss, rel=1e-5)
  p, p_hat, q = (_softmax64(x, tau) for x in (targets, stored, student))
  grad_rel = np.abs(p_hat - p).sum() / np.abs(q - p).sum()
  assert stats['grad_rel_error'] == pytest.approx(grad_rel, rel=1e-6)
  assert stats['mean_kl_target'] == pytest.approx(np.sum(p * np.log(p / p_hat), -1).mean(), 1e-6)
  assert stats['abs_error'] > 0
  if not topk:  # Rounding only: small next to the loss and its gradient.
    assert stats['rel_error'] < 1e-2 and stats['grad_rel_error'] < 0.05


def test_storage_error_of_float32_full_storage_is_zero():
  rng = np.random.default_rng(10)
  targets, student = (rng.normal(size=(2, 8, 5)) * 3).astype(np.float32)
  stats = logit_table.storage_error(targets, student, tau=1.5)
  assert stats['trajectory_loss_full'] > 0.1
  assert stats['trajectory_loss_stored'] == stats['trajectory_loss_full']
  for key in ('abs_error', 'rel_error', 'max_row_abs_error', 'mean_kl_target', 'grad_rel_error'):
    assert stats[key] == 0.0, key
  with pytest.raises(ValueError, match='tau must be > 0'):
    logit_table.storage_error(targets, student, tau=0.0)
  with pytest.raises(ValueError, match='table_dtype'):
    logit_table.storage_error(targets, student, tau=1.0, dtype='int4')
  with pytest.raises(ValueError, match='table_topk'):
    logit_table.topk_compression_error(targets, student, k=0, tau=1.0)  # That is full storage.

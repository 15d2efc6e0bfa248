"""SAF's device table: the host LogitTable's semantics as pure JAX functions under jit."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from saf_jax import logit_table
from saf_jax.logit_table import DeviceTable, device, layout
from tests.conftest import REPO_ROOT
from tests.test_logit_table import BATCH, NUM_CLASSES, NUM_EXAMPLES, _stub_logits


def _jitted_step(table, counter=None):
  """``(arrays, rows, logits, epoch) -> ((targets, mask), new arrays)``, gather then write."""

  def step(arrays, rows, logits, epoch):
    if counter is not None:
      counter.append(1)  # Runs once per trace.
    return table.gather(arrays, rows, epoch), table.write(arrays, rows, logits, epoch)

  return jax.jit(step)


@pytest.mark.parametrize('E_tilde', [1, 2, 3])
def test_targets_are_same_example_from_e_tilde_epochs_ago(E_tilde):
  table = DeviceTable(NUM_EXAMPLES, NUM_CLASSES, E_tilde=E_tilde)
  traces = []
  step = _jitted_step(table, traces)
  arrays = table.init()
  rng = np.random.default_rng(0)
  seen = {}  # epoch -> ids that were written (in a full batch) that epoch.
  num_valid = 0
  for epoch in range(1, 5):
    order = rng.permutation(NUM_EXAMPLES).astype(np.int32)  # Reshuffled every epoch.
    steps = NUM_EXAMPLES // BATCH  # drop_remainder: the last 2 are dropped.
    seen[epoch] = set(order[: steps * BATCH].tolist())
    for s in range(steps):
      ids = order[s * BATCH : (s + 1) * BATCH]
      logits = _stub_logits(ids, epoch)
      (targets, mask), arrays = step(arrays, ids, logits, np.int32(epoch))
      targets, mask = np.asarray(targets), np.asarray(mask)
      expected = np.array([i in seen.get(epoch - E_tilde, set()) for i in ids.tolist()])
      np.testing.assert_array_equal(mask, expected.astype(np.float32), err_msg=str(epoch))
      want = np.where(expected[:, None], _stub_logits(ids, epoch - E_tilde), 0.0)
      np.testing.assert_array_equal(targets, want)  # Invalid targets are 0.
      num_valid += int(expected.sum())
  assert num_valid > 0
  assert len(traces) == 1  # The epoch is traced: one compilation for every epoch.
  written = np.asarray(arrays['written_epoch'])
  for epoch in range(max(1, 5 - E_tilde), 5):  # The slots still holding these epochs.
    np.testing.assert_array_equal(
      np.flatnonzero(written[epoch % E_tilde] == epoch), sorted(seen[epoch])
    )


def test_gather_and_write_run_inside_scan_with_a_traced_epoch():
  """One epoch's steps as a lax.scan: the same targets and table as step by step."""
  table = DeviceTable(12, 3, E_tilde=1, dtype='int8', topk=2, tau=1.0)
  rng = np.random.default_rng(1)
  rows = np.stack([rng.permutation(12)[:8].reshape(2, 4) for _ in range(3)]).astype(np.int32)
  logits = rng.normal(size=(3, 2, 4, 3)).astype(np.float32)  # [epoch, step, batch, class]

  @jax.jit
  def epoch_scan(arrays, rows, logits, epoch):
    def body(arrays, batch):
      targets, mask = table.gather(arrays, batch[0], epoch)
      return table.write(arrays, batch[0], batch[1], epoch), (targets, mask)

    return jax.lax.scan(body, arrays, (rows, logits))

  step = _jitted_step(table)
  scanned = stepped = table.init()
  for e in range(3):
    scanned, (targets, mask) = epoch_scan(scanned, rows[e], logits[e], np.int32(e + 1))
    for s in range(2):
      (want_targets, want_mask), stepped = step(stepped, rows[e, s], logits[e, s], e + 1)
      np.testing.assert_array_equal(targets[s], want_targets)
      np.testing.assert_array_equal(mask[s], want_mask)
  assert np.asarray(mask).sum() > 0
  for name in stepped:
    np.testing.assert_array_equal(scanned[name], stepped[name], err_msg=name)


def _run_both(num_rows=20, num_classes=10, batch=6, epochs=5, E_tilde=2, seed=0, **kwargs):
  """The same writes and reads on a host LogitTable and a jitted DeviceTable.

  Returns ``(steps, host, arrays)``: per step a dict of the host's and the device's targets
  and masks, the true logits each valid target was written from, and the device arrays
  read by that step; the host table; the device arrays at the end.
  """
  host = logit_table.LogitTable(num_rows, num_classes, E_tilde=E_tilde, **kwargs)
  table = DeviceTable(num_rows, num_classes, E_tilde=E_tilde, **kwargs)
  step = _jitted_step(table)
  arrays = table.init()
  rng = np.random.default_rng(seed)
  written = {}  # (epoch, row) -> the logits written.
  steps = []
  for epoch in range(1, epochs + 1):
    order = rng.permutation(num_rows).astype(np.int32)
    for s in range(num_rows // batch):  # The last num_rows % batch rows are dropped.
      rows = order[s * batch : (s + 1) * batch]
      logits = (3.0 * rng.normal(size=(batch, num_classes))).astype(np.float32)
      host_targets, host_mask = host.gather(rows, epoch=epoch)
      read = {name: np.asarray(a)[epoch % E_tilde, rows] for name, a in arrays.items()}
      (targets, mask), arrays = step(arrays, rows, logits, np.int32(epoch))
      host.write(rows, logits, epoch=epoch)
      truth = np.stack([written.get((epoch - E_tilde, r), np.zeros(num_classes)) for r in rows])
      steps.append(
        dict(
          targets=np.asarray(targets),
          mask=np.asarray(mask),
          host_targets=host_targets,
          host_mask=host_mask,
          truth=truth.astype(np.float32),
          read=read,
        )
      )
      written.update(((epoch, r), logits[i]) for i, r in enumerate(rows.tolist()))
  assert sum(s['mask'].sum() for s in steps) > 20  # Enough valid targets to compare.
  assert min(s['mask'].min() for s in steps) == 0  # And masked ones.
  return steps, host, {name: np.asarray(a) for name, a in arrays.items()}


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_full_storage_is_bit_identical_to_the_host_table(dtype):
  steps, host, arrays = _run_both(dtype=dtype)
  for s in steps:
    assert s['targets'].dtype == np.float32
    np.testing.assert_array_equal(s['mask'], s['host_mask'])
    np.testing.assert_array_equal(s['targets'], s['host_targets'])
  state = host.state_dict()
  assert sorted(arrays) == sorted(state)  # jit returns dicts in sorted key order.
  for name, array in state.items():
    assert arrays[name].dtype == array.dtype and arrays[name].shape == array.shape, name
    np.testing.assert_array_equal(arrays[name], array, err_msg=name)
  if dtype == 'bfloat16':  # Really rounded: the bfloat16 targets are not the logits.
    valid = np.concatenate([s['mask'] for s in steps]) == 1
    truth = np.concatenate([s['truth'] for s in steps])[valid]
    targets = np.concatenate([s['targets'] for s in steps])[valid]
    np.testing.assert_array_equal(targets, truth.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert (targets != truth).any()


def _int8_bound(read, truth):
  """Half the row's scale plus float32 rounding: the int8 codec's read-back bound."""
  scale = read['row_scale'][:, None]
  return scale / 2 + 1e-6 * np.abs(truth).max(axis=-1, keepdims=True)


def test_int8_full_storage_matches_the_host_within_the_codec_bound():
  steps, host, arrays = _run_both(dtype='int8')
  errors = []
  for s in steps:
    np.testing.assert_array_equal(s['mask'], s['host_mask'])
    valid = s['mask'] == 1
    np.testing.assert_array_equal(s['targets'][~valid], 0.0)
    error = np.abs(s['targets'] - s['truth'])[valid]
    assert (error <= _int8_bound(s['read'], s['truth'])[valid]).all()
    errors.append(error / s['read']['row_scale'][valid, None])
  assert np.concatenate(errors).max() > 0.4  # Really quantised: up to half a step.
  state = host.state_dict()
  np.testing.assert_array_equal(arrays['written_epoch'], state['written_epoch'])
  np.testing.assert_array_equal(arrays['row_min'], state['row_min'])  # A float32 logit.
  np.testing.assert_allclose(arrays['row_scale'], state['row_scale'], rtol=1e-6)
  codes, host_codes = arrays['values'].astype(int), state['values'].astype(int)
  assert np.abs(codes - host_codes).max() <= 1
  assert np.mean(codes == host_codes) > 0.99
  assert codes.max() == 255 and host_codes.max() == 255


def _sorted_by_class(ids, *values):
  order = np.argsort(ids, axis=-1)
  return [np.take_along_axis(np.asarray(a), order, axis=-1) for a in (ids, *values)]


@pytest.mark.parametrize('dtype', ['float32', 'int8'])
def test_topk_storage_matches_the_host(dtype):
  k, tau = 3, 2.0
  steps, host, arrays = _run_both(dtype=dtype, topk=k, tau=tau)
  for s in steps:
    np.testing.assert_array_equal(s['mask'], s['host_mask'])
    valid = s['mask'] == 1
    np.testing.assert_array_equal(s['targets'][~valid], 0.0)
    top = np.argsort(-s['truth'], axis=-1)[:, :k]  # No ties in normal logits.
    tail = np.ones_like(s['truth'], bool)
    np.put_along_axis(tail, top, False, axis=-1)
    if dtype == 'float32':
      np.testing.assert_allclose(s['targets'], s['host_targets'], rtol=1e-6, atol=1e-6)
    else:  # The kept logits within the int8 bound of the truth, the flat tail as the host's.
      kept = np.take_along_axis(s['targets'], top, -1)
      want = np.take_along_axis(s['truth'], top, -1)
      assert (np.abs(kept - want) <= _int8_bound(s['read'], want))[valid].all()
      np.testing.assert_allclose(s['targets'][tail], s['host_targets'][tail], rtol=1e-6, atol=1e-6)
    # The tail really is flat (and not the truth): the reconstruction, not a copy.
    tails = s['targets'][tail].reshape(len(tail), -1)[valid]
    np.testing.assert_array_equal(tails, tails[:, :1].repeat(tails.shape[1], 1))
  state = host.state_dict()
  assert sorted(arrays) == sorted(state)  # jit returns dicts in sorted key order.
  assert {n: (a.shape, a.dtype) for n, a in arrays.items()} == {
    n: (a.shape, a.dtype) for n, a in state.items()
  }
  np.testing.assert_array_equal(arrays['written_epoch'], state['written_epoch'])
  np.testing.assert_allclose(arrays['rest_lse'], state['rest_lse'], rtol=1e-6, atol=1e-6)
  # The same classes are kept; their order within a row is top_k's, not argpartition's.
  ids, values = _sorted_by_class(arrays['topk_ids'], arrays['topk_values'])
  host_ids, host_values = _sorted_by_class(state['topk_ids'], state['topk_values'])
  np.testing.assert_array_equal(ids, host_ids)
  if dtype == 'float32':
    np.testing.assert_array_equal(values, host_values)
  else:
    np.testing.assert_array_equal(arrays['row_min'], state['row_min'])
    np.testing.assert_allclose(arrays['row_scale'], state['row_scale'], rtol=1e-6)
    assert np.abs(values.astype(int) - host_values.astype(int)).max() <= 1


def test_int8_constant_and_non_finite_rows():
  logits = np.array(
    [
      [2.5] * 4,
      [-1.0, 0.0, 1.0, 2.0],
      [0.0, np.inf, 1.0, 2.0],
      [np.nan, 0.0, 1.0, 2.0],
      [-np.inf, 0.0, 1.0, 2.0],
    ],
    np.float32,
  )
  rows = np.arange(5, dtype=np.int32)
  table = DeviceTable(5, 4, E_tilde=1, dtype='int8')
  arrays = jax.jit(table.write)(table.init(), rows, logits, np.int32(1))
  targets, mask = (np.asarray(x) for x in jax.jit(table.gather)(arrays, rows, np.int32(2)))
  arrays = {name: np.asarray(a)[0] for name, a in arrays.items()}
  assert mask.all()
  assert arrays['row_scale'][0] == 0.0 and arrays['row_min'][0] == 2.5
  np.testing.assert_array_equal(arrays['values'][0], 0)
  np.testing.assert_array_equal(targets[0], logits[0])  # A constant row is exact.
  np.testing.assert_allclose(targets[1], logits[1], atol=3.0 / 255 / 2 + 1e-6)
  assert np.isnan(arrays['row_min'][2:]).all() and np.isnan(arrays['row_scale'][2:]).all()
  np.testing.assert_array_equal(arrays['values'][2:], 0)
  assert np.isnan(targets[2:]).all()  # Handed on as NaN, not clipped.
  host = logit_table.LogitTable(5, 4, E_tilde=1, dtype='int8')
  host.write(rows, logits, epoch=1)
  state = {name: a[0] for name, a in host.state_dict().items()}
  np.testing.assert_array_equal(arrays['values'], state['values'])
  np.testing.assert_array_equal(arrays['row_min'], state['row_min'])
  # float32 (max - min) / 255 may be an ulp off the host's float64 quotient rounded.
  np.testing.assert_allclose(arrays['row_scale'], state['row_scale'], rtol=2e-7)
  np.testing.assert_allclose(targets, host.gather(rows, epoch=2)[0], rtol=1e-6, atol=1e-6)


def test_topk_all_minus_inf_tail_gives_minus_inf_as_the_host():
  logits = np.array([[-np.inf, 3.0, 1.0], [0.5, 3.0, 1.0]], np.float32)
  rows = np.arange(2, dtype=np.int32)
  table = DeviceTable(2, 3, E_tilde=1, topk=2, tau=1.5)
  arrays = jax.jit(table.write)(table.init(), rows, logits, np.int32(1))
  targets, _ = jax.jit(table.gather)(arrays, rows, np.int32(2))
  host = logit_table.LogitTable(2, 3, E_tilde=1, topk=2, tau=1.5)
  host.write(rows, logits, epoch=1)
  rest_lse = np.asarray(arrays['rest_lse'][0])
  assert rest_lse[0] == -np.inf and host.state_dict()['rest_lse'][0, 0] == -np.inf
  np.testing.assert_allclose(rest_lse[1], 0.5 / 1.5, rtol=1e-6)  # A one-logit tail.
  np.testing.assert_allclose(targets, host.gather(rows, epoch=2)[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(targets[0], [-np.inf, 3.0, 1.0])


def test_codecs_agree_with_layout_on_random_rows():
  rng = np.random.default_rng(11)
  logits = (rng.normal(size=(64, 30)) * rng.uniform(0.01, 100, size=(64, 1))).astype(np.float32)
  codes, row_min, row_scale = jax.jit(device.quantise_int8)(logits)
  host_codes, host_min, host_scale = layout.quantise_int8(logits)
  assert codes.dtype == jnp.uint8 and row_min.dtype == row_scale.dtype == jnp.float32
  np.testing.assert_array_equal(row_min, host_min)
  np.testing.assert_allclose(row_scale, host_scale, rtol=1e-6)
  assert np.abs(np.asarray(codes, int) - host_codes.astype(int)).max() <= 1
  back = np.asarray(device.dequantise_int8(codes, row_min, row_scale))
  bound = np.asarray(row_scale)[:, None] / 2 + 1e-6 * np.abs(logits).max(-1, keepdims=True)
  assert (np.abs(back - logits) <= bound).all()
  top_values, top_ids, rest_lse = jax.jit(device.compress_topk, static_argnames=('k', 'tau'))(
    logits, k=4, tau=0.7
  )
  host_values, host_ids, host_lse = layout.compress_topk(logits, k=4, tau=0.7)
  np.testing.assert_array_equal(np.sort(top_ids, -1), np.sort(host_ids, -1))
  np.testing.assert_array_equal(top_values, -np.sort(-host_values, -1))  # top_k: descending.
  np.testing.assert_allclose(rest_lse, host_lse, rtol=1e-6)
  np.testing.assert_allclose(
    device.reconstruct_topk(top_values, top_ids, rest_lse, num_classes=30, tau=0.7),
    layout.reconstruct_topk(host_values, host_ids, host_lse, num_classes=30, tau=0.7),
    rtol=1e-6,
  )


@pytest.mark.parametrize(
  'kwargs',
  [
    dict(),
    dict(dtype='bfloat16'),
    dict(dtype='int8'),
    dict(topk=2, tau=1.0),
    dict(dtype='int8', topk=2, tau=1.0),
  ],
)
def test_init_specs_and_nbytes_are_the_host_tables(kwargs):
  table = DeviceTable(7, 5, E_tilde=3, **kwargs)
  state = logit_table.LogitTable(7, 5, E_tilde=3, **kwargs).state_dict()
  arrays = jax.jit(table.init)()
  assert list(table.specs()) == list(state) and sorted(arrays) == sorted(state)
  for name, array in state.items():
    assert arrays[name].dtype == array.dtype and arrays[name].shape == array.shape, name
    np.testing.assert_array_equal(np.asarray(arrays[name]), array, err_msg=name)
  assert (np.asarray(arrays['written_epoch']) == layout.NEVER_WRITTEN).all()
  assert table.nbytes() == sum(a.nbytes for a in state.values())
  assert {n: (s.shape, s.dtype) for n, s in table.abstract().items()} == {
    n: (a.shape, a.dtype) for n, a in state.items()
  }


def test_rows_out_of_range_read_masked_and_write_nothing():
  """Not clamped: a bad row never reads or overwrites another example's row."""
  table = DeviceTable(4, 2, E_tilde=1)
  arrays = table.write(table.init(), np.arange(4, dtype=np.int32), np.ones((4, 2)), 1)
  arrays = jax.jit(table.write)(
    arrays, np.array([-1, 4, 1], np.int32), np.full((3, 2), 9.0, np.float32), np.int32(2)
  )
  np.testing.assert_array_equal(np.asarray(arrays['written_epoch'])[0], [1, 2, 1, 1])
  np.testing.assert_array_equal(np.asarray(arrays['values'])[0], [[1, 1], [9, 9], [1, 1], [1, 1]])
  targets, mask = jax.jit(table.gather)(arrays, np.array([-1, 4, 1, 3], np.int32), np.int32(2))
  np.testing.assert_array_equal(mask, [0, 0, 0, 1])
  np.testing.assert_array_equal(targets, [[0, 0], [0, 0], [0, 0], [1, 1]])


def test_write_checks_logits_shape():
  table = DeviceTable(10, 3, E_tilde=1)
  with pytest.raises(ValueError, match='do not match 4 ids x 3 classes'):
    table.write(table.init(), np.arange(4, dtype=np.int32), np.zeros((4, 5)), 1)
  with pytest.raises(ValueError, match='1-D integer'):
    table.gather(table.init(), np.zeros(4), 1)


@pytest.mark.parametrize(
  'ids, match',
  [
    (np.array([100, 110]), r'\[100, 110\).*not in this process.s partition'),
    (np.array([99, 102]), r'\[100, 110\)'),
    (np.array([103, 103]), 'distinct; repeated: \\[103\\]'),
    (np.array([[101, 102]]), '1-D integer'),
    (np.array([100.0, 101.0]), '1-D integer'),
  ],
)
def test_check_ids_refuses_bad_ids(ids, match):
  with pytest.raises(ValueError, match=match):
    layout.check_ids(ids, 100, 10)


def test_check_ids_returns_int64_rows():
  rows = layout.check_ids(np.array([109, 100, 104], np.int32), 100, 10)
  assert rows.dtype == np.int64
  np.testing.assert_array_equal(rows, [9, 0, 4])
  assert layout.check_ids(np.array([], np.int32), 0, 1).shape == (0,)


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(E_tilde=0), 'config.method.saf.E_tilde must be an integer >= 1'),
    (dict(dtype='float16'), r"config.method.saf.table_dtype must be one of.*'int8'"),
    (dict(topk=3), r'config.method.saf.table_topk must be 0 .* in \[1, 3\)'),
    (dict(topk=-1), 'config.method.saf.table_topk'),
    (dict(topk=2), 'config.method.saf.tau must be > 0'),
    (dict(topk=2, tau=0.0), 'config.method.saf.tau must be > 0'),
    (dict(num_rows=0), 'num_examples >= 1'),
    (dict(num_classes=0), 'num_classes >= 1'),
  ],
)
def test_bad_construction_raises(kwargs, match):
  args = dict(num_rows=10, num_classes=3, E_tilde=1) | kwargs
  with pytest.raises(ValueError, match=match):
    DeviceTable(**args)


def test_construction_normalises_as_the_host_table():
  table = DeviceTable(10, 3, E_tilde=2, tau=0.5)  # tau only matters with top-k.
  assert table.tau is None and table == DeviceTable(10, 3, E_tilde=2)
  assert hash(table) == hash(DeviceTable(10, 3, E_tilde=2))
  assert DeviceTable(10, 3, E_tilde=2, topk=1, tau=2).tau == 2.0


def _check_sharded():
  """Run with 4 CPU devices: a row-sharded table gives the unsharded results exactly."""
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  assert jax.device_count() == 4, jax.devices()
  mesh = Mesh(np.array(jax.devices()), ('data',))
  by_row = NamedSharding(mesh, P(None, 'data'))
  by_example = NamedSharding(mesh, P('data'))
  num_rows, num_classes, batch, E_tilde = 32, 5, 8, 2  # 8 rows a device.
  for kwargs in (dict(), dict(dtype='int8', topk=2, tau=1.5)):
    table = DeviceTable(num_rows, num_classes, E_tilde=E_tilde, **kwargs)

    def step(arrays, rows, logits, epoch, table=table):
      return table.gather(arrays, rows, epoch), table.write(arrays, rows, logits, epoch)

    sharded_step = jax.jit(
      step,
      in_shardings=(by_row, by_example, by_example, NamedSharding(mesh, P())),
      out_shardings=((by_example, by_example), by_row),
      donate_argnums=0,
    )
    single_step = jax.jit(step)
    sharded = jax.jit(table.init, out_shardings=by_row)()
    single = jax.device_put(table.init(), jax.devices()[0])
    host = logit_table.LogitTable(num_rows, num_classes, E_tilde=E_tilde, **kwargs)
    rng = np.random.default_rng(0)
    for epoch in range(1, 5):
      # Each batch takes 2 rows of every device's 8; the last batch is dropped.
      per_device = np.stack([rng.permutation(8) + 8 * d for d in range(4)])  # [4, 8]
      for s in range(3):
        rows = rng.permutation(per_device[:, 2 * s : 2 * s + 2].ravel()).astype(np.int32)
        logits = (3.0 * rng.normal(size=(batch, num_classes))).astype(np.float32)
        (targets, mask), sharded = sharded_step(sharded, rows, logits, np.int32(epoch))
        (single_targets, single_mask), single = single_step(single, rows, logits, np.int32(epoch))
        np.testing.assert_array_equal(targets, single_targets)
        np.testing.assert_array_equal(mask, single_mask)
        host_targets, host_mask = host.gather(rows, epoch=epoch)
        host.write(rows, logits, epoch=epoch)
        np.testing.assert_array_equal(mask, host_mask)
        if not kwargs:
          np.testing.assert_array_equal(targets, host_targets)
      assert epoch < 3 or np.asarray(mask).sum() > 0
    state = host.state_dict()
    for name, array in sharded.items():
      assert array.sharding.is_equivalent_to(by_row, array.ndim), (name, array.sharding)
      shards = sorted(array.addressable_shards, key=lambda shard: shard.index[1].start)
      assert [shard.data.shape[1] for shard in shards] == [8] * 4, name
      np.testing.assert_array_equal(np.asarray(array), np.asarray(single[name]), err_msg=name)
      if not kwargs:
        np.testing.assert_array_equal(np.asarray(array), state[name], err_msg=name)
  print('sharded OK')


def test_table_sharded_over_four_devices_matches_one_device():
  """4 simulated CPU devices, in a subprocess (the device count is fixed at JAX start)."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
  proc = subprocess.run(
    [
      sys.executable,
      '-c',
      'from tests import test_logit_table_device as t; t._check_sharded()',
    ],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert 'sharded OK' in proc.stdout

"""Where the data and SAF's table live: the 'auto' rule, its refusals, and resuming."""

import jax
import numpy as np
import pytest

from configs import default
from saf_jax import (
  checkpoint,
  device_input,
  dispatch,
  experiment,
  logit_table,
  placement,
  validation,
)
from saf_jax.data import base

# Fashion-MNIST's training split: 60,000 images of 28 x 28 x 1, 10 classes.
INFO = base.DatasetInfo(
  name='fashion_mnist', num_train=60_000, num_test=10_000, num_classes=10, image_shape=(28, 28, 1)
)
DATA_BYTES = 60_000 * (28 * 28 + 4)  # uint8 pixels and an int32 label per image.
TABLE_BYTES = 2 * 60_000 * (10 * 4 + 4)  # E_tilde = 2 slots of float32 logits + written epoch.


def _config(**fields):
  config = default.get_config('method=saf')
  for field, value in fields.items():
    *sections, name = field.split('.')
    target = config
    for section in sections:
      target = target[section]
    target[name] = value
  return config


def _resolve(config, memory, num_devices=1, **kwargs):
  return placement.resolve(
    config, INFO, num_devices=num_devices, saf=True, memory=(memory, 'test memory'), **kwargs
  )


def test_sizes_are_the_arrays_bytes():
  assert device_input.nbytes(INFO) == DATA_BYTES
  assert placement.device_table(_config(), INFO, 1).nbytes() == TABLE_BYTES
  # Rows are padded to a multiple of the devices, so that every device holds as many.
  assert placement.table_rows(60_000, 7) == 60_004
  assert placement.device_table(_config(), INFO, 7).nbytes() == 2 * 60_004 * 44


def test_auto_puts_the_data_then_the_table_on_the_devices_while_they_fit_the_budget():
  fraction = 0.25
  # Both fit in a quarter of the memory: both on the devices.
  both = 4 * (DATA_BYTES + TABLE_BYTES)
  assert _resolve(_config(), both) == placement.Placement(
    'device', 'device', _resolve(_config(), both).summary
  )
  # One byte less: the data still fits, the table (counted after the data) does not.
  got = _resolve(_config(), int((DATA_BYTES + TABLE_BYTES - 1) / fraction))
  assert (got.data, got.table) == ('device', 'host')
  # The data does not fit; the table alone does.
  got = _resolve(_config(), int((DATA_BYTES - 1) / fraction))
  assert (got.data, got.table) == ('host', 'device')
  # On 8 devices the table's share per device is an eighth.
  memory = int((DATA_BYTES + TABLE_BYTES / 8 + 1) / fraction)
  got = _resolve(_config(), memory, num_devices=8)
  assert (got.data, got.table) == ('device', 'device')
  assert 'SAF table' in got.summary and 'device' in got.summary


def test_auto_keeps_streamed_data_and_memory_mapped_tables_on_the_host():
  config = _config(**{'input.dataset': 'imagenet2012', 'method.saf.table_memmap': True})
  got = _resolve(config, 10**15)
  assert (got.data, got.table) == ('host', 'host')


def test_explicit_placements_are_kept_or_refused_with_the_sizes():
  got = _resolve(
    _config(**{'input.placement': 'host', 'method.saf.table_placement': 'device'}), 10**12
  )
  assert (got.data, got.table) == ('host', 'device')
  config = _config(**{'method.saf.table_placement': 'device', 'input.placement': 'host'})
  with pytest.raises(
    ValueError,
    match=r"table_placement='device': the SAF table takes 0.00528 GB per device "
    r'\(over 1 devices\), more than the 0.001 GB',
  ):
    _resolve(config, 1_000_000)
  config = _config(**{'input.placement': 'device'})
  with pytest.raises(
    ValueError,
    match=r"input.placement='device': the training set takes 0.0473 GB on every device, more "
    'than the 0.001 GB of test memory',
  ):
    _resolve(config, 1_000_000)


def test_a_resumed_table_stays_where_its_checkpoint_keeps_it():
  # 'auto' follows the checkpoint, even where the rule would choose otherwise.
  # 'auto' follows the checkpoint where the rule would choose the other placement.
  assert _resolve(_config(), 10**12).table == 'device'
  assert _resolve(_config(), 10**12, recorded_table='host').table == 'host'
  budget_too_small = int(4 * (DATA_BYTES + TABLE_BYTES / 2))  # Fits in memory, not the budget.
  assert _resolve(_config(), budget_too_small).table == 'host'
  assert _resolve(_config(), budget_too_small, recorded_table='device').table == 'device'
  # A recorded device table that no longer fits the device is refused before compiling.
  with pytest.raises(ValueError, match=r'the checkpoint to resume: the SAF table takes 0.00528 GB'):
    _resolve(_config(), 1_000_000, recorded_table='device')
  with pytest.raises(
    ValueError, match=r"table_placement must be 'auto' or 'host' to resume this workdir"
  ):
    _resolve(_config(**{'method.saf.table_placement': 'device'}), 10**12, recorded_table='host')


@pytest.mark.parametrize(
  'fields, message',
  [
    (
      {'input.placement': 'gpu'},
      r"config.input.placement must be one of \['auto', 'device', 'host'\], got 'gpu'",
    ),
    (
      {
        'input.placement': 'device',
        'input.dataset': 'imagenet2012',
        'input.augment': 'inception_crop',
      },
      r"config.input.placement must be 'auto' or 'host' for the streamed dataset 'imagenet2012'",
    ),
    ({'method.saf.table_placement': 'tpu'}, r'config.method.saf.table_placement must be one of'),
    (
      {'method.saf.table_placement': 'device', 'method.saf.table_memmap': True},
      r"config.method.saf.table_placement must be 'auto' or 'host' with "
      'method.saf.table_memmap=True',
    ),
    ({'steps_per_dispatch': 0}, r'config.steps_per_dispatch must be an integer >= 1, got 0'),
    (
      {'steps_per_dispatch': 4, 'checkpoint.every_steps': 6},
      r'config.checkpoint.every_steps must be a multiple of steps_per_dispatch=4',
    ),
    (
      {'mesh.device_memory_fraction': 0.0},
      r'config.mesh.device_memory_fraction must be a number in \(0, 1\]',
    ),
  ],
)
def test_validation_refuses_bad_placements_and_dispatch_sizes(fields, message):
  with pytest.raises(ValueError, match=message):
    validation.validate_config(_config(**fields), num_devices=1)


def test_steps_per_dispatch_must_divide_the_steps_per_epoch():
  config = _config(steps_per_dispatch=8)  # 60,000 // 128 = 468 steps per epoch.
  with pytest.raises(
    ValueError,
    match=r'config.steps_per_dispatch must divide the 468 steps per epoch \(one of \[1, 2, 3, 4, '
    r'6, 9, 12, 13, 18, 26, 36, 39, 52\] ...\), got 8',
  ):
    experiment.create(config, INFO)


def test_a_device_table_checkpoint_restores_on_another_row_padding(tmp_path):
  """Rows padded for one device count (30) restore for another (32) and back: rows past
  the examples are never written or read, so Orbax may pad or drop them."""
  workdir = str(tmp_path)
  assert checkpoint.table_placement(workdir) is None
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'data'))
  layout = logit_table.DeviceTable(num_rows=30, num_classes=3, E_tilde=2)
  table = dispatch.TableOnDevice(layout, sharding)
  rows = np.arange(0, 28, 3, dtype=np.int32)
  logits = np.arange(3 * len(rows), dtype=np.float32).reshape(-1, 3)
  table.arrays = layout.write(table.arrays, rows, logits, np.int32(3))
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=2, with_table=True, table_on_device=True)
  ckpt.save(7, {'w': jax.numpy.ones(2)}, table.state_dict(), {'table_placement': 'device'})
  assert checkpoint.table_placement(workdir) == 'device'
  _, saved = checkpoint.saved_table(workdir)
  np.testing.assert_array_equal(saved['values'][1, rows], logits)  # Slot 3 % 2.
  for num_rows in (32, 30, 27):
    like = logit_table.DeviceTable(num_rows=num_rows, num_classes=3, E_tilde=2).abstract(sharding)
    _, arrays, meta = ckpt.restore(7, {'w': jax.ShapeDtypeStruct((2,), np.float32)}, like)
    arrays = jax.device_get(arrays)
    assert arrays['values'].shape == (2, num_rows, 3)
    kept = rows < num_rows
    np.testing.assert_array_equal(arrays['values'][1, rows[kept]], logits[kept])
    assert np.all(arrays['written_epoch'][1, rows[kept]] == 3)
    assert not np.any(arrays['written_epoch'][:, 30:] == 3)  # Padding holds no example.
  ckpt.close()

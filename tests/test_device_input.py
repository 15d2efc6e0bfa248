"""Tests for saf_jax.device_input: batches assembled on the devices equal the host path's."""

import jax
import numpy as np
import pytest

from saf_jax import device_input, sharding
from saf_jax.data import base, memory

_NUM_TRAIN = 50
_SHAPE = (8, 6, 3)  # Not square, to catch rows and columns mixed up.
_PADDING = 2
_MEAN, _STD = base.CHANNEL_STATS['cifar10']


def _datasets(augment: str, *, seed: int = 3) -> memory.InMemoryDatasets:
  """50 random 8x6x3 images, 10 classes; pixels >= 1, so that 0 is only the crop's border."""
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, size=(_NUM_TRAIN, *_SHAPE), dtype=np.uint8)
  labels = rng.integers(0, 10, size=(_NUM_TRAIN,), dtype=np.int32)
  info = base.DatasetInfo(
    name='random', num_train=_NUM_TRAIN, num_test=4, num_classes=10, image_shape=_SHAPE
  )
  return memory.InMemoryDatasets(
    info=info,
    train={'image': images, 'label': labels},
    test={'image': images[:4], 'label': labels[:4]},
    mean=_MEAN,
    std=_STD,
    augment=augment,
    crop_padding=_PADDING,
    seed=seed,
  )


def _place(datasets: memory.InMemoryDatasets) -> device_input.DeviceTrainSet:
  return device_input.place(datasets, sharding.replicated(sharding.create_mesh()))


_make_batch = jax.jit(device_input.make_batch)


def _device_batches(datasets, epoch, *, batch_size, process_count=1, start_batch=0):
  """Every global batch of an epoch, assembled by make_batch under jit, as numpy."""
  train_set = _place(datasets)
  plan = device_input.global_plan(
    datasets, epoch, batch_size=batch_size, process_count=process_count, start_batch=start_batch
  )
  batches = []
  for b in range(len(plan['index'])):
    batch = _make_batch(train_set, {key: rows[b] for key, rows in plan.items()})
    batches.append(jax.tree.map(np.asarray, batch))
  return plan, batches


def _by_id(batches) -> dict[int, np.ndarray]:
  return {
    int(i): image
    for batch in batches
    for i, image in zip(batch['index'], batch['image'], strict=True)
  }


def _unnormalise(images: np.ndarray) -> np.ndarray:
  return np.rint((images * np.array(_STD) + np.array(_MEAN)) * 255).astype(np.uint8)


def _check_equal(device_batch, host_batch):
  assert device_batch['image'].dtype == np.float32
  assert device_batch['label'].dtype == device_batch['index'].dtype == np.int32
  np.testing.assert_array_equal(device_batch['index'], host_batch['index'])
  np.testing.assert_array_equal(device_batch['label'], host_batch['label'])
  np.testing.assert_allclose(device_batch['image'], host_batch['image'], rtol=0, atol=1e-6)


@pytest.mark.parametrize('start_batch', [0, 2])
@pytest.mark.parametrize('augment', ['none', 'flip', 'crop_flip'])
def test_device_batches_equal_host_batches(augment, start_batch):
  datasets = _datasets(augment)
  for epoch in (1, 2):
    host = list(datasets.train_epoch(epoch, batch_size=5, start_batch=start_batch))
    plan, device = _device_batches(datasets, epoch, batch_size=5, start_batch=start_batch)
    assert len(device) == len(host) == 10 - start_batch
    assert plan['index'].shape == plan['flip'].shape == (10 - start_batch, 5)
    assert plan['offset'].shape == (10 - start_batch, 5, 2)
    for device_batch, host_batch in zip(device, host, strict=True):
      assert device_batch['image'].shape == (5, *_SHAPE)
      _check_equal(device_batch, host_batch)
      # The same float32 values as the host path, bit for bit (the normalisation is looked up).
      np.testing.assert_array_equal(device_batch['image'], host_batch['image'])
  if augment == 'none':
    assert not plan['flip'].any() and not plan['offset'].any()


def test_global_batch_is_the_process_batches_in_process_order():
  datasets = _datasets('crop_flip')
  for epoch in (1, 2):
    plan, device = _device_batches(datasets, epoch, batch_size=8, process_count=2)
    hosts = [
      list(datasets.train_epoch(epoch, batch_size=4, process_index=p, process_count=2))
      for p in (0, 1)
    ]
    assert len(device) == len(hosts[0]) == len(hosts[1]) == 25 // 4
    for b, device_batch in enumerate(device):
      host_batch = {k: np.concatenate([hosts[0][b][k], hosts[1][b][k]]) for k in hosts[0][b]}
      _check_equal(device_batch, host_batch)
    # Each process's rows come from its own block of ids.
    assert (plan['index'][:, :4] < 25).all() and (plan['index'][:, 4:] >= 25).all()


def test_crop_offsets_span_the_padding_and_show_the_zero_border():
  datasets = _datasets('crop_flip')
  source, _ = datasets.train_arrays()
  plan, device = _device_batches(datasets, 1, batch_size=_NUM_TRAIN)
  offset, flip, index = plan['offset'][0], plan['flip'][0], plan['index'][0]
  assert offset.min() == 0 and offset.max() == 2 * _PADDING
  for axis in (0, 1):  # Both extremes, on both axes, over the epoch.
    assert set(offset[:, axis].tolist()) == set(range(2 * _PADDING + 1))
  images = _unnormalise(device[0]['image'])
  # Offset row 0: the crop starts at the padded image's top, so its first `padding` rows are
  # the zero border and the next row is the example's first row (its middle columns always
  # inside the image).
  top = int(np.flatnonzero(offset[:, 0] == 0)[0])
  assert (images[top, :_PADDING] == 0).all()
  assert (images[top, _PADDING, _PADDING:-_PADDING] > 0).all()
  # Offset column 2 * padding, unflipped: the crop's last `padding` columns are the border,
  # and pixel (row, 0) is the example's pixel (row - dy + padding, padding).
  right = int(np.flatnonzero((offset[:, 1] == 2 * _PADDING) & ~flip)[0])
  assert (images[right, :, -_PADDING:] == 0).all()
  dy = int(offset[right, 0])
  row = 3
  np.testing.assert_array_equal(
    images[right, row, 0], source[index[right], row + dy - _PADDING, _PADDING]
  )
  # Every example: the crop at its offset of the zero-padded source, mirrored if flipped.
  pad = [(0, 0), (_PADDING, _PADDING), (_PADDING, _PADDING), (0, 0)]
  padded = np.pad(source[index], pad)
  height, width, _ = _SHAPE
  for i, (dy, dx) in enumerate(offset):
    expected = padded[i, dy : dy + height, dx : dx + width]
    np.testing.assert_array_equal(images[i], expected[:, ::-1] if flip[i] else expected)


def test_a_flipped_example_is_the_unflipped_one_mirrored():
  flipped_set, plain_set = _datasets('flip'), _datasets('none')
  plan, flipped = _device_batches(flipped_set, 1, batch_size=10)
  _, plain = _device_batches(plain_set, 1, batch_size=10)
  assert 0 < plan['flip'].sum() < _NUM_TRAIN
  flip_of = dict(zip(plan['index'].ravel().tolist(), plan['flip'].ravel().tolist(), strict=True))
  flipped, plain = _by_id(flipped), _by_id(plain)
  assert flipped.keys() == plain.keys() == set(range(_NUM_TRAIN))
  for i, image in flipped.items():
    expected = plain[i][:, ::-1] if flip_of[i] else plain[i]
    np.testing.assert_array_equal(image, expected)
  assert any(not np.array_equal(flipped[i], plain[i]) for i in flipped)


def test_pixels_depend_on_the_id_not_the_batch_position():
  datasets = _datasets('crop_flip')
  for epoch in (1, 2):
    small = _by_id(_device_batches(datasets, epoch, batch_size=5)[1])
    large = _by_id(_device_batches(datasets, epoch, batch_size=10)[1])
    assert small.keys() == large.keys() == set(range(_NUM_TRAIN))
    for i, image in small.items():
      np.testing.assert_array_equal(image, large[i])
  # Another epoch draws other crops and flips.
  epoch_1 = _by_id(_device_batches(datasets, 1, batch_size=5)[1])
  assert any(not np.array_equal(epoch_1[i], small[i]) for i in small)


def test_nbytes_is_the_placed_arrays_bytes():
  datasets = _datasets('crop_flip')
  train_set = _place(datasets)
  images, labels = datasets.train_arrays()
  assert train_set.images.dtype == np.uint8 and train_set.images.shape == (_NUM_TRAIN, *_SHAPE)
  assert train_set.labels.dtype == np.int32 and train_set.labels.shape == (_NUM_TRAIN,)
  np.testing.assert_array_equal(np.asarray(train_set.images), images)
  np.testing.assert_array_equal(np.asarray(train_set.labels), labels)
  assert device_input.nbytes(datasets.info) == train_set.images.nbytes + train_set.labels.nbytes
  assert device_input.nbytes(datasets.info) == _NUM_TRAIN * (8 * 6 * 3 + 4)
  assert (train_set.mean, train_set.std, train_set.padding) == (_MEAN, _STD, _PADDING)
  assert _place(_datasets('flip')).padding == 0
  # Only the arrays are pytree leaves; the constants are static.
  assert len(jax.tree.leaves(train_set)) == 2


def test_global_plan_refuses_a_batch_that_processes_cannot_share():
  with pytest.raises(ValueError, match='multiple of process_count'):
    device_input.global_plan(_datasets('none'), 1, batch_size=9, process_count=2)

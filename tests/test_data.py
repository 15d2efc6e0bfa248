"""Tests for saf_jax.data on mocked TFDS data, tiny IDX files and real Fashion-MNIST."""

import gzip
import os
import socket
import struct

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from saf_jax import data
from saf_jax.data import base

_DEBIAN_IDX_DIR = '/usr/share/datasets/fashion-mnist'


def _input_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(
    {
      'dataset': 'cifar10',
      'image_size': -1,
      'data_dir': None,
      'num_train_examples': -1,
      'num_test_examples': -1,
      'augment': 'none',
      'crop_padding': 4,
      'shuffle_buffer': 1,
    }
  )
  config.update(overrides)
  return config


def _mock_datasets(num_examples: int, *, seed: int = 0, **overrides) -> data.Datasets:
  with tfds.testing.mock_data(num_examples=num_examples):
    return data.create_datasets(_input_config(**overrides), seed=seed)


def _mock_split(name: str, split: str, num_examples: int) -> dict[str, np.ndarray]:
  """The raw examples `tfds` serves under `mock_data`, in order."""
  with tfds.testing.mock_data(num_examples=num_examples):
    # Not `batch_size=-1`: under `mock_data` it batches by an unknown split size and aborts.
    ds = tfds.builder(name).as_dataset(split=split, shuffle_files=False)
    return next(iter(tfds.as_numpy(ds.batch(num_examples))))


def _unnormalise(images: np.ndarray, name: str) -> np.ndarray:
  mean, std = base.CHANNEL_STATS[name]
  return np.rint((images * np.array(std) + np.array(mean)) * 255).astype(np.uint8)


def _epoch_ids(datasets: data.Datasets, epoch: int, batch_size: int) -> np.ndarray:
  return np.concatenate([b['index'] for b in datasets.train_epoch(epoch, batch_size=batch_size)])


def _write_idx(path: str, array: np.ndarray) -> None:
  """Writes a gzipped IDX file with an unsigned-byte payload."""
  header = struct.pack('>BBBB', 0, 0, 0x08, array.ndim)
  header += struct.pack(f'>{array.ndim}I', *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def _parse_idx(path: str) -> np.ndarray:
  """Independent IDX parser for the unsigned-byte files of (Fashion-)MNIST."""
  with gzip.open(path, 'rb') as f:
    data = f.read()
  zero, type_code, num_dims = struct.unpack('>HBB', data[:4])
  assert (zero, type_code) == (0, 0x08)
  shape = struct.unpack(f'>{num_dims}I', data[4 : 4 + 4 * num_dims])
  return np.frombuffer(data[4 + 4 * num_dims :], dtype=np.uint8).reshape(shape)


@pytest.fixture
def offline(monkeypatch):
  """Makes every download host unreachable, as on a machine without internet."""

  def refuse(*args, **kwargs):
    raise OSError('network disabled in this test')

  monkeypatch.setattr(socket, 'create_connection', refuse)


@pytest.mark.parametrize('num_examples, batch_size', [(96, 8), (100, 8)])
def test_train_epoch_ids_are_a_permutation_minus_remainder(num_examples, batch_size):
  datasets = _mock_datasets(num_examples, augment='crop_flip')
  assert datasets.info.num_train == num_examples
  num_batches = num_examples // batch_size
  for epoch in (1, 2):
    batches = list(datasets.train_epoch(epoch, batch_size=batch_size))
    assert len(batches) == num_batches
    for batch in batches:
      assert batch['image'].shape == (batch_size, 32, 32, 3)
      assert batch['image'].dtype == np.float32
      assert batch['label'].dtype == np.int32
      assert batch['index'].dtype == np.int32
    ids = np.concatenate([b['index'] for b in batches])
    assert len(np.unique(ids)) == num_batches * batch_size
    assert set(ids.tolist()) <= set(range(num_examples))


def test_train_order_depends_only_on_seed_and_epoch():
  first = _mock_datasets(64, seed=3)
  again = _mock_datasets(64, seed=3)  # E.g. a resumed run.
  other_seed = _mock_datasets(64, seed=4)
  order = _epoch_ids(first, 1, 8)
  np.testing.assert_array_equal(_epoch_ids(first, 1, 8), order)
  np.testing.assert_array_equal(_epoch_ids(again, 1, 8), order)
  assert not np.array_equal(_epoch_ids(first, 2, 8), order)
  assert not np.array_equal(_epoch_ids(other_seed, 1, 8), order)
  # The batch size only regroups the same permutation.
  np.testing.assert_array_equal(_epoch_ids(first, 1, 16), order)


@pytest.mark.parametrize('num_train_examples', [-1, 20])
def test_image_at_index_is_that_example(num_train_examples):
  raw = _mock_split('cifar10', 'train', 50)
  datasets = _mock_datasets(50, num_train_examples=num_train_examples)
  expected_num = 50 if num_train_examples == -1 else num_train_examples
  assert datasets.info == data.DatasetInfo(
    name='cifar10', num_train=expected_num, num_test=50, num_classes=10, image_shape=(32, 32, 3)
  )
  for batch in datasets.train_epoch(1, batch_size=5):
    ids = batch['index']
    assert np.all(ids < expected_num)
    np.testing.assert_array_equal(_unnormalise(batch['image'], 'cifar10'), raw['image'][ids])
    np.testing.assert_array_equal(batch['label'], raw['label'][ids])


def _crop_flip_reference(padded: np.ndarray, *, flip: bool, dy: int, dx: int) -> np.ndarray:
  """The 32x32 crop at (dy, dx) of a zero-padded image, mirrored left-right if `flip`."""
  crop = padded[dy : dy + 32, dx : dx + 32]
  return crop[:, ::-1] if flip else crop


def test_crop_flip_is_a_shifted_mirror_fixed_by_seed_epoch_and_index():
  padding = 2
  raw = _mock_split('cifar10', 'train', 16)
  datasets = _mock_datasets(16, augment='crop_flip', crop_padding=padding)
  by_index = {}
  for batch in datasets.train_epoch(1, batch_size=4):
    for image, index in zip(_unnormalise(batch['image'], 'cifar10'), batch['index'], strict=True):
      by_index[int(index)] = image
  padded = np.pad(raw['image'], [(0, 0), (padding, padding), (padding, padding), (0, 0)])
  num_flipped = num_shifted = 0
  for index, image in by_index.items():
    candidates = [
      (flip, dy, dx)
      for flip in (False, True)
      for dy in range(2 * padding + 1)
      for dx in range(2 * padding + 1)
      if np.array_equal(image, _crop_flip_reference(padded[index], flip=flip, dy=dy, dx=dx))
    ]
    assert candidates, f'example {index} is not a crop/flip of its source'
    num_flipped += candidates[0][0]
    num_shifted += candidates[0][1:] != (padding, padding)
  assert 0 < num_flipped < len(by_index)
  assert num_shifted > 0
  # Same (seed, epoch, index) gives the same augmentation whatever the batch size.
  for batch in datasets.train_epoch(1, batch_size=8):
    for image, index in zip(_unnormalise(batch['image'], 'cifar10'), batch['index'], strict=True):
      np.testing.assert_array_equal(image, by_index[int(index)])
  epoch_2 = {}
  for batch in datasets.train_epoch(2, batch_size=4):
    for image, index in zip(_unnormalise(batch['image'], 'cifar10'), batch['index'], strict=True):
      epoch_2[int(index)] = image
  assert any(not np.array_equal(epoch_2[i], by_index[i]) for i in by_index)


def test_flip_only_mirrors():
  raw = _mock_split('cifar10', 'train', 16)
  datasets = _mock_datasets(16, augment='flip')
  flipped = 0
  for batch in datasets.train_epoch(1, batch_size=8):
    for image, index in zip(_unnormalise(batch['image'], 'cifar10'), batch['index'], strict=True):
      source = raw['image'][index]
      if np.array_equal(image, source[:, ::-1]):
        flipped += 1
      else:
        np.testing.assert_array_equal(image, source)
  assert 0 < flipped < 16


def test_test_batches_cover_every_example_once_with_mask():
  raw = _mock_split('cifar10', 'test', 10)
  datasets = _mock_datasets(10, augment='crop_flip')
  batches = list(datasets.test_batches(batch_size=4))
  assert len(batches) == 3
  for batch in batches:
    assert batch['image'].shape == (4, 32, 32, 3)
    assert batch['mask'].dtype == np.float32
  mask = np.concatenate([b['mask'] for b in batches])
  index = np.concatenate([b['index'] for b in batches])
  np.testing.assert_array_equal(mask, [1] * 10 + [0] * 2)
  assert mask.sum() == datasets.info.num_test
  np.testing.assert_array_equal(index, list(range(10)) + [-1, -1])
  images = np.concatenate([b['image'] for b in batches])
  np.testing.assert_array_equal(_unnormalise(images[:10], 'cifar10'), raw['image'])
  np.testing.assert_array_equal(images[10:], 0)
  labels = np.concatenate([b['label'] for b in batches])
  np.testing.assert_array_equal(labels[:10], raw['label'])


def test_too_many_requested_examples_name_the_field():
  with pytest.raises(ValueError, match='config.input.num_test_examples=11'):
    _mock_datasets(10, num_test_examples=11)


def test_missing_dataset_offline_raises_data_not_found(tmp_path, offline):
  data_dir = str(tmp_path / 'tfds')
  empty_idx_dir = tmp_path / 'no_idx'
  empty_idx_dir.mkdir()
  config = _input_config(dataset='mnist', data_dir=data_dir)
  with pytest.raises(data.DataNotFoundError) as error:
    data.create_datasets(config, seed=0, fashion_mnist_idx_dir=str(empty_idx_dir))
  message = str(error.value)
  assert "'mnist'" in message
  assert data_dir in message
  assert f'python -m saf_jax.tools.prepare_data --dataset=mnist --data_dir={data_dir}' in message
  assert isinstance(error.value, FileNotFoundError)


def test_missing_fashion_mnist_points_to_debian_package(tmp_path, offline):
  config = _input_config(dataset='fashion_mnist', data_dir=str(tmp_path))
  with pytest.raises(data.DataNotFoundError, match='apt-get install -y dataset-fash'):
    data.create_datasets(config, seed=0, fashion_mnist_idx_dir=str(tmp_path))


def test_failed_download_raises_data_not_found(tmp_path, monkeypatch):
  class _Connection:
    def close(self):
      pass

  def fail_download(self, *args, **kwargs):
    raise ConnectionError('connection reset')

  monkeypatch.setattr(socket, 'create_connection', lambda *args, **kwargs: _Connection())
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', fail_download)
  config = _input_config(dataset='cifar100', data_dir=str(tmp_path))
  with pytest.raises(data.DataNotFoundError, match='connection reset'):
    data.create_datasets(config, seed=0)


def _write_fashion_idx(idx_dir: str, rng: np.random.Generator, num_train: int, num_test: int):
  arrays = {}
  for prefix, n in (('train', num_train), ('t10k', num_test)):
    arrays[prefix] = (
      rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
      rng.integers(0, 10, size=(n,), dtype=np.uint8),
    )
    _write_idx(os.path.join(idx_dir, f'{prefix}-images-idx3-ubyte.gz'), arrays[prefix][0])
    _write_idx(os.path.join(idx_dir, f'{prefix}-labels-idx1-ubyte.gz'), arrays[prefix][1])
  return arrays


def test_fashion_mnist_is_built_from_idx_files_in_order(tmp_path):
  idx_dir = str(tmp_path / 'idx')
  os.mkdir(idx_dir)
  arrays = _write_fashion_idx(idx_dir, np.random.default_rng(0), num_train=12, num_test=5)
  config = _input_config(dataset='fashion_mnist', data_dir=str(tmp_path / 'tfds'))
  datasets = data.create_datasets(config, seed=0, fashion_mnist_idx_dir=idx_dir)
  assert (datasets.info.num_train, datasets.info.num_test) == (12, 5)
  # A plain TFDS builder now finds the stored dataset, in IDX order.
  builder = tfds.builder('fashion_mnist', data_dir=config.data_dir)
  assert builder.is_prepared()
  stored = tfds.as_numpy(builder.as_dataset(split='train', batch_size=-1))
  np.testing.assert_array_equal(stored['image'][..., 0], arrays['train'][0])
  np.testing.assert_array_equal(stored['label'], arrays['train'][1])
  test = next(datasets.test_batches(batch_size=5))
  np.testing.assert_array_equal(
    _unnormalise(test['image'], 'fashion_mnist')[..., 0], arrays['t10k'][0]
  )
  np.testing.assert_array_equal(test['label'], arrays['t10k'][1])
  # The first N examples keep their ids; asking for more than the split holds names the field.
  config.num_train_examples = 4
  first_four = data.create_datasets(config, seed=0, fashion_mnist_idx_dir=idx_dir)
  batch = next(first_four.train_epoch(1, batch_size=4))
  np.testing.assert_array_equal(
    _unnormalise(batch['image'], 'fashion_mnist')[..., 0], arrays['train'][0][batch['index']]
  )
  np.testing.assert_array_equal(np.sort(batch['index']), np.arange(4))
  config.num_train_examples = 13
  with pytest.raises(ValueError, match='config.input.num_train_examples=13 .* has only 12'):
    data.create_datasets(config, seed=0, fashion_mnist_idx_dir=idx_dir)


def test_corrupt_idx_file_is_rejected(tmp_path):
  idx_dir = str(tmp_path)
  _write_fashion_idx(idx_dir, np.random.default_rng(0), num_train=3, num_test=2)
  with gzip.open(os.path.join(idx_dir, 'train-images-idx3-ubyte.gz'), 'ab') as f:
    f.write(b'\x00')  # One byte more than the header's dims allow.
  config = _input_config(dataset='fashion_mnist', data_dir=str(tmp_path / 'tfds'))
  with pytest.raises(ValueError, match='IDX header says shape'):
    data.create_datasets(config, seed=0, fashion_mnist_idx_dir=idx_dir)


def test_real_fashion_mnist_from_debian_files(fashion_mnist_data_dir):
  """Builds the real dataset (~20 s, once per session) and checks it against the IDX files.

  The `fashion_mnist_data_dir` fixture (conftest.py) is an empty temporary data_dir shared by the
  session, and skips the test when Debian's files are missing.
  """
  config = _input_config(dataset='fashion_mnist', data_dir=fashion_mnist_data_dir)
  datasets = data.create_datasets(config, seed=0)
  assert datasets.info == data.DatasetInfo(
    name='fashion_mnist', num_train=60000, num_test=10000, num_classes=10, image_shape=(28, 28, 1)
  )
  train_images = _parse_idx(os.path.join(_DEBIAN_IDX_DIR, 'train-images-idx3-ubyte.gz'))
  train_labels = _parse_idx(os.path.join(_DEBIAN_IDX_DIR, 'train-labels-idx1-ubyte.gz'))
  test_images = _parse_idx(os.path.join(_DEBIAN_IDX_DIR, 't10k-images-idx3-ubyte.gz'))
  test_labels = _parse_idx(os.path.join(_DEBIAN_IDX_DIR, 't10k-labels-idx1-ubyte.gz'))
  seen = np.zeros(60000, dtype=bool)
  for batch in datasets.train_epoch(1, batch_size=1000):
    ids = batch['index']
    seen[ids] = True
    np.testing.assert_array_equal(
      _unnormalise(batch['image'], 'fashion_mnist')[..., 0], train_images[ids]
    )
    np.testing.assert_array_equal(batch['label'], train_labels[ids])
  assert seen.all()
  first = next(datasets.test_batches(batch_size=8))
  np.testing.assert_array_equal(
    _unnormalise(first['image'], 'fashion_mnist')[..., 0], test_images[:8]
  )
  np.testing.assert_array_equal(first['label'], test_labels[:8])


def _subset_ids(datasets: data.Datasets, **kwargs) -> np.ndarray:
  return np.concatenate([b['index'] for b in datasets.train_subset_batches(**kwargs)])


def test_train_subset_batches_are_distinct_unaugmented_examples():
  raw = _mock_split('cifar10', 'train', 40)
  # 'flip' mirrors about half of the training batches; the subset must stay as stored.
  datasets = _mock_datasets(40, augment='flip')
  batches = list(datasets.train_subset_batches(num_batches=3, batch_size=8, seed=5))
  assert len(batches) == 3
  for batch in batches:
    assert batch['image'].shape == (8, 32, 32, 3)
    assert batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32
    assert batch['index'].dtype == np.int32
    ids = batch['index']
    np.testing.assert_array_equal(_unnormalise(batch['image'], 'cifar10'), raw['image'][ids])
    np.testing.assert_array_equal(batch['label'], raw['label'][ids])
  ids = np.concatenate([b['index'] for b in batches])
  assert len(np.unique(ids)) == 24
  assert set(ids.tolist()) <= set(range(40))
  # Not the first examples in order: a random subset.
  assert not np.array_equal(np.sort(ids), np.arange(24))
  # The same ids in a training epoch are flipped (so the comparison above can fail).
  epoch = {}
  for batch in datasets.train_epoch(1, batch_size=8):
    for image, index in zip(_unnormalise(batch['image'], 'cifar10'), batch['index'], strict=True):
      epoch[int(index)] = image
  assert any(not np.array_equal(epoch[i], raw['image'][i]) for i in ids if i in epoch)


def test_train_subset_depends_only_on_its_own_seed():
  first = _mock_datasets(64, seed=0)
  other_run = _mock_datasets(64, seed=7, augment='crop_flip')  # Another run's seed.
  ids = _subset_ids(first, num_batches=4, batch_size=8, seed=3)
  np.testing.assert_array_equal(_subset_ids(other_run, num_batches=4, batch_size=8, seed=3), ids)
  np.testing.assert_array_equal(_subset_ids(first, num_batches=4, batch_size=8, seed=3), ids)
  assert not np.array_equal(_subset_ids(first, num_batches=4, batch_size=8, seed=4), ids)
  # The first ids of one permutation: fewer batches, or another grouping, give a prefix.
  np.testing.assert_array_equal(_subset_ids(first, num_batches=2, batch_size=8, seed=3), ids[:16])
  np.testing.assert_array_equal(_subset_ids(first, num_batches=8, batch_size=4, seed=3), ids)
  # Nor is it the training order of the epoch (seeded by the run's seed).
  assert not np.array_equal(_epoch_ids(first, 1, 8)[:32], ids)


@pytest.mark.parametrize(
  'num_batches, batch_size',
  [(0, 8), (-1, 8), (2, 0), (5, 8), (1, 33)],
)
def test_train_subset_out_of_range_is_refused(num_batches, batch_size):
  datasets = _mock_datasets(32)
  with pytest.raises(ValueError, match=r'at most num_train=32 examples'):
    datasets.train_subset_batches(num_batches=num_batches, batch_size=batch_size, seed=0)


def test_train_subset_can_be_the_whole_split():
  datasets = _mock_datasets(32)
  ids = _subset_ids(datasets, num_batches=4, batch_size=8, seed=0)
  np.testing.assert_array_equal(np.sort(ids), np.arange(32))


@pytest.mark.parametrize(
  'field, value, match',
  [
    ('augment', 'autoaugment', r"augment must be one of \['none', 'flip', 'crop_flip'\] for"),
    ('dataset', 'svhn_cropped', r"dataset must be one of \['cifar10', "),
    ('crop_padding', -1, r'crop_padding must be an integer >= 0 \(pixels\), got -1\.'),
    ('shuffle_buffer', 0, r'shuffle_buffer must be an integer >= 1 \(examples\), got 0\.'),
  ],
)
def test_create_datasets_refuses_bad_input_before_reading_anything(field, value, match):
  """The same rules as validate_config (data.INPUT_RULES), for callers of the data API."""
  with pytest.raises(ValueError, match=f'config.input.{match}'):
    data.create_datasets(_input_config(**{field: value}, data_dir='/nonexistent'), seed=0)

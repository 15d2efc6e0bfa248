"""The streamed ImageNet pipeline, on a tiny ``imagenet2012`` built the way TFDS documents.

The fixture writes a manual download of a few JPEGs in ImageNet's own archive layout
(``ILSVRC2012_img_train.tar`` of per-class tars, ``ILSVRC2012_img_val.tar``) and lets TFDS's
real ``imagenet2012`` builder prepare it in several shards, so ids, shards, slices and
JPEG crops are exercised as on the real dataset.
"""

import io
import json
import os
import statistics
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import default
from saf_jax import data, train
from saf_jax.data import partition, streamed, streamed_ops
from tests import conftest

_CLASSES = ('n01440764', 'n01443537', 'n01484850', 'n01491361')
_PER_CLASS = 6  # 24 train examples.
_NUM_VAL = 7
_TRAIN_SHARDS = 4


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _jpeg(rng: np.random.Generator) -> bytes:
  shape = (int(rng.integers(24, 64)), int(rng.integers(24, 64)), 3)
  # Smooth images, so that crops of different windows differ clearly.
  image = np.cumsum(rng.integers(0, 9, shape), axis=1).clip(0, 255).astype(np.uint8)
  return tf.io.encode_jpeg(image, quality=95).numpy()


def _write_manual_download(manual) -> None:
  """ImageNet's two archives, in its own layout, with _CLASSES x _PER_CLASS + _NUM_VAL JPEGs."""
  os.makedirs(manual, exist_ok=True)
  rng = np.random.default_rng(0)
  with tarfile.open(os.path.join(manual, 'ILSVRC2012_img_train.tar'), 'w') as outer:
    for synset in _CLASSES:
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode='w') as inner:
        for i in range(_PER_CLASS):
          _add(inner, f'{synset}_{i}.JPEG', _jpeg(rng))
      _add(outer, f'{synset}.tar', inner_bytes.getvalue())
  with tarfile.open(os.path.join(manual, 'ILSVRC2012_img_val.tar'), 'w') as val:
    for i in range(_NUM_VAL):
      _add(val, f'ILSVRC2012_val_{i + 1:08d}.JPEG', _jpeg(rng))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('imagenet')
  _write_manual_download(root / 'manual')
  data = str(root / 'tfds')
  tfds.builder('imagenet2012', data_dir=data).download_and_prepare(
    download_config=tfds.download.DownloadConfig(
      manual_dir=str(root / 'manual'), num_shards=_TRAIN_SHARDS
    )
  )
  return data


def _input(data_dir, **overrides):
  config = default.get_config()
  config.input.dataset = 'imagenet2012'
  config.input.data_dir = data_dir
  config.input.augment = 'inception_crop'
  config.input.image_size = 16
  config.input.shuffle_buffer = 8
  config.input.update(overrides)
  return config


def _tfds_order(data_dir, split):
  """(label, file name) of each example of ``split``, read in TFDS order."""
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  ds = builder.as_dataset(
    split=split, shuffle_files=False, read_config=tfds.ReadConfig(interleave_cycle_length=1)
  )
  return [(int(ex['label']), ex['file_name'].decode()) for ex in ds.as_numpy_iterator()]


def _epoch(datasets, epoch, **kwargs):
  batches = list(datasets.train_epoch(epoch, **kwargs))
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_ids_are_positions_in_tfds_order(data_dir):
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  lengths = builder.info.splits['train'].shard_lengths
  assert len(lengths) == _TRAIN_SHARDS and sum(lengths) == len(_CLASSES) * _PER_CLASS
  offsets = tf.constant(np.concatenate([[0], np.cumsum(lengths)[:-1]]), tf.int64)
  # Read the files in a shuffled order: the ids still give each example's TFDS position.
  ds = builder.as_dataset(
    split='train',
    shuffle_files=True,
    read_config=tfds.ReadConfig(add_tfds_id=True, shuffle_seed=1, interleave_cycle_length=1),
  )
  names = [name for _, name in _tfds_order(data_dir, 'train')]
  read = [(ex['file_name'].decode(), ex['tfds_id']) for ex in ds.as_numpy_iterator()]
  assert [name for name, _ in read] != names  # Really read out of order.
  for name, tfds_id in read:
    assert names[int(streamed_ops.dense_ids(tf.constant(tfds_id), offsets))] == name


def test_epoch_covers_each_id_once_in_a_replayable_order(data_dir):
  datasets = data.create_datasets(_input(data_dir).input, seed=0)
  assert isinstance(datasets, streamed.StreamedDatasets)
  assert datasets.info.num_train == 24 and datasets.info.num_test == _NUM_VAL
  assert datasets.info.num_classes == 1000 and datasets.info.image_shape == (16, 16, 3)
  labels = [label for label, _ in _tfds_order(data_dir, 'train')]
  first = _epoch(datasets, 1, batch_size=5)  # 4 batches; 4 of the 24 ids dropped.
  assert len(first['index']) == 20 and len(set(first['index'])) == 20
  assert set(first['index']) <= set(range(24))
  np.testing.assert_array_equal(first['label'], np.asarray(labels)[first['index']])
  assert first['image'].shape == (20, 16, 16, 3) and first['image'].dtype == np.float32
  again = _epoch(datasets, 1, batch_size=5)
  for key in first:
    np.testing.assert_array_equal(again[key], first[key])
  second = _epoch(datasets, 2, batch_size=5)
  assert list(second['index']) != list(first['index'])
  resumed = _epoch(datasets, 1, batch_size=5, start_batch=2)
  for key in first:
    np.testing.assert_array_equal(resumed[key], first[key][10:])


def test_examples_are_shuffled_across_files_whatever_the_global_seed(data_dir):
  # One-example windows keep the file order: each of the 4 files (6 ids each) is read whole.
  config = _input(data_dir, shuffle_buffer=1)
  files = _epoch(data.create_datasets(config.input, seed=0), 1, batch_size=4)
  runs = files['index'].reshape(4, 6)
  assert sorted(map(tuple, runs)) == [tuple(range(k * 6, k * 6 + 6)) for k in range(4)]
  # Windows of 24 mix them.
  config.input.shuffle_buffer = 24
  datasets = data.create_datasets(config.input, seed=0)
  mixed = _epoch(datasets, 1, batch_size=4)
  assert sorted(mixed['index']) == list(range(24))
  assert any(len(set(run // 6)) > 1 for run in mixed['index'].reshape(4, 6))
  tf.random.set_seed(123)  # tf.data's stateful shuffles would change with it.
  try:
    again = _epoch(datasets, 1, batch_size=4)
  finally:
    tf.random.set_seed(None)
  np.testing.assert_array_equal(again['index'], mixed['index'])
  np.testing.assert_array_equal(again['image'], mixed['image'])


def test_window_shuffle_permutes_each_window_by_its_seed():
  ds = tf.data.Dataset.range(10).map(lambda i: {'a': i, 'b': 2 * i})
  out = list(streamed_ops.window_shuffle(ds, 4, [7]).as_numpy_iterator())
  a = [x['a'] for x in out]
  assert [x['b'] for x in out] == [2 * x for x in a]  # Fields stay together.
  assert sorted(a[:4]) == [0, 1, 2, 3] and sorted(a[4:8]) == [4, 5, 6, 7]
  assert sorted(a[8:]) == [8, 9] and a != list(range(10))
  again = [x['a'] for x in streamed_ops.window_shuffle(ds, 4, [7]).as_numpy_iterator()]
  other = [x['a'] for x in streamed_ops.window_shuffle(ds, 4, [8]).as_numpy_iterator()]
  assert again == a and other != a
  assert [x['a'] for x in streamed_ops.window_shuffle(ds, 1, [7]).as_numpy_iterator()] == list(
    range(10)
  )


def test_crop_windows():
  shape = tf.constant([300, 400, 3], tf.int32)
  boxes = np.stack(
    [
      streamed_ops.inception_crop_window(shape, tf.constant([s, 1], tf.int64)).numpy()
      for s in range(300)
    ]
  )
  top, left, height, width = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + height <= 300).all() and (left + width <= 400).all()
  area = height * width / (300 * 400)
  whole = area == 1
  assert (area[~whole] >= 0.08 - 0.01).all()
  aspect = width[~whole] / height[~whole]
  assert (aspect >= 3 / 4 - 0.02).all() and (aspect <= 4 / 3 + 0.02).all()
  assert area.min() < 0.15 and np.median(area) < 0.7  # Spread over the range.
  # Evaluation: "resize to 256, center-crop 224" for a 256 x 341 image is this window.
  np.testing.assert_array_equal(
    streamed_ops.center_crop_window(tf.constant([256, 341, 3]), 224), [16, 59, 224, 224]
  )
  np.testing.assert_array_equal(
    streamed_ops.center_crop_window(tf.constant([60, 40, 3]), 16), [24, 14, 13, 13]
  )


def test_inception_flip_mirrors_left_right(data_dir, monkeypatch):
  # With the whole image as the only allowed box, each output is the resized image or its
  # left-right mirror.
  monkeypatch.setattr(streamed_ops, '_AREA_RANGE', (1.0, 1.0))
  config = _input(data_dir, num_train_examples=12)
  crops = _epoch(data.create_datasets(config.input, seed=0), 1, batch_size=4)
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  ds = builder.as_dataset(
    split='train[:12]', shuffle_files=False, read_config=tfds.ReadConfig(interleave_cycle_length=1)
  )
  spec = streamed.SPECS['imagenet2012']
  whole = [
    (tf.image.resize(ex['image'], [16, 16], method='bilinear').numpy() / 255.0 - spec.mean)
    / spec.std
    for ex in ds.as_numpy_iterator()
  ]
  flipped = 0
  for image, i in zip(crops['image'], crops['index'], strict=True):
    if np.allclose(image, whole[i], atol=1e-5):
      continue
    np.testing.assert_allclose(image, whole[i][:, ::-1], atol=1e-5)
    flipped += 1
  assert 0 < flipped < len(crops['index'])


def test_processes_read_their_table_rows_and_augment_alike(data_dir):
  datasets = data.create_datasets(_input(data_dir).input, seed=0)
  whole = _epoch(datasets, 1, batch_size=4)
  seen = []
  for p in range(3):
    part = _epoch(datasets, 1, batch_size=2, process_index=p, process_count=3)
    first, num = partition.process_partition(24, p, 3)
    assert sorted(part['index']) == list(range(first, first + num))
    seen += list(part['index'])
    # An example's crop and flip depend on (seed, epoch, id), not on who reads it or where.
    for row, i in enumerate(part['index']):
      (at,) = np.flatnonzero(whole['index'] == i)
      np.testing.assert_array_equal(part['image'][row], whole['image'][at])
  assert sorted(seen) == list(range(24))


def test_inception_crops_vary_and_evaluation_is_the_center_crop(data_dir):
  config = _input(data_dir)
  crops = data.create_datasets(config.input, seed=0)
  config.input.augment = 'none'
  plain = data.create_datasets(config.input, seed=0)
  epoch1, epoch2 = _epoch(crops, 1, batch_size=4), _epoch(crops, 2, batch_size=4)
  centre = _epoch(plain, 1, batch_size=4)
  order1, order2 = np.argsort(epoch1['index']), np.argsort(epoch2['index'])
  differs = np.abs(epoch1['image'][order1] - epoch2['image'][order2]).mean(axis=(1, 2, 3)) > 0.05
  assert differs.mean() > 0.8  # A new crop per epoch for nearly every example.
  assert not np.allclose(epoch1['image'][order1], centre['image'][np.argsort(centre['index'])])

  # The evaluation crop, computed independently: decode, take the center square of 16/48
  # of the shorter side, resize to 16 px, normalise.
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  ds = builder.as_dataset(
    split='validation', shuffle_files=False, read_config=tfds.ReadConfig(interleave_cycle_length=1)
  )
  mean, std = streamed.SPECS['imagenet2012'].mean, streamed.SPECS['imagenet2012'].std
  expected = []
  for ex in ds.as_numpy_iterator():
    height, width, _ = ex['image'].shape
    side = int(16 / 48 * min(height, width))
    top, left = (height - side + 1) // 2, (width - side + 1) // 2
    crop = ex['image'][top : top + side, left : left + side]
    resized = tf.image.resize(crop, [16, 16], method='bilinear').numpy()
    expected.append((resized / 255.0 - mean) / std)
  batches = list(crops.test_batches(batch_size=4))
  images = np.concatenate([b['image'] for b in batches])[:_NUM_VAL]
  # Decoding only the window (decode_and_crop_jpeg) upsamples chroma at its edge a little
  # differently: up to 3 pixel levels on a few edge pixels, equal elsewhere.
  error = np.abs(images - np.stack(expected)) * np.asarray(std) * 255
  assert error.max() < 3 and np.mean(error > 1e-3) < 0.05


def test_test_batches_split_over_processes_cover_validation_once(data_dir):
  datasets = data.create_datasets(_input(data_dir).input, seed=0)
  labels = [label for label, _ in _tfds_order(data_dir, 'validation')]
  per_process = [
    list(datasets.test_batches(batch_size=2, process_index=p, process_count=3)) for p in range(3)
  ]
  # ceil(ceil(7 / 3) / 2) = 2 batches on every process, padding marked by mask and index -1.
  assert [len(b) for b in per_process] == [2, 2, 2]
  ids, got_labels = [], []
  for batches in per_process:
    for b in batches:
      real = b['mask'] == 1
      np.testing.assert_array_equal(b['index'][~real], -1)
      ids += list(b['index'][real])
      got_labels += list(b['label'][real])
  assert sorted(ids) == list(range(_NUM_VAL))
  np.testing.assert_array_equal(got_labels, np.asarray(labels)[ids])


def test_subset_is_fixed_by_its_seed_alone(data_dir):
  config = _input(data_dir)
  a = data.create_datasets(config.input, seed=0)
  b = data.create_datasets(config.input, seed=5)
  first = [x['index'] for x in a.train_subset_batches(num_batches=2, batch_size=3, seed=1)]
  again = [x['index'] for x in b.train_subset_batches(num_batches=2, batch_size=3, seed=1)]
  np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
  other = [x['index'] for x in a.train_subset_batches(num_batches=2, batch_size=3, seed=4)]
  assert list(np.concatenate(other)) != list(np.concatenate(first))


def test_a_negative_seed_works(data_dir):
  datasets = data.create_datasets(_input(data_dir).input, seed=-3)
  assert sorted(_epoch(datasets, 1, batch_size=4)['index']) == list(range(24))


def test_first_n_examples_and_bad_sizes(data_dir):
  small = data.create_datasets(_input(data_dir, num_train_examples=10).input, seed=0)
  assert small.info.num_train == 10
  assert set(_epoch(small, 1, batch_size=5)['index']) == set(range(10))
  with pytest.raises(ValueError, match='num_train_examples=25 but the train split'):
    data.create_datasets(_input(data_dir, num_train_examples=25).input, seed=0)
  match = r"augment must be one of \['inception_crop', 'none'\] for dataset 'imagenet2012'"
  with pytest.raises(ValueError, match=match):
    data.create_datasets(_input(data_dir, augment='crop_flip').input, seed=0)


def test_missing_imagenet_says_where_the_manual_download_goes(tmp_path):
  config = _input(str(tmp_path))
  with pytest.raises(data.DataNotFoundError) as e:
    data.create_datasets(config.input, seed=0)
  manual = os.path.join(str(tmp_path), 'downloads', 'manual')
  assert 'ILSVRC2012_img_train.tar' in str(e.value) and manual in str(e.value)
  command = f'python -m saf_jax.tools.prepare_data --dataset=imagenet2012 --data_dir={tmp_path}'
  assert command in str(e.value)
  # With the archives there, several processes refuse to race to prepare it.
  _write_manual_download(manual)
  with pytest.raises(data.DataNotFoundError, match='Prepare it once before a multi'):
    data.create_datasets(config.input, seed=0, process_count=2)
  # The command prepares it offline (image-net.org is not reachable from CI), in TFDS
  # order; then training reads it.
  proc = subprocess.run(
    [sys.executable, '-m', 'saf_jax.tools.prepare_data', *command.split()[3:]],
    capture_output=True,
    text=True,
    cwd=conftest.REPO_ROOT,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'imagenet2012 train: 24 examples' in proc.stdout
  assert 'imagenet2012 validation: 7 examples' in proc.stdout
  datasets = data.create_datasets(config.input, seed=0)
  assert (datasets.info.num_train, datasets.info.num_test) == (24, _NUM_VAL)


def test_saf_trains_on_streamed_imagenet(data_dir, tmp_path):
  config = _input(data_dir)
  config.num_epochs = 3
  config.input.batch_size = 8
  config.input.eval_batch_size = 4
  config.model.width = 4
  config.method.saf.E_start = 1
  config.method.saf.E_tilde = 1
  config.analysis.sharpness_every_epochs = 0
  record = train.train_and_evaluate(config, str(tmp_path / 'run')).record
  assert record['step'] == 3 * 3 and record['train/trajectory_active'] == 1
  # Epoch 3's targets are epoch 2's logits of the same ids: a positive, finite KL.
  assert 0 < record['train/trajectory_loss'] < 10


def test_input_only_benchmark_reads_the_batches_it_times(data_dir):
  def benchmark(steps):
    return subprocess.run(
      [
        sys.executable,
        '-m',
        'saf_jax.tools.benchmark',
        '--config=configs/imagenet.py:smoke',
        '--input_only',
        f'--config.input.data_dir={data_dir}',
        '--config.input.batch_size=5',
        '--config.input.num_train_examples=-1',
        '--rounds=2',
        f'--steps={steps}',
      ],
      capture_output=True,
      text=True,
      cwd=conftest.REPO_ROOT,
      check=False,
    )

  proc = benchmark(3)
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = json.loads(proc.stdout.splitlines()[0])
  assert row['images_per_round'] == [15, 15] and len(row['rounds']) == 2
  assert abs(row['input_pipeline_images_per_sec'] - statistics.median(row['rounds'])) <= 0.1
  proc = benchmark(5)
  assert proc.returncode != 0
  assert '--steps=5 batches of 5 exceed the 24 training examples' in proc.stderr

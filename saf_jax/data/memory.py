"""Datasets held in memory: TFDS splits (Fashion-MNIST, CIFAR) and image folders.

The uint8 splits are decoded once into host memory; every epoch's order and augmentation
are drawn from ``(seed, epoch, id)`` with stateless TF random ops (see ``saf_jax.data``).
"""

import os
from collections.abc import Iterator, Mapping

import ml_collections
import numpy as np
from absl import logging

from saf_jax.data import base, batching, folder, partition, tfds_prep
from saf_jax.data.tf_runtime import tf, tfds

# Stream ids folded into the (seed, epoch) key, one per use of randomness.
_PERMUTATION_STREAM = 0
_FLIP_STREAM = 1
_CROP_STREAM = 2
_SUBSET_STREAM = 3  # train_subset_batches (keyed by (seed, 0), not by an epoch).


class InMemoryDatasets:
  """In-memory train and test splits with per-epoch deterministic batching.

  Build with :func:`create_datasets`.

  Attributes:
    info: sizes and shapes of the splits.
    augment: one of ``AUGMENTATIONS``, applied to train batches only.
    crop_padding: zero pixels added on each side before a random crop (``'crop_flip'``).
    seed: seed of the train order and augmentation.
    mean, std: tuples (length C) of the normalisation ``(x / 255 - mean) / std`` per channel.
  """

  def __init__(
    self,
    *,
    info: base.DatasetInfo,
    train: Mapping[str, np.ndarray],
    test: Mapping[str, np.ndarray],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: str,
    crop_padding: int,
    seed: int,
  ):
    """Holds the splits as TF tensors on the host.

    Args:
      info: sizes and shapes of the splits.
      train: ``'image'`` uint8 [num_train, H, W, C] and ``'label'`` int32 [num_train], in
        TFDS order.
      test: the same for the test split.
      mean: per-channel pixel mean, in [0, 1] units, length C.
      std: per-channel pixel standard deviation, in [0, 1] units, length C.
      augment: one of ``AUGMENTATIONS``.
      crop_padding: pixels of zero padding per side for ``'crop_flip'``.
      seed: seed of the train order and augmentation.
    """
    self.info = info
    self.augment = augment
    self.crop_padding = crop_padding
    self.seed = seed
    self.mean = tuple(float(m) for m in mean)
    self.std = tuple(float(s) for s in std)
    with tf.device('/cpu:0'):
      self._train_images = tf.constant(train['image'])
      self._train_labels = tf.constant(train['label'], dtype=tf.int32)
      self._test_images = tf.constant(test['image'])
      self._test_labels = tf.constant(test['label'], dtype=tf.int32)
    self._mean = tf.constant(mean, dtype=tf.float32)
    self._std = tf.constant(std, dtype=tf.float32)

  def train_arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """A copy of the train split, indexed by id: uint8 [num_train, H, W, C], int32 [num_train]."""
    return self._train_images.numpy(), self._train_labels.numpy()

  def epoch_plan(
    self,
    epoch: int,
    *,
    batch_size: int,
    start_batch: int = 0,
    process_index: int = 0,
    process_count: int = 1,
  ) -> dict[str, np.ndarray]:
    """The ids and augmentation draws of one process's train batches of an epoch.

    Process ``p`` of ``P`` reads only its fixed partition of the ids,
    ``partition.process_partition(num_train, p, P)``, in every epoch, in an order that is a
    permutation of that partition fixed by ``(seed, epoch, p)`` (by ``(seed, epoch)`` when
    ``P = 1``: then the partition is every id). The last ``partition size % batch_size``
    ids of the permutation are dropped. Flips and crop offsets are looked up by id in tables
    of the epoch: they depend only on ``(seed, epoch, id)`` (and ``p`` when ``P > 1``). All
    come from stateless TF random ops on the host: the same arguments give the same plan.

    Args:
      epoch: epoch number, counting from 1.
      batch_size: examples per batch of this process (the global batch over ``P``).
      start_batch: batches of the epoch to skip (already trained before a resume).
      process_index: this process, in ``[0, process_count)``.
      process_count: number of processes ``P`` feeding one global batch.

    Returns:
      With ``n = partition size // batch_size - start_batch`` batches: ``'index'`` int32
      [n, batch_size], the ids of each batch in order; ``'flip'`` bool [n, batch_size],
      whether to mirror the example left-right (all False for ``'none'``); ``'offset'``
      int32 [n, batch_size, 2], the top-left (row, column) of its crop in the image padded
      with ``crop_padding`` zero pixels per side, each in ``[0, 2 * crop_padding]`` (all 0
      unless ``'crop_flip'``).

    Raises:
      ValueError: if ``epoch < 1``, ``batch_size`` is not in ``[1, partition size]`` or
        ``start_batch`` is not in ``[0, batches per epoch]``.
    """
    first_id, num_ids, num_batches = partition.epoch_partition(
      self.info.num_train, epoch, batch_size, start_batch, process_index, process_count
    )
    num_train = self.info.num_train
    epoch_key = tf.constant([self.seed, epoch], dtype=tf.int64)
    if process_count > 1:
      epoch_key = tf.random.experimental.stateless_fold_in(epoch_key, process_index, alg='philox')

    def key(stream: int) -> tf.Tensor:
      return tf.random.experimental.stateless_fold_in(epoch_key, stream, alg='philox')

    ids = tf.random.experimental.stateless_shuffle(
      tf.range(first_id, first_id + num_ids, dtype=tf.int32),
      seed=key(_PERMUTATION_STREAM),
      alg='philox',
    )[start_batch * batch_size : num_batches * batch_size]
    # Per-id augmentation tables, so an example's augmentation depends on (seed, epoch, id).
    flip_table = tf.zeros([num_train], dtype=tf.bool)
    offset_table = tf.zeros([num_train, 2], dtype=tf.int32)
    if self.augment in ('flip', 'crop_flip'):
      uniform = tf.random.stateless_uniform([num_train], seed=key(_FLIP_STREAM), alg='philox')
      flip_table = uniform < 0.5
    if self.augment == 'crop_flip':  # Offsets uniform in [0, 2 * crop_padding].
      maxval = 2 * self.crop_padding + 1
      offset_table = tf.random.stateless_uniform(
        [num_train, 2], seed=key(_CROP_STREAM), maxval=maxval, dtype=tf.int32, alg='philox'
      )
    shape = [num_batches - start_batch, batch_size]
    return {
      'index': np.reshape(ids.numpy(), shape),
      'flip': np.reshape(tf.gather(flip_table, ids).numpy(), shape),
      'offset': np.reshape(tf.gather(offset_table, ids).numpy(), [*shape, 2]),
    }

  def train_epoch(
    self,
    epoch: int,
    *,
    batch_size: int,
    start_batch: int = 0,
    process_index: int = 0,
    process_count: int = 1,
  ) -> Iterator[dict[str, np.ndarray]]:
    """Iterates over one epoch of shuffled, augmented train batches of one process.

    The batches of :meth:`epoch_plan` (same arguments: same ids, flips and crops), gathered,
    cropped, flipped and normalised on the host. The same arguments give the same batches,
    so a resumed run can replay any epoch, or continue it from ``start_batch``.

    Args:
      epoch, batch_size, start_batch, process_index, process_count: as :meth:`epoch_plan`.

    Returns:
      An iterator over ``partition size // batch_size - start_batch`` dicts: ``'image'``
      float32 [batch_size, H, W, C] normalised by the dataset's channel mean and std,
      ``'label'`` int32 [batch_size], ``'index'`` int32 [batch_size], each example's id.

    Raises:
      ValueError: as :meth:`epoch_plan`.
    """
    plan = self.epoch_plan(
      epoch,
      batch_size=batch_size,
      start_batch=start_batch,
      process_index=process_index,
      process_count=process_count,
    )
    padding = self.crop_padding if self.augment == 'crop_flip' else 0

    def make_batch(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      images = tf.gather(self._train_images, batch['index'])  # uint8 [B, H, W, C]
      if self.augment != 'none':
        images = _crop_and_flip(images, batch['flip'], batch['offset'], padding)
      return {
        'image': self._normalise(images),
        'label': tf.gather(self._train_labels, batch['index']),
        'index': batch['index'],
      }

    return batching.numpy_batches(tf.data.Dataset.from_tensor_slices(plan), make_batch)

  def train_subset_batches(
    self, *, num_batches: int, batch_size: int, seed: int
  ) -> Iterator[dict[str, np.ndarray]]:
    """A fixed random subset of the train split, unaugmented, for measurements.

    The subset is the first ``num_batches * batch_size`` ids of a permutation fixed by
    ``seed`` alone (not by ``self.seed``), so runs of different methods and seeds are
    measured on the same examples. Used by the sharpness, Hessian and loss-landscape tools
    (``saf_jax.analysis.sharpness``, ``saf_jax.analysis.landscape``).

    Args:
      num_batches: number of batches, >= 1.
      batch_size: examples per batch.
      seed: picks the subset.

    Returns:
      An iterator over ``num_batches`` dicts like :meth:`train_epoch`'s, without
      augmentation: ``'image'`` float32 [batch_size, H, W, C] normalised, ``'label'`` and
      ``'index'`` int32 [batch_size].

    Raises:
      ValueError: if ``num_batches < 1``, ``batch_size < 1`` or the subset is larger than
        the train split.
    """
    num_train = self.info.num_train
    partition.check_subset(num_batches, batch_size, num_train)
    key = tf.random.experimental.stateless_fold_in(
      tf.constant([seed, 0], dtype=tf.int64), _SUBSET_STREAM, alg='philox'
    )
    ids = tf.random.experimental.stateless_shuffle(
      tf.range(num_train, dtype=tf.int32), seed=key, alg='philox'
    )[: num_batches * batch_size]

    def make_batch(batch_ids: tf.Tensor) -> dict[str, tf.Tensor]:
      return {
        'image': self._normalise(tf.gather(self._train_images, batch_ids)),
        'label': tf.gather(self._train_labels, batch_ids),
        'index': batch_ids,
      }

    ds = tf.data.Dataset.from_tensor_slices(ids).batch(batch_size, drop_remainder=True)
    return batching.numpy_batches(ds, make_batch)

  def test_batches(
    self,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    split: str = 'test',
  ) -> Iterator[dict[str, np.ndarray]]:
    """Iterates once, in order and without augmentation, over this process's test examples.

    With ``split='train'``, the same over the training split: every training example once,
    unaugmented (``config.eval.train_accuracy``: how well the model fits what it trains on).

    The test split is cut into ``process_count`` contiguous blocks whose sizes differ by at
    most one; process ``p`` reads block ``p``. Every process yields the same number of
    batches, ``ceil(ceil(num_test / P) / batch_size)``, padding its last ones, so that
    together they form global batches that cover each test example exactly once.

    Args:
      batch_size: examples per batch of this process; the last batch is padded up to it.
      process_index: this process, in ``[0, process_count)``.
      process_count: number of processes ``P``.

    Returns:
      An iterator of dicts: ``'image'`` float32 [batch_size, H, W, C] normalised,
      ``'label'`` int32 [batch_size], ``'index'`` int32 [batch_size] (test ids), ``'mask'``
      float32 [batch_size], 1 for real examples and 0 for padding. Padding rows have image
      0, label 0 and index -1.

    Raises:
      ValueError: if ``batch_size < 1`` or ``split`` is not 'test' or 'train'.
    """
    if batch_size < 1:
      raise ValueError(f'batch_size must be positive, got {batch_size}.')
    if split not in ('test', 'train'):
      raise ValueError(f"split must be 'test' or 'train', got {split!r}.")
    images, labels = (
      (self._test_images, self._test_labels)
      if split == 'test'
      else (self._train_images, self._train_labels)
    )
    height, width, channels = self.info.image_shape
    first, last, num_batches = partition.process_test_block(
      int(labels.shape[0]), batch_size, process_index, process_count
    )

    def make_batch(batch_ids: tf.Tensor) -> dict[str, tf.Tensor]:
      batch = {
        'image': self._normalise(tf.gather(images, batch_ids)),
        'label': tf.gather(labels, batch_ids),
        'index': batch_ids,
      }
      return batching.pad_batch(batch, [batch_size, height, width, channels])

    ids = tf.range(first, last, dtype=tf.int32)
    ds = batching.pad_with_empty_batches(
      tf.data.Dataset.from_tensor_slices(ids).batch(batch_size),
      num_real=last - first,
      batch_size=batch_size,
      num_batches=num_batches,
    )
    return batching.numpy_batches(ds, make_batch)

  def _normalise(self, images: tf.Tensor) -> tf.Tensor:
    """Maps uint8 [B, H, W, C] pixels to float32 ``(x / 255 - mean) / std`` per channel."""
    return (tf.cast(images, tf.float32) / 255.0 - self._mean) / self._std


def _crop_and_flip(images: tf.Tensor, flip: tf.Tensor, offsets: tf.Tensor, padding: int):
  """Zero-pads, crops and horizontally flips each image of a batch with one gather per axis.

  Args:
    images: uint8 [B, H, W, C], of static H and W.
    flip: bool [B], whether to mirror each image left-right.
    offsets: int32 [B, 2], top-left (row, column) of each crop in the padded image, each in
      ``[0, 2 * padding]``.
    padding: zero pixels added on each side before cropping; 0 means no crop.

  Returns:
    uint8 [B, H, W, C].
  """
  _, height, width, _ = images.shape
  if padding:
    images = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    rows = offsets[:, :1] + tf.range(height)  # [B, H]
    images = tf.gather(images, rows, axis=1, batch_dims=1)  # [B, H, W + 2 * padding, C]
  columns = tf.where(flip[:, None], tf.range(width - 1, -1, -1), tf.range(width)[None, :])  # [B, W]
  columns += offsets[:, 1:]
  return tf.gather(images, columns, axis=2, batch_dims=1)  # [B, H, W, C]


def create(
  input_config: ml_collections.ConfigDict,
  *,
  seed: int,
  fashion_mnist_idx_dir: str = base.FASHION_MNIST_IDX_DIR,
) -> 'InMemoryDatasets':
  """Loads the train and test splits into memory, preparing the dataset first if needed.

  ImageNet (``STREAMED_DATASETS``) is streamed instead (``saf_jax.data.streamed``).

  Args:
    input_config: ``config.input`` with fields ``dataset`` (a TFDS name of
      ``IN_MEMORY_DATASETS``, or ``'folder:PATH'``), ``data_dir`` (str, or None for the
      TFDS default), ``image_size`` (folders only: pixels square, -1 to keep the images),
      ``num_train_examples`` / ``num_test_examples`` (int; -1 for the whole split, else
      the first N examples in TFDS order; for a folder, a class-balanced subset of N),
      ``augment`` (one of ``AUGMENTATIONS``) and ``crop_padding`` (int, pixels per side,
      used by ``'crop_flip'``). These values are checked by
      :func:`saf_jax.validation.validate_config`, not here.
    seed: seed of the train order and augmentation.
    fashion_mnist_idx_dir: folder with Fashion-MNIST's gzipped IDX files, used to write the
      TFDS dataset when it is missing.

  Returns:
    The :class:`InMemoryDatasets`, with ``info`` describing what is served.

  Raises:
    ValueError: if a split has fewer examples than ``num_*_examples`` asks for, or a
      folder's images cannot be read or differ in size (see ``folder.load``).
    DataNotFoundError: if the dataset is not prepared in ``data_dir`` and cannot be
      provided from local files or downloaded.
  """
  name = input_config.dataset
  if name.startswith(base.FOLDER_PREFIX):
    root = name[len(base.FOLDER_PREFIX) :]
    train, test, classes = folder.load(
      root,
      image_size=input_config.image_size,
      num_train_examples=input_config.num_train_examples,
      num_test_examples=input_config.num_test_examples,
      cache_dir=os.path.join(input_config.data_dir or tfds_prep.tfds_data_dir(), folder.CACHE_DIR),
    )
    if train['image'].shape[1:] != test['image'].shape[1:]:
      raise ValueError(
        f'The train images of {root!r} are {train["image"].shape[1:]} and the test images '
        f'{test["image"].shape[1:]}: set config.input.image_size to resize both.'
      )
    num_classes = len(classes)
    pixels = train['image'].astype(np.float64) / 255.0  # Normalise by the train split.
    mean = tuple(float(m) for m in pixels.mean(axis=(0, 1, 2)))
    std = tuple(float(max(d, 1e-3)) for d in pixels.std(axis=(0, 1, 2)))
  else:
    builder = tfds_prep.ready_builder(
      name, data_dir=input_config.data_dir, fashion_mnist_idx_dir=fashion_mnist_idx_dir
    )
    train = _load_split(builder, 'train', num_examples=input_config.num_train_examples)
    test = _load_split(builder, 'test', num_examples=input_config.num_test_examples)
    num_classes = builder.info.features['label'].num_classes
    mean, std = base.CHANNEL_STATS[name]
  info = base.DatasetInfo(
    name=name,
    num_train=len(train['label']),
    num_test=len(test['label']),
    num_classes=num_classes,
    image_shape=tuple(int(d) for d in train['image'].shape[1:]),
  )
  logging.info('Loaded %s into memory: %s', name, info)
  return InMemoryDatasets(
    info=info,
    train=train,
    test=test,
    mean=mean,
    std=std,
    augment=input_config.augment,
    crop_padding=input_config.crop_padding,
    seed=seed,
  )


def _load_split(
  builder: tfds.core.DatasetBuilder, split: str, *, num_examples: int
) -> dict[str, np.ndarray]:
  """Reads the first ``num_examples`` of a split (-1: all) in TFDS order into memory.

  Returns:
    ``'image'`` uint8 [N, H, W, C] and ``'label'`` int32 [N].

  Raises:
    ValueError: if the split has fewer than ``num_examples`` examples.
  """
  field = f'config.input.num_{split}_examples'
  too_few = f'{field}={num_examples} but the {split} split of {builder.name} has only'
  if num_examples != -1 and split in builder.info.splits:  # Sizes are unknown under mock_data.
    available = builder.info.splits[split].num_examples
    if available < num_examples:
      raise ValueError(f'{too_few} {available} examples.')
    split = f'{split}[:{num_examples}]'
  # One file at a time, in order, so that example i is the i-th of the split and `[:N]` keeps
  # the ids of the full split.
  read_config = tfds.ReadConfig(interleave_cycle_length=1)
  ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)
  ds = ds.map(
    lambda ex: (ex['image'], ex['label']), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
  )
  if num_examples != -1:
    ds = ds.take(num_examples)  # `tfds.testing.mock_data` serves `num_examples` of its own.
  images, labels = [], []
  for image, label in ds.batch(8192).as_numpy_iterator():
    images.append(image)
    labels.append(label)
  num_read = sum(len(b) for b in labels)
  if num_examples != -1 and num_read < num_examples:
    raise ValueError(f'{too_few} {num_read} examples.')
  return {
    'image': np.concatenate(images),
    'label': np.concatenate(labels).astype(np.int32),
  }

r"""Input pipeline: TFDS image classification splits held in memory, with stable example ids.

SAF keeps a table of past logits, float32 ``[num_train, num_classes]``, indexed by example, so
every training example carries an ``index`` in ``[0, num_train)``: its position in the dataset's
own TFDS order (files read in sequence, before any shuffling). The pipeline is::

  create_datasets:  TFDS split --decode once--> uint8 [N, H, W, C] in memory; index i = i-th example
  train_epoch(e):   perm = stateless_shuffle(range(N), seed=(seed, e))      # order from (seed, e)
                    batches of ids (drop remainder) -> gather -> augment -> normalise
  test_batches:     range(N_test) in order -> batches; last one padded, 'mask' marks real rows

Augmentation is the SAF paper's "basic data augmentation" (Du et al. 2022, Sec. 5), chosen by
``config.input.augment``:

* ``'none'``: no augmentation.
* ``'flip'``: random horizontal flip. Use for Fashion-MNIST (see ``DEFAULT_AUGMENT``).
* ``'crop_flip'``: pad ``crop_padding`` zero (black) pixels on each side, take a random crop of
  the original size, then flip horizontally at random. Use for CIFAR with ``crop_padding=4``.

The random choices for example ``index`` in epoch ``e`` depend only on ``(seed, e, index)``:
per-epoch tables of flips and crop offsets are drawn with stateless TF random ops and looked up by
id, so they do not depend on the batch size or on where the example falls in the epoch. Crop and
flip are done together as one batched integer gather (exact pixels, no interpolation).

Data comes from ``tfds.builder(name, data_dir=...)``. If it is not prepared there, Fashion-MNIST
is written as a TFDS dataset from Debian's ``dataset-fashion-mnist`` IDX files (offline), and
any other dataset is downloaded with ``builder.download_and_prepare()`` when its download hosts
answer; otherwise ``DataNotFoundError`` says what to install or build.

Example::

  datasets = input_pipeline.create_datasets(config.input, seed=config.seed)
  for epoch in range(1, config.total_epochs + 1):
    for batch in datasets.train_epoch(epoch, batch_size=128):
      ...  # batch['image']: float32 [128, H, W, C]; batch['label'], batch['index']: int32 [128]
  for batch in datasets.test_batches(batch_size=1000):
    ...  # plus batch['mask']: float32 [1000], 0 on padding rows

References:
  Du et al, `Sharpness-Aware Training for Free <https://arxiv.org/abs/2205.14083>`_, 2022.
"""

import dataclasses
import gzip
import os
import socket
import urllib.parse
from collections.abc import Iterator, Mapping

import ml_collections
import numpy as np
from absl import logging

from saf_jax import image_folder, sharding
from saf_jax.tf_runtime import tf, tfds

# Where Debian's `dataset-fashion-mnist` package installs the Fashion-MNIST IDX files.
FASHION_MNIST_IDX_DIR = '/usr/share/datasets/fashion-mnist'

AUGMENTATIONS = ('none', 'flip', 'crop_flip')
# TFDS datasets streamed from their files instead of held in memory (saf_jax.streaming),
# and their augmentations.
STREAMED_DATASETS = ('imagenet2012',)
STREAMED_AUGMENTATIONS = ('inception_crop', 'none')

# The SAF paper's "basic data augmentation" per dataset, for configs to copy. Digits are not
# flip-symmetric, so MNIST gets none.
DEFAULT_AUGMENT = {
  'fashion_mnist': 'flip',
  'mnist': 'none',
  'cifar10': 'crop_flip',
  'cifar100': 'crop_flip',
}

# Per-channel mean and standard deviation of the train split's pixels, in [0, 1] units (the std
# is over all pixels, not the mean of per-image stds).
_CHANNEL_STATS = {
  'fashion_mnist': ((0.2860,), (0.3530,)),
  'mnist': ((0.1307,), (0.3081,)),
  'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
  'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
# TFDS names this pipeline holds in memory (it knows their normalisation constants).
IN_MEMORY_DATASETS = tuple(sorted(_CHANNEL_STATS))
# Every TFDS name create_datasets serves.
DATASETS = IN_MEMORY_DATASETS + STREAMED_DATASETS
# config.input.dataset = FOLDER_PREFIX + root: an image folder or archive (saf_jax.image_folder).
FOLDER_PREFIX = image_folder.FOLDER_PREFIX
folder_classes = image_folder.folder_classes

# IDX type codes (http://yann.lecun.com/exdb/mnist/): multi-byte values are big-endian.
_IDX_DTYPES = {
  0x08: np.dtype(np.uint8),
  0x09: np.dtype(np.int8),
  0x0B: np.dtype('>i2'),
  0x0C: np.dtype('>i4'),
  0x0D: np.dtype('>f4'),
  0x0E: np.dtype('>f8'),
}

# Seconds to wait for a TCP connection to a download host before calling it unreachable. TFDS's
# downloader retries ten times with backoff and sets no connect timeout, so without this check an
# offline machine spends minutes before failing.
_PROBE_TIMEOUT_S = 5.0
# Host-side batch builders running in parallel, and batches prepared ahead of use.
_PARALLEL_BATCHES = 2
_PREFETCH_BATCHES = 2

# Stream ids folded into the (seed, epoch) key, one per use of randomness.
_PERMUTATION_STREAM = 0
_FLIP_STREAM = 1
_CROP_STREAM = 2
_SUBSET_STREAM = 3  # train_subset_batches (keyed by (seed, 0), not by an epoch).


class DataNotFoundError(FileNotFoundError):
  """The dataset is not prepared in the TFDS data_dir and could not be provided here."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Sizes and shapes of the splits actually served.

  Attributes:
    name: TFDS name, e.g. ``'fashion_mnist'``.
    num_train: train examples served; ids are ``0 .. num_train - 1``.
    num_test: test examples served.
    num_classes: number of labels.
    image_shape: ``(height, width, channels)`` of one image.
  """

  name: str
  num_train: int
  num_test: int
  num_classes: int
  image_shape: tuple[int, int, int]


class Datasets:
  """In-memory train and test splits with per-epoch deterministic batching.

  Build with :func:`create_datasets`.

  Attributes:
    info: sizes and shapes of the splits.
    augment: one of ``AUGMENTATIONS``, applied to train batches only.
    crop_padding: zero pixels added on each side before a random crop (``'crop_flip'``).
    seed: seed of the train order and augmentation.
  """

  def __init__(
    self,
    *,
    info: DatasetInfo,
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
    with tf.device('/cpu:0'):
      self._train_images = tf.constant(train['image'])
      self._train_labels = tf.constant(train['label'], dtype=tf.int32)
      self._test_images = tf.constant(test['image'])
      self._test_labels = tf.constant(test['label'], dtype=tf.int32)
    self._mean = tf.constant(mean, dtype=tf.float32)
    self._std = tf.constant(std, dtype=tf.float32)

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

    Process ``p`` of ``P`` reads only its fixed partition of the ids,
    ``sharding.process_partition(num_train, p, P)``, in every epoch, in an order that is a
    permutation of that partition fixed by ``(seed, epoch, p)`` (by ``(seed, epoch)`` when
    ``P = 1``: then the partition is every id). The last ``partition size % batch_size``
    ids of the permutation are dropped. Calling this again with the same arguments gives the
    same batches, so a resumed run can replay any epoch, or continue it from ``start_batch``.

    Args:
      epoch: epoch number, counting from 1.
      batch_size: examples per batch of this process (the global batch over ``P``).
      start_batch: batches of the epoch to skip (already trained before a resume).
      process_index: this process, in ``[0, process_count)``.
      process_count: number of processes ``P`` feeding one global batch.

    Returns:
      An iterator over ``partition size // batch_size - start_batch`` dicts: ``'image'``
      float32 [batch_size, H, W, C] normalised by the dataset's channel mean and std,
      ``'label'`` int32 [batch_size], ``'index'`` int32 [batch_size], each example's id.

    Raises:
      ValueError: if ``epoch < 1``, ``batch_size`` is not in ``[1, partition size]`` or
        ``start_batch`` is not in ``[0, batches per epoch]``.
    """
    first_id, num_ids, _ = epoch_partition(
      self.info.num_train, epoch, batch_size, start_batch, process_index, process_count
    )
    num_train = self.info.num_train
    height, width, _ = self.info.image_shape
    epoch_key = tf.constant([self.seed, epoch], dtype=tf.int64)
    if process_count > 1:
      epoch_key = tf.random.experimental.stateless_fold_in(epoch_key, process_index, alg='philox')

    def key(stream: int) -> tf.Tensor:
      return tf.random.experimental.stateless_fold_in(epoch_key, stream, alg='philox')

    ids = tf.random.experimental.stateless_shuffle(
      tf.range(first_id, first_id + num_ids, dtype=tf.int32),
      seed=key(_PERMUTATION_STREAM),
      alg='philox',
    )
    # Per-id augmentation tables, so an example's augmentation depends on (seed, epoch, id).
    flip_table = tf.zeros([num_train], dtype=tf.bool)
    offset_table = tf.zeros([num_train, 2], dtype=tf.int32)
    padding = 0
    if self.augment in ('flip', 'crop_flip'):
      flip_table = (
        tf.random.stateless_uniform([num_train], seed=key(_FLIP_STREAM), alg='philox') < 0.5
      )
    if self.augment == 'crop_flip':
      padding = self.crop_padding
      offset_table = tf.random.stateless_uniform(
        [num_train, 2],
        seed=key(_CROP_STREAM),
        minval=0,
        maxval=2 * padding + 1,
        dtype=tf.int32,
        alg='philox',
      )

    def make_batch(batch_ids: tf.Tensor) -> dict[str, tf.Tensor]:
      images = tf.gather(self._train_images, batch_ids)  # uint8 [B, H, W, C]
      if self.augment != 'none':
        images = _crop_and_flip(
          images,
          flip=tf.gather(flip_table, batch_ids),
          offsets=tf.gather(offset_table, batch_ids),
          padding=padding,
          height=height,
          width=width,
        )
      return {
        'image': self._normalise(images),
        'label': tf.gather(self._train_labels, batch_ids),
        'index': batch_ids,
      }

    ids = ids[start_batch * batch_size :]
    ds = tf.data.Dataset.from_tensor_slices(ids).batch(batch_size, drop_remainder=True)
    return _numpy_batches(ds, make_batch)

  def train_subset_batches(
    self, *, num_batches: int, batch_size: int, seed: int
  ) -> Iterator[dict[str, np.ndarray]]:
    """A fixed random subset of the train split, unaugmented, for measurements.

    The subset is the first ``num_batches * batch_size`` ids of a permutation fixed by
    ``seed`` alone (not by ``self.seed``), so runs of different methods and seeds are
    measured on the same examples. Used by the sharpness, Hessian and loss-landscape tools
    (``saf_jax.sharpness``, ``saf_jax.landscape``).

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
    check_subset(num_batches, batch_size, num_train)
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
    return _numpy_batches(ds, make_batch)

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
    first, last, num_batches = process_test_block(
      int(labels.shape[0]), batch_size, process_index, process_count
    )

    def make_batch(batch_ids: tf.Tensor) -> dict[str, tf.Tensor]:
      batch = {
        'image': self._normalise(tf.gather(images, batch_ids)),
        'label': tf.gather(labels, batch_ids),
        'index': batch_ids,
      }
      return pad_batch(batch, [batch_size, height, width, channels])

    ids = tf.range(first, last, dtype=tf.int32)
    ds = pad_with_empty_batches(
      tf.data.Dataset.from_tensor_slices(ids).batch(batch_size),
      num_real=last - first,
      batch_size=batch_size,
      num_batches=num_batches,
    )
    return _numpy_batches(ds, make_batch)

  def _normalise(self, images: tf.Tensor) -> tf.Tensor:
    """Maps uint8 [B, H, W, C] pixels to float32 ``(x / 255 - mean) / std`` per channel."""
    return (tf.cast(images, tf.float32) / 255.0 - self._mean) / self._std


def epoch_partition(
  num_train: int,
  epoch: int,
  batch_size: int,
  start_batch: int,
  process_index: int,
  process_count: int,
) -> tuple[int, int, int]:
  """Checks ``train_epoch``'s arguments; returns its process's ids and batches.

  Returns:
    ``(first_id, num_ids, num_batches)``: the ids ``sharding.process_partition(num_train,
    process_index, process_count)`` and the ``num_ids // batch_size`` batches of an epoch.

  Raises:
    ValueError: if ``epoch < 1``, ``batch_size`` is not in ``[1, num_ids]`` or
      ``start_batch`` is not in ``[0, num_batches]``.
  """
  if epoch < 1:
    raise ValueError(f'Epochs count from 1, got epoch={epoch}.')
  first_id, num_ids = sharding.process_partition(num_train, process_index, process_count)
  if not 1 <= batch_size <= num_ids:
    raise ValueError(
      f'batch_size must be in [1, {num_ids}] (the training examples of one of '
      f'{process_count} processes), got {batch_size}.'
    )
  num_batches = num_ids // batch_size
  if not 0 <= start_batch <= num_batches:
    raise ValueError(
      f'start_batch must be in [0, {num_batches}] (batches per epoch), got {start_batch}.'
    )
  return first_id, num_ids, num_batches


def check_subset(num_batches: int, batch_size: int, num_train: int) -> None:
  """Checks ``train_subset_batches``'s sizes.

  Raises:
    ValueError: if ``num_batches < 1``, ``batch_size < 1`` or the subset has more than
      ``num_train`` examples.
  """
  if num_batches < 1 or batch_size < 1 or num_batches * batch_size > num_train:
    raise ValueError(
      f'A subset of num_batches={num_batches} x batch_size={batch_size} examples needs '
      f'both >= 1 and at most num_train={num_train} examples.'
    )


def process_test_block(
  num_test: int, batch_size: int, process_index: int, process_count: int
) -> tuple[int, int, int]:
  """The test ids ``[first, last)`` of one process and the batches every process yields.

  The test split is cut into ``process_count`` contiguous blocks whose sizes differ by at
  most one; every process yields ``ceil(ceil(num_test / P) / batch_size)`` batches.
  """
  bounds = [num_test * p // process_count for p in range(process_count + 1)]
  largest = -(-num_test // process_count)  # The biggest block.
  return bounds[process_index], bounds[process_index + 1], -(-largest // batch_size)


def pad_with_empty_batches(
  batches: tf.data.Dataset, *, num_real: int, batch_size: int, num_batches: int
) -> tf.data.Dataset:
  """Appends empty batches to ``batches`` (of ``num_real`` examples) up to ``num_batches``.

  So that every process yields as many test batches (see :func:`process_test_block`); each
  batch is padded to full size afterwards.
  """
  missing = num_batches - (-(-num_real // batch_size))
  if not missing:
    return batches
  empty = tf.nest.map_structure(
    lambda spec: tf.zeros([0, *spec.shape[1:]], spec.dtype), batches.element_spec
  )
  return batches.concatenate(tf.data.Dataset.from_tensors(empty).repeat(missing))


def pad_batch(batch: dict[str, tf.Tensor], image_shape: list[int]) -> dict[str, tf.Tensor]:
  """Pads a test batch to ``image_shape[0]`` rows and adds its ``'mask'``.

  Args:
    batch: ``'image'`` float32 [n, H, W, C], ``'label'`` and ``'index'`` int32 [n], with
      ``n <= image_shape[0]``.
    image_shape: ``[batch_size, H, W, C]``.

  Returns:
    The batch with ``batch_size`` rows: padding rows have image 0, label 0, index -1 and
    ``'mask'`` (float32 [batch_size]) 0; real rows have mask 1.
  """
  num_real = tf.shape(batch['label'])[0]
  num_pad = image_shape[0] - num_real
  image = tf.pad(batch['image'], [[0, num_pad], [0, 0], [0, 0], [0, 0]])
  return {
    'image': tf.ensure_shape(image, image_shape),
    'label': tf.pad(batch['label'], [[0, num_pad]]),
    'index': tf.pad(batch['index'], [[0, num_pad]], constant_values=-1),
    'mask': tf.pad(tf.ones([num_real], tf.float32), [[0, num_pad]]),
  }


def _numpy_batches(ids: tf.data.Dataset, make_batch) -> Iterator[dict[str, np.ndarray]]:
  """Maps batches of ids to numpy batches with a fixed, small amount of parallelism.

  tf.data's autotuner is off on purpose: with it, destroying a finished iterator waited
  for its autotuning thread, and training stalled for about 40 s at some epoch ends on a
  2-core CPU. Two parallel batch builders and two prefetched batches keep the pipeline far
  ahead of training here (see docs/benchmark.md).
  """
  ds = ids.map(make_batch, num_parallel_calls=_PARALLEL_BATCHES, deterministic=True)
  ds = ds.prefetch(_PREFETCH_BATCHES)
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options).as_numpy_iterator()


def _crop_and_flip(
  images: tf.Tensor,
  *,
  flip: tf.Tensor,
  offsets: tf.Tensor,
  padding: int,
  height: int,
  width: int,
) -> tf.Tensor:
  """Zero-pads, crops and horizontally flips each image of a batch with one gather per axis.

  Args:
    images: uint8 [B, height, width, C].
    flip: bool [B], whether to mirror each image left-right.
    offsets: int32 [B, 2], top-left (row, column) of each crop in the padded image, each in
      ``[0, 2 * padding]``.
    padding: zero pixels added on each side before cropping; 0 means no crop.
    height: image height in pixels.
    width: image width in pixels.

  Returns:
    uint8 [B, height, width, C].
  """
  if padding:
    images = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    rows = offsets[:, :1] + tf.range(height)  # [B, H]
    images = tf.gather(images, rows, axis=1, batch_dims=1)  # [B, H, W + 2 * padding, C]
  columns = tf.where(flip[:, None], tf.range(width - 1, -1, -1), tf.range(width)[None, :])  # [B, W]
  columns += offsets[:, 1:]
  return tf.gather(images, columns, axis=2, batch_dims=1)  # [B, H, W, C]


def augmentations(dataset: str) -> tuple[str, ...]:
  """The values of ``config.input.augment`` that ``dataset`` (a TFDS name or folder) takes."""
  return STREAMED_AUGMENTATIONS if dataset in STREAMED_DATASETS else AUGMENTATIONS


def create_datasets(
  input_config: ml_collections.ConfigDict,
  *,
  seed: int,
  fashion_mnist_idx_dir: str = FASHION_MNIST_IDX_DIR,
  process_count: int = 1,
):
  """Loads the train and test splits into memory, preparing the dataset first if needed.

  ImageNet (``STREAMED_DATASETS``) is streamed from its files instead, by
  :func:`saf_jax.streaming.create_streamed_datasets`, with the same interface.

  Args:
    input_config: ``config.input`` with fields ``dataset`` (TFDS name, a key of
      ``DEFAULT_AUGMENT``), ``data_dir`` (str, or None for the TFDS default),
      ``num_train_examples`` / ``num_test_examples`` (int; -1 for the whole split, else
      the first N examples in TFDS order; for a folder, a class-balanced subset of N),
      ``augment`` (one of ``AUGMENTATIONS``) and ``crop_padding`` (int, pixels per side,
      used by ``'crop_flip'``).
    seed: seed of the train order and augmentation.
    fashion_mnist_idx_dir: folder with Fashion-MNIST's gzipped IDX files, used to write the
      TFDS dataset when it is missing.
    process_count: processes of the run; with more than one, an unprepared ImageNet is
      refused rather than prepared by each process at once.

  Returns:
    The datasets, with ``info`` describing what is served: a :class:`Datasets`, or a
    :class:`saf_jax.streaming.StreamedDatasets` for ``STREAMED_DATASETS``.

  Raises:
    ValueError: if a field of ``input_config`` has an unsupported value.
    DataNotFoundError: if the dataset is not prepared in ``data_dir`` and cannot be
      provided from local files or downloaded.
  """
  name = input_config.dataset
  if name in STREAMED_DATASETS:
    from saf_jax import streaming  # It builds on this module.

    return streaming.create_streamed_datasets(input_config, seed=seed, process_count=process_count)
  if name not in _CHANNEL_STATS and not name.startswith(FOLDER_PREFIX):
    raise ValueError(
      f'config.input.dataset={name!r} is not supported; use one of {list(DATASETS)} '
      f"or '{FOLDER_PREFIX}/path/to/images'."
    )
  if input_config.augment not in AUGMENTATIONS:
    raise ValueError(
      f'config.input.augment={input_config.augment!r} is not supported; use one of '
      f'{list(AUGMENTATIONS)}.'
    )
  if input_config.crop_padding < 0:
    raise ValueError(
      f'config.input.crop_padding must be >= 0 pixels, got {input_config.crop_padding}.'
    )
  for field in ('num_train_examples', 'num_test_examples'):
    value = input_config[field]
    if value != -1 and value < 1:
      raise ValueError(f'config.input.{field} must be -1 (all) or positive, got {value}.')

  if name.startswith(FOLDER_PREFIX):
    root = name[len(FOLDER_PREFIX) :]
    train, test, classes = image_folder.load(
      root,
      image_size=input_config.get('image_size', -1),
      num_train_examples=input_config.num_train_examples,
      num_test_examples=input_config.num_test_examples,
      cache_dir=os.path.join(input_config.data_dir or tfds_data_dir(), image_folder.CACHE_DIR),
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
    builder = ready_builder(
      name, data_dir=input_config.data_dir, fashion_mnist_idx_dir=fashion_mnist_idx_dir
    )
    train = _load_split(builder, 'train', num_examples=input_config.num_train_examples)
    test = _load_split(builder, 'test', num_examples=input_config.num_test_examples)
    num_classes = builder.info.features['label'].num_classes
    mean, std = _CHANNEL_STATS[name]
  info = DatasetInfo(
    name=name,
    num_train=len(train['label']),
    num_test=len(test['label']),
    num_classes=num_classes,
    image_shape=tuple(int(d) for d in train['image'].shape[1:]),
  )
  logging.info('Loaded %s into memory: %s', name, info)
  return Datasets(
    info=info,
    train=train,
    test=test,
    mean=mean,
    std=std,
    augment=input_config.augment,
    crop_padding=input_config.crop_padding,
    seed=seed,
  )


def tfds_data_dir() -> str:
  """TFDS's default data_dir (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)."""
  return tfds.core.constants.DATA_DIR


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


def ready_builder(
  name: str,
  *,
  data_dir: str | None,
  fashion_mnist_idx_dir: str = FASHION_MNIST_IDX_DIR,
  process_count: int = 1,
) -> tfds.core.DatasetBuilder:
  """Returns a builder whose splits can be read, preparing the dataset if needed.

  Fashion-MNIST is written from Debian's IDX files; a dataset with a manual download
  (ImageNet) is prepared from ``<data_dir>/downloads/manual`` as TFDS documents, when its
  files are there and ``process_count`` is 1; any other is downloaded.

  Raises:
    DataNotFoundError: if the dataset is not prepared and cannot be, saying what to do.
  """
  builder = tfds.builder(name, data_dir=data_dir)
  if _is_readable(builder):
    return builder
  data_dir_root = os.fspath(builder.data_dir_root)
  manual_dir = os.path.join(data_dir_root, 'downloads', 'manual')
  if name == 'fashion_mnist' and _has_fashion_mnist_idx(fashion_mnist_idx_dir):
    _store_fashion_mnist(builder, idx_dir=fashion_mnist_idx_dir)
    builder = tfds.builder(name, data_dir=data_dir)
  elif builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    if process_count > 1 or not (os.path.isdir(manual_dir) and os.listdir(manual_dir)):
      # Several processes would each prepare it for hours and race to rename the result.
      once = ' Prepare it once before a multi-process run.' if process_count > 1 else ''
      raise DataNotFoundError(
        f'Dataset {name!r} is not prepared in data_dir {data_dir_root!r}.{once} '
        + _how_to_provide(name, data_dir_root, fashion_mnist_idx_dir)
      )
    # No network: TFDS reads the archives in manual_dir (its checksums list a web host
    # that a manual download never contacts).
    logging.info(
      'Preparing %s in %s from the manual download in %s.', name, data_dir_root, manual_dir
    )
    _prepare(builder, fashion_mnist_idx_dir)
  else:
    unreachable = _unreachable_hosts(builder)
    if unreachable:
      raise DataNotFoundError(
        f'Dataset {name!r} is not prepared in data_dir {data_dir_root!r}, and its '
        f'download hosts {unreachable} cannot be reached from here. '
        + _how_to_provide(name, data_dir_root, fashion_mnist_idx_dir)
      )
    logging.info('Downloading and preparing %s in %s.', name, data_dir_root)
    _prepare(builder, fashion_mnist_idx_dir)
  if not _is_readable(builder):
    raise DataNotFoundError(
      f'Dataset {name!r} is still not readable in data_dir {data_dir_root!r} after '
      'preparing it. ' + _how_to_provide(name, data_dir_root, fashion_mnist_idx_dir)
    )
  return builder


def _prepare(builder: tfds.core.DatasetBuilder, fashion_mnist_idx_dir: str) -> None:
  """``builder.download_and_prepare()``, any failure raised as ``DataNotFoundError``."""
  try:
    builder.download_and_prepare()
  except Exception as e:  # Any failure (network, checksum, archive, disk) means no data.
    data_dir_root = os.fspath(builder.data_dir_root)
    raise DataNotFoundError(
      f'Dataset {builder.name!r} is not prepared in data_dir {data_dir_root!r} and '
      f'download_and_prepare failed: {e} '
      + _how_to_provide(builder.name, data_dir_root, fashion_mnist_idx_dir)
    ) from e


def _is_readable(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether ``builder.as_dataset`` can serve the train split.

  ``is_prepared()`` alone is not enough: under ``tfds.testing.mock_data`` it is False while
  ``as_dataset`` serves fake examples, and tests rely on that.
  """
  if builder.is_prepared():
    return True
  try:
    builder.as_dataset(split='train')
  except AssertionError:  # TFDS's "could not find data in <data_dir>" error.
    return False
  return True


def _how_to_provide(name: str, data_dir_root: str, fashion_mnist_idx_dir: str) -> str:
  """The one command that makes ``name`` available, as a sentence."""
  if name == 'fashion_mnist':
    return (
      f'Install it with `apt-get install -y dataset-fashion-mnist` (IDX files in '
      f'{fashion_mnist_idx_dir}); it is converted to TFDS on the next run.'
    )
  instructions = tfds.builder_cls(name).MANUAL_DOWNLOAD_INSTRUCTIONS
  if instructions:
    manual_dir = os.path.join(data_dir_root, 'downloads', 'manual')
    return (
      f'It needs a manual download: {" ".join(instructions.split())} Put the files in '
      f'{manual_dir}, then run `{_prepare_command(name, data_dir_root)}` (offline; hours '
      'for ImageNet; a one-process training run does the same).'
    )
  return (
    f'On a machine with internet run `{_prepare_command(name, data_dir_root)}`, then '
    f'copy {os.path.join(data_dir_root, name)} to the same path here.'
  )


def _prepare_command(name: str, data_dir_root: str) -> str:
  return f'python -m saf_jax.prepare_data --dataset={name} --data_dir={data_dir_root}'


def _unreachable_hosts(builder: tfds.core.DatasetBuilder) -> list[str]:
  """Download hosts of ``builder`` that refuse a TCP connection; empty if any answers.

  Returns an empty list too when the builder lists no download URLs, so that
  ``download_and_prepare`` is tried (and reports its own error).
  """
  hosts = set()
  for url in builder.url_infos or {}:
    parsed = urllib.parse.urlsplit(url)
    if parsed.hostname:
      default_port = 443 if parsed.scheme == 'https' else 80
      hosts.add((parsed.hostname, parsed.port or default_port))
  unreachable = []
  for host, port in sorted(hosts):
    try:
      socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
    except OSError:
      unreachable.append(f'{host}:{port}')
    else:
      return []
  return unreachable


_FASHION_MNIST_FILES = {
  'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
  'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}


def _has_fashion_mnist_idx(idx_dir: str) -> bool:
  return all(
    os.path.isfile(os.path.join(idx_dir, filename))
    for filenames in _FASHION_MNIST_FILES.values()
    for filename in filenames
  )


def _read_idx(path: str) -> np.ndarray:
  """Reads a gzipped IDX file (the MNIST file format).

  The header is two zero bytes, a type code, the number of dimensions D, then D big-endian
  uint32 sizes; the data follows in row-major order.

  Args:
    path: path of a ``*-ubyte.gz`` file.

  Returns:
    The array, with the file's shape and dtype (uint8 for (Fashion-)MNIST).

  Raises:
    ValueError: if the header is malformed or the data size does not match it.
  """
  with gzip.open(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[:2] != b'\x00\x00' or data[2] not in _IDX_DTYPES:
    raise ValueError(f'{path}: not an IDX file (magic bytes {data[:4]!r}).')
  dtype, num_dims = _IDX_DTYPES[data[2]], data[3]
  header_size = 4 + 4 * num_dims
  if len(data) < header_size:
    raise ValueError(f'{path}: truncated IDX header.')
  shape = tuple(int(d) for d in np.frombuffer(data, dtype='>u4', count=num_dims, offset=4))
  expected_size = header_size + int(np.prod(shape)) * dtype.itemsize
  if len(data) != expected_size:
    raise ValueError(
      f'{path}: IDX header says shape {shape} of {dtype} ({expected_size} bytes in all) '
      f'but the file has {len(data)} bytes.'
    )
  return np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)


def _store_fashion_mnist(builder: tfds.core.DatasetBuilder, *, idx_dir: str) -> None:
  """Writes Fashion-MNIST from IDX files as the registered TFDS dataset, in IDX order.

  TFDS's own manual-download route rejects Debian's files because they were recompressed
  (different checksums), so the arrays are stored with the registered version and features.
  """
  split_datasets = {}
  for split, (images_file, labels_file) in _FASHION_MNIST_FILES.items():
    images = _read_idx(os.path.join(idx_dir, images_file))  # uint8 [N, 28, 28]
    labels = _read_idx(os.path.join(idx_dir, labels_file))  # uint8 [N]
    if images.ndim != 3 or labels.shape != images.shape[:1]:
      raise ValueError(
        f'{idx_dir}: {split} images {images.shape} and labels {labels.shape} do not match.'
      )
    # Plain (key, example) pairs: iterating a tf.data.Dataset one example at a time would cost
    # as much as the PNG encoding TFDS does on each image.
    split_datasets[split] = _idx_examples(images, labels)
  logging.info(
    'Fashion-MNIST is not prepared in %s; writing it as TFDS %s %s from the IDX files in %s.',
    builder.data_dir_root,
    builder.name,
    builder.version,
    idx_dir,
  )
  tfds.dataset_builders.store_as_tfds_dataset(
    name=builder.name,
    version=builder.version,
    features=builder.info.features,
    split_datasets=split_datasets,
    data_dir=builder.data_dir_root,
    description=builder.info.description,
    homepage=builder.info.homepage,
    citation=builder.info.citation,
    disable_shuffling=True,  # Keep IDX order, so that id i is the i-th IDX example.
  )
  logging.info('Wrote Fashion-MNIST to %s.', builder.data_dir)


def _idx_examples(
  images: np.ndarray, labels: np.ndarray
) -> Iterator[tuple[int, dict[str, np.ndarray | int]]]:
  """Yields ``(key, {'image': uint8 [28, 28, 1], 'label': int})`` with keys 0, 1, ... in order."""
  for i, (image, label) in enumerate(zip(images, labels, strict=True)):
    yield i, {'image': image[..., None], 'label': int(label)}

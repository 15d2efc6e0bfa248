r"""Streamed input pipeline for TFDS datasets too large for memory: ImageNet (``imagenet2012``).

The JPEG-encoded examples are read from the TFDS files every epoch; nothing is held in memory
but one shuffle window of encoded examples. Each example still carries a stable, dense
``index`` for SAF's table of past logits: its position in the split's TFDS order, computed
from the ``tfds_id`` TFDS attaches (``<file>-<shard>-of-<shards>__<position in shard>``) and
the shard lengths TFDS records, so it does not depend on the order in which files are read::

  index = sum(shard_lengths[:shard]) + position in shard           # in [0, num_train)

Process ``p`` of ``P`` reads the split slice ``train[a:a + n]`` with ``(a, n) =
partition.process_partition(num_train, p, P)``: exactly the ids of its SAF table rows. One
epoch of process ``p``::

  files of its slice, in an order drawn by numpy from (seed, epoch, p)
    -> 16 files interleaved
    -> windows of shuffle_buffer encoded examples, each permuted by (seed, epoch, p, window)
    -> the first (n // batch) * batch examples       # each id at most once; the rest dropped
    -> skip start_batch * batch                      # resume: skipped before any decoding
    -> decode + Inception crop + flip keyed by (seed, epoch, index) -> batch

Every random choice is stateless, so the order is a fixed function of ``(seed, epoch, p)``
and the files, whatever TensorFlow's global seed: an epoch can be replayed or resumed from
any batch (with the same TensorFlow version). Shuffled files plus shuffled windows are the
usual approximation to a full permutation on ImageNet (TFDS already shuffled the examples
when it wrote the files).

Augmentation (``config.input.augment``):

* ``'inception_crop'``: TensorFlow's Inception crop
  (:func:`~saf_jax.data.streamed_ops.inception_crop_window`): a box of 8-100% of the image
  area and aspect ratio in [3/4, 4/3] (the ranges of timm's ``RandomResizedCrop``, which the
  official SAF code uses, though timm draws the box differently and falls back to a center
  crop), decoded from the JPEG, resized to ``image_size`` square (bilinear, no
  antialiasing), then a random horizontal flip; all keyed by ``(seed, epoch, index)``. The
  official code also applies colour jitter (0.4) and a random bilinear/bicubic resize; this
  pipeline does not.
* ``'none'``: the evaluation transform below, for training as well.

Evaluation (:func:`~saf_jax.data.streamed_ops.center_crop_window`): the center square of side
``image_size / (image_size + 32)`` of the shorter side (224 px of 256: crop fraction 0.875) is
decoded and resized to ``image_size``, the crop-then-resize form of "resize to 256, center-crop
224".

The TensorFlow operations (ids, file and window shuffles, crops) are in
:mod:`saf_jax.data.streamed_ops`; this module composes them.

Example::

  datasets = streamed.create(config.input, seed=config.seed)
  for batch in datasets.train_epoch(epoch, batch_size=256):
    ...  # batch['image']: float32 [256, 224, 224, 3]; 'label', 'index': int32 [256]

References:
  Du et al., `Sharpness-Aware Training for Free <https://arxiv.org/abs/2205.14083>`_, 2022
  (ImageNet setup: Sec. 5 and Table 5).
  Szegedy et al., `Going Deeper with Convolutions <https://arxiv.org/abs/1409.4842>`_, 2015
  (the crop).
"""

import dataclasses
import os
from collections.abc import Iterator

import ml_collections
import numpy as np
from absl import logging

from saf_jax.data import base, batching, partition, streamed_ops, tfds_prep
from saf_jax.data.tf_runtime import tf, tfds


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Where a streamed dataset's splits are and how to normalise its pixels."""

  train_split: str
  test_split: str
  mean: tuple[float, float, float]  # Per-channel, [0, 1] units.
  std: tuple[float, float, float]


# TFDS name -> splits and channel statistics. ImageNet has no labelled test split: the
# validation split is the test set, as in the paper.
SPECS = {
  'imagenet2012': _Spec('train', 'validation', (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
DEFAULT_IMAGE_SIZE = 224  # Pixels, used when config.input.image_size is -1.


class StreamedDatasets:
  """Train and test splits streamed from TFDS files, with stable example ids.

  The same interface as :class:`saf_jax.data.Datasets`. Build with :func:`create` (or
  ``saf_jax.data.create_datasets``).

  Attributes:
    info: sizes and shapes of the splits served.
    augment: one of ``base.STREAMED_AUGMENTATIONS``, applied to train batches only.
    image_size: side of the square images served, pixels.
    shuffle_buffer: encoded examples per shuffle window of each process.
    seed: seed of the train order and augmentation.
  """

  def __init__(
    self,
    *,
    builder: tfds.core.DatasetBuilder,
    spec: _Spec,
    info: base.DatasetInfo,
    train_offsets: np.ndarray,
    test_offsets: np.ndarray,
    augment: str,
    shuffle_buffer: int,
    seed: int,
  ):
    """Stores what the iterators need; reads nothing.

    Args:
      builder: a builder whose splits can be read.
      spec: the dataset's splits and channel statistics.
      info: sizes and shapes served; ``image_shape`` is ``(size, size, 3)``.
      train_offsets: int64 [shards], the first id of each train shard.
      test_offsets: int64 [shards], the first id of each test shard.
      augment: one of ``base.STREAMED_AUGMENTATIONS``.
      shuffle_buffer: encoded examples per shuffle window, >= 1.
      seed: seed of the train order and augmentation.
    """
    self.info = info
    self.augment = augment
    self.image_size = info.image_shape[0]
    self.shuffle_buffer = shuffle_buffer
    self.seed = seed
    self._builder = builder
    self._spec = spec
    self._train_offsets = tf.constant(train_offsets, tf.int64)
    self._test_offsets = tf.constant(test_offsets, tf.int64)
    self._mean = tf.constant(spec.mean, tf.float32)
    self._std = tf.constant(spec.std, tf.float32)

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

    Process ``p`` of ``P`` reads the ids ``partition.process_partition(num_train, p, P)``
    in every epoch, in an order fixed by ``(seed, epoch, p)``; the last
    ``partition size % batch_size`` examples of that order are dropped. Calling this again
    with the same arguments gives the same batches.

    Args:
      epoch: epoch number, counting from 1.
      batch_size: examples per batch of this process (the global batch over ``P``).
      start_batch: batches of the epoch to skip (already trained before a resume). Skipped
        examples are read from disk but not decoded.
      process_index: this process, in ``[0, process_count)``.
      process_count: number of processes ``P`` feeding one global batch.

    Returns:
      An iterator over ``partition size // batch_size - start_batch`` dicts: ``'image'``
      float32 [batch_size, S, S, 3] normalised by the dataset's channel mean and std,
      ``'label'`` int32 [batch_size], ``'index'`` int32 [batch_size], each example's id.

    Raises:
      ValueError: if ``epoch < 1``, ``batch_size`` is not in ``[1, partition size]`` or
        ``start_batch`` is not in ``[0, batches per epoch]``.
    """
    first_id, num_ids, num_batches = partition.epoch_partition(
      self.info.num_train, epoch, batch_size, start_batch, process_index, process_count
    )
    order = [self.seed % 2**32, epoch, process_index]  # Non-negative words for numpy.
    ds = self._read(
      f'{self._spec.train_split}[{first_id}:{first_id + num_ids}]',
      self._train_offsets,
      file_order=order,
    )
    ds = streamed_ops.window_shuffle(ds, self.shuffle_buffer, order)
    ds = ds.take(num_batches * batch_size).skip(start_batch * batch_size)
    epoch_key = tf.constant([self.seed, epoch], tf.int64)

    def transform(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      if self.augment == 'none':
        image = streamed_ops.center_crop(example['image'], self.image_size)
      else:
        key = tf.random.experimental.stateless_fold_in(epoch_key, example['index'], alg='philox')
        image = streamed_ops.inception_crop(example['image'], key, self.image_size)
      return self._output(image, example)

    return self._batches(ds, transform, batch_size)

  def train_subset_batches(
    self, *, num_batches: int, batch_size: int, seed: int
  ) -> Iterator[dict[str, np.ndarray]]:
    """A fixed subset of the train split, center-cropped and unaugmented, for measurements.

    As :meth:`saf_jax.data.Datasets.train_subset_batches` (same arguments,
    batches and errors), but the subset is the first ``num_batches * batch_size`` examples
    read from the train files in an order shuffled by ``seed`` alone, one file after
    another (TFDS wrote each file's examples in random order). So it is the same for every
    method and every ``self.seed``, and reading it touches only a few files.
    """
    num_train = self.info.num_train
    partition.check_subset(num_batches, batch_size, num_train)
    ds = self._read(
      f'{self._spec.train_split}[:{num_train}]',
      self._train_offsets,
      file_order=[seed % 2**32],
      one_file_at_a_time=True,
    ).take(num_batches * batch_size)

    def transform(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      return self._output(streamed_ops.center_crop(example['image'], self.image_size), example)

    return self._batches(ds, transform, batch_size)

  def test_batches(
    self,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    split: str = 'test',
  ) -> Iterator[dict[str, np.ndarray]]:
    """Iterates once, in TFDS order and center-cropped, over this process's test examples.

    The contract of :meth:`saf_jax.data.Datasets.test_batches`: process ``p``
    reads block ``p`` of :func:`~saf_jax.data.partition.process_test_block`, every process yields
    the same number of batches, and the last ones are padded (``'mask'`` 0, index -1).
    Images are float32 [batch_size, S, S, 3], normalised. Only ``split='test'``: the
    streamed training split is not evaluated (``config.eval.train_accuracy`` is refused).

    Raises:
      ValueError: if ``batch_size < 1`` or ``split`` is not 'test'.
    """
    if batch_size < 1:
      raise ValueError(f'batch_size must be positive, got {batch_size}.')
    if split != 'test':
      raise ValueError(f"Streamed datasets evaluate split='test' only, got {split!r}.")
    first, last, num_batches = partition.process_test_block(
      self.info.num_test, batch_size, process_index, process_count
    )
    # TFDS refuses an empty slice: an empty block reads one example and keeps none.
    block = f'[{first}:{last}]' if last > first else '[0:1]'
    ds = self._read(
      self._spec.test_split + block, self._test_offsets, one_file_at_a_time=True
    ).take(last - first)

    def transform(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      return self._output(streamed_ops.center_crop(example['image'], self.image_size), example)

    def pad(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      return batching.pad_batch(batch, [batch_size, *self.info.image_shape])

    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size)
    ds = batching.pad_with_empty_batches(
      ds, num_real=last - first, batch_size=batch_size, num_batches=num_batches
    )
    return ds.map(pad).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()

  def _read(
    self,
    split: str,
    offsets: tf.Tensor,
    *,
    file_order: list[int] | None = None,
    one_file_at_a_time: bool = False,
  ) -> tf.data.Dataset:
    """Encoded examples of ``split`` as ``{'image': JPEG bytes, 'label', 'index'}``.

    Args:
      split: a TFDS split, sliced or not.
      offsets: int64 [shards], the first id of each of the split's shards.
      file_order: non-negative seed words of a numpy permutation of the files; None keeps
        TFDS's order. Never TFDS's own file shuffling, whose order depends on
        TensorFlow's global seed.
      one_file_at_a_time: read the files in sequence instead of 16 interleaved.

    Returns:
      A deterministic dataset of the split's encoded examples.
    """
    options = tf.data.Options()
    options.deterministic = True
    read_config = tfds.ReadConfig(add_tfds_id=True, options=options)
    if file_order is not None:
      read_config.experimental_interleave_sort_fn = streamed_ops.file_permutation(file_order)
    if one_file_at_a_time:
      read_config.interleave_cycle_length = 1
    ds = self._builder.as_dataset(
      split=split,
      shuffle_files=False,
      read_config=read_config,
      decoders={'image': tfds.decode.SkipDecoding()},
    )
    return ds.map(
      lambda ex: {
        'image': ex['image'],
        'label': tf.cast(ex['label'], tf.int32),
        'index': streamed_ops.dense_ids(ex['tfds_id'], offsets),
      },
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
    )

  def _batches(
    self, ds: tf.data.Dataset, transform, batch_size: int
  ) -> Iterator[dict[str, np.ndarray]]:
    """``transform`` mapped over ``ds``, in full batches (the last partial one dropped)."""
    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()

  def _output(self, image: tf.Tensor, example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Normalises a float32 [S, S, 3] image in [0, 255] and attaches label and index."""
    size = self.image_size
    image = tf.ensure_shape(image, [size, size, 3])
    return {
      'image': (image / 255.0 - self._mean) / self._std,
      'label': example['label'],
      'index': tf.cast(example['index'], tf.int32),
    }


def create(
  input_config: ml_collections.ConfigDict, *, seed: int, process_count: int = 1
) -> StreamedDatasets:
  """Opens a streamed dataset, preparing it first from a manual download if needed.

  Args:
    input_config: ``config.input`` with fields ``dataset`` (a key of ``SPECS``),
      ``data_dir`` (str, or None for the TFDS default), ``num_train_examples`` /
      ``num_test_examples`` (int; -1 for the whole split, else the first N in TFDS order),
      ``augment`` (one of ``base.STREAMED_AUGMENTATIONS``), ``image_size`` (pixels; -1 for
      ``DEFAULT_IMAGE_SIZE``) and ``shuffle_buffer`` (encoded examples, >= 1). The ranges
      of the sizes and of ``shuffle_buffer`` are checked by
      :func:`saf_jax.validation.validate_config`, not here.
    seed: seed of the train order and augmentation.
    process_count: processes of the run; with more than one, an unprepared dataset is
      refused instead of prepared (each would prepare it at once).

  Returns:
    The datasets; ``info.image_shape`` is ``(image_size, image_size, 3)``.

  Raises:
    ValueError: if a field of ``input_config`` has an unsupported value, or asks for more
      examples than a split has.
    DataNotFoundError: if the dataset is not prepared in ``data_dir`` and its manual
      download is not there either.
  """
  name = input_config.dataset
  if name not in SPECS:
    raise ValueError(f'config.input.dataset={name!r} is not streamed; use one of {list(SPECS)}.')
  image_size = input_config.image_size
  if image_size == -1:
    image_size = DEFAULT_IMAGE_SIZE
  shuffle_buffer = input_config.shuffle_buffer
  spec = SPECS[name]
  builder = tfds_prep.ready_builder(
    name, data_dir=input_config.data_dir, process_count=process_count
  )
  train_offsets, num_train = streamed_ops.shard_offsets(builder, spec.train_split)
  test_offsets, num_test = streamed_ops.shard_offsets(builder, spec.test_split)
  sizes = {}
  for split, field, available in (
    (spec.train_split, 'num_train_examples', num_train),
    (spec.test_split, 'num_test_examples', num_test),
  ):
    wanted = input_config[field]
    if available is None and wanted == -1:
      raise ValueError(
        f'The {split} split of {name} records no size in {builder.data_dir}: set '
        f'config.input.{field}.'
      )
    if available is not None and wanted > available:
      raise ValueError(
        f'config.input.{field}={wanted} but the {split} split of {name} has only '
        f'{available} examples.'
      )
    sizes[field] = available if wanted == -1 else wanted
  info = base.DatasetInfo(
    name=name,
    num_train=sizes['num_train_examples'],
    num_test=sizes['num_test_examples'],
    num_classes=builder.info.features['label'].num_classes,
    image_shape=(image_size, image_size, 3),
  )
  logging.info(
    'Streaming %s from %s: %s, shuffle windows of %d examples.',
    name,
    os.fspath(builder.data_dir),
    info,
    shuffle_buffer,
  )
  return StreamedDatasets(
    builder=builder,
    spec=spec,
    info=info,
    train_offsets=train_offsets,
    test_offsets=test_offsets,
    augment=input_config.augment,
    shuffle_buffer=shuffle_buffer,
    seed=seed,
  )

"""The TensorFlow operations of the streamed pipeline, each a pure function of its arguments.

* Ids: :func:`shard_offsets` reads the shard lengths TFDS records, and :func:`dense_ids` turns
  each example's ``tfds_id`` into its position in the split's TFDS order.
* Order: :func:`file_permutation` orders the files and :func:`window_shuffle` permutes
  windows of examples, both from their seed alone (never TensorFlow's global seed).
* Images: :func:`inception_crop` (train) and :func:`center_crop` (evaluation) decode only a
  window of a JPEG and resize it to the served size; :func:`inception_crop_window` and
  :func:`center_crop_window` compute those windows.

``saf_jax.data.streamed`` composes them into its train and test iterators.
"""

import numpy as np

from saf_jax.data.tf_runtime import tf, tfds

# Eval crop: image_size / (image_size + EVAL_CROP_PADDING) of the shorter side (224 of 256).
EVAL_CROP_PADDING = 32

# Inception crop: fraction of the image area and aspect-ratio range (timm's RandomResizedCrop).
_AREA_RANGE = (0.08, 1.0)
_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10

# Stream ids folded into an example's key, one per use of randomness.
_CROP_STREAM = 0
_FLIP_STREAM = 1


def shard_offsets(builder: tfds.core.DatasetBuilder, split: str) -> tuple[np.ndarray, int | None]:
  """First id of each shard of ``split`` and its size; ``([0], None)`` when not recorded.

  ``tfds.testing.mock_data`` records no split: it serves one file whose ids start at 0.

  Returns:
    int64 [shards], the first id of each shard (cumulative shard lengths), and the number
    of examples of the split.
  """
  if split not in builder.info.splits:
    return np.zeros([1], np.int64), None
  lengths = np.asarray(builder.info.splits[split].shard_lengths, np.int64)
  return np.concatenate([[0], np.cumsum(lengths)[:-1]]), int(lengths.sum())


def dense_ids(tfds_id: tf.Tensor, offsets: tf.Tensor) -> tf.Tensor:
  """Maps TFDS example ids to positions in the split's TFDS order.

  Args:
    tfds_id: string tensor of any shape, ids as TFDS writes them with
      ``ReadConfig(add_tfds_id=True)``, e.g. ``b'imagenet2012-train.tfrecord-00007-of-01024__12'``
      (shard 7, 13th example of that shard).
    offsets: int64 [num_shards], the first id of each shard (cumulative shard lengths).

  Returns:
    int64, the same shape: ``offsets[shard] + position in shard``.

  Raises:
    tf.errors.InvalidArgumentError: (when run) for an id not of that form, or a shard
      number outside ``offsets``.
  """
  shard = tf.strings.regex_replace(tfds_id, r'^.*-(\d+)-of-\d+__\d+$', r'\1')
  position = tf.strings.regex_replace(tfds_id, r'^.*__(\d+)$', r'\1')
  shard = tf.strings.to_number(shard, tf.int64)
  return tf.gather(offsets, shard) + tf.strings.to_number(position, tf.int64)


def file_permutation(seed: list[int]):
  """A TFDS ``experimental_interleave_sort_fn`` that orders the files by ``seed`` alone.

  Args:
    seed: non-negative integers, the seed of a numpy permutation.

  Returns:
    A function from TFDS's list of file instructions to the same list, permuted.
  """

  def permute(instructions: list) -> list:
    order = np.random.default_rng(seed).permutation(len(instructions))
    return [instructions[i] for i in order]

  return permute


def window_shuffle(ds: tf.data.Dataset, window: int, seed: list[int]) -> tf.data.Dataset:
  """Shuffles ``ds`` within consecutive windows of ``window`` elements, statelessly.

  Window ``k`` is permuted by ``tf.random.experimental.stateless_shuffle`` with a key from
  ``(seed, k)``, so the result depends on ``seed`` alone, not on TensorFlow's global seed
  (``tf.data.Dataset.shuffle`` mixes that in). Examples never leave their window; with the
  files read in a shuffled order and interleaved, a window holds examples of many files.

  Args:
    ds: a dataset of (nested) tensors of fixed shapes.
    window: elements per window, >= 1; 1 keeps the order.
    seed: non-negative integers.

  Returns:
    The same elements, permuted within each window.
  """
  key = tf.constant(np.random.SeedSequence(seed).generate_state(2, np.uint64) >> 1, tf.int64)

  def permute(k: tf.Tensor, elements):
    n = tf.shape(tf.nest.flatten(elements)[0])[0]
    order = tf.random.experimental.stateless_shuffle(
      tf.range(n), seed=tf.random.experimental.stateless_fold_in(key, k, alg='philox'), alg='philox'
    )
    return tf.nest.map_structure(lambda t: tf.gather(t, order), elements)

  return ds.batch(window).enumerate().map(permute).unbatch()


def inception_crop(jpeg: tf.Tensor, key: tf.Tensor, image_size: int) -> tf.Tensor:
  """Random-resized crop and flip of one JPEG, keyed by ``key``.

  The window of :func:`inception_crop_window`, decoded and resized to ``image_size``
  square, then flipped left-right with probability 1/2.

  Args:
    jpeg: string scalar, the encoded image.
    key: int64 [2], the stateless key of this example's crop and flip.
    image_size: ``S``, the side of the served images, pixels.

  Returns:
    float32 [S, S, 3], pixel values in [0, 255].
  """
  window = inception_crop_window(
    tf.io.extract_jpeg_shape(jpeg),
    tf.random.experimental.stateless_fold_in(key, _CROP_STREAM, alg='philox'),
  )
  image = _decode(jpeg, window, image_size)
  flip_seed = tf.random.experimental.stateless_fold_in(key, _FLIP_STREAM, alg='philox')
  flip = tf.random.stateless_uniform([], seed=flip_seed, alg='philox') < 0.5
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def center_crop(jpeg: tf.Tensor, image_size: int) -> tf.Tensor:
  """The evaluation crop of one JPEG (:func:`center_crop_window`), resized to ``image_size``.

  Returns:
    float32 [S, S, 3], pixel values in [0, 255].
  """
  window = center_crop_window(tf.io.extract_jpeg_shape(jpeg), image_size)
  return _decode(jpeg, window, image_size)


def _decode(jpeg: tf.Tensor, window: tf.Tensor, image_size: int) -> tf.Tensor:
  """Decodes only ``window`` (int32 [4]) of a JPEG, resized bilinearly to [S, S, 3] float32."""
  image = tf.io.decode_and_crop_jpeg(jpeg, window, channels=3)
  return tf.image.resize(image, [image_size, image_size], method='bilinear')


def inception_crop_window(shape: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """The Inception crop's window of an image, drawn statelessly.

  A box of ``_AREA_RANGE`` (8-100%) of the image area with aspect ratio (width / height)
  in ``_ASPECT_RATIO_RANGE`` ([3/4, 4/3]), by
  ``tf.image.stateless_sample_distorted_bounding_box``; the whole image when
  ``_CROP_ATTEMPTS`` (10) draws all fail.

  Args:
    shape: int32 [3], the image's (height, width, channels).
    seed: int [2], the stateless seed.

  Returns:
    int32 [4], ``(top, left, height, width)`` in pixels, for ``tf.io.decode_and_crop_jpeg``.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
    seed=seed,
    min_object_covered=0.0,
    aspect_ratio_range=_ASPECT_RATIO_RANGE,
    area_range=_AREA_RANGE,
    max_attempts=_CROP_ATTEMPTS,
    use_image_if_no_bounding_boxes=True,
  )
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def center_crop_window(shape: tf.Tensor, image_size: int) -> tf.Tensor:
  """The evaluation window: the center square of ``S / (S + 32)`` of the shorter side.

  For an image already resized to a shorter side of ``S + 32`` (256 for ``S = 224``) this
  is exactly the central ``S x S`` crop.

  Args:
    shape: int32 [3], the image's (height, width, channels).
    image_size: ``S``, the side of the served images, pixels.

  Returns:
    int32 [4], ``(top, left, side, side)`` in pixels, rounded down; odd margins put the
    extra pixel above and to the left.
  """
  height, width = shape[0], shape[1]
  fraction = image_size / (image_size + EVAL_CROP_PADDING)
  side = tf.cast(fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
  side = tf.maximum(side, 1)
  return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])

"""tf.data helpers shared by the in-memory and streamed paths: padding, numpy batches."""

from collections.abc import Iterator

import numpy as np

from saf_jax.data.tf_runtime import tf

# Host-side batch builders running in parallel, and batches prepared ahead of use.
_PARALLEL_BATCHES = 2
_PREFETCH_BATCHES = 2


def pad_with_empty_batches(
  batches: tf.data.Dataset, *, num_real: int, batch_size: int, num_batches: int
) -> tf.data.Dataset:
  """Appends empty batches to ``batches`` (of ``num_real`` examples) up to ``num_batches``.

  So that every process yields as many test batches (see
  :func:`saf_jax.data.partition.process_test_block`); each batch is padded to full size
  afterwards.
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


def numpy_batches(ids: tf.data.Dataset, make_batch) -> Iterator[dict[str, np.ndarray]]:
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

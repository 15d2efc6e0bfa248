"""Fashion-MNIST offline: Debian's IDX files written as the TFDS dataset ``fashion_mnist``."""

import gzip
import os
from collections.abc import Iterator

import numpy as np
from absl import logging

from saf_jax.data.tf_runtime import tfds

# IDX type codes (http://yann.lecun.com/exdb/mnist/): multi-byte values are big-endian.
_IDX_DTYPES = {
  0x08: np.dtype(np.uint8),
  0x09: np.dtype(np.int8),
  0x0B: np.dtype('>i2'),
  0x0C: np.dtype('>i4'),
  0x0D: np.dtype('>f4'),
  0x0E: np.dtype('>f8'),
}


_FASHION_MNIST_FILES = {
  'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
  'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}


def has_idx_files(idx_dir: str) -> bool:
  return all(
    os.path.isfile(os.path.join(idx_dir, filename))
    for filenames in _FASHION_MNIST_FILES.values()
    for filename in filenames
  )


def read_idx(path: str) -> np.ndarray:
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


def store(builder: tfds.core.DatasetBuilder, *, idx_dir: str) -> None:
  """Writes Fashion-MNIST from IDX files as the registered TFDS dataset, in IDX order.

  TFDS's own manual-download route rejects Debian's files because they were recompressed
  (different checksums), so the arrays are stored with the registered version and features.
  """
  split_datasets = {}
  for split, (images_file, labels_file) in _FASHION_MNIST_FILES.items():
    images = read_idx(os.path.join(idx_dir, images_file))  # uint8 [N, 28, 28]
    labels = read_idx(os.path.join(idx_dir, labels_file))  # uint8 [N]
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

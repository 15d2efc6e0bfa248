"""Random batches of a dataset's shape, for ``saf_jax.tools.benchmark --synthetic``.

No files and no TensorFlow: the images are drawn once (a pool of 1,024) and batches pick
rows of it at random, with real example ids (a fresh permutation per epoch), so SAF's table
reads and writes are those of the real dataset.
"""

import numpy as np

from saf_jax.data import base

# Shapes of the datasets the pipeline serves, for --synthetic (no TFDS needed).
SHAPES = {
  'fashion_mnist': {'num_train': 60000, 'num_classes': 10, 'shape': (28, 28, 1)},
  'cifar10': {'num_train': 50000, 'num_classes': 10, 'shape': (32, 32, 3)},
  'cifar100': {'num_train': 50000, 'num_classes': 100, 'shape': (32, 32, 3)},
  # Square side from config.input.image_size (224 in configs/imagenet.py). SAF's table is
  # then the real one: 1,281,167 x 1000 logits x (E_tilde + 1) epochs on the host.
  'imagenet2012': {'num_train': 1281167, 'num_classes': 1000, 'shape': (224, 224, 3)},
}


class SyntheticDatasets:
  """Random images and labels of a dataset's shape; a fresh permutation of ids per epoch."""

  def __init__(self, dataset: str, seed: int, image_size: int = -1):
    spec = SHAPES[dataset]
    shape = spec['shape']
    if dataset == 'imagenet2012' and image_size > 0:
      shape = (image_size, image_size, 3)
    self.info = base.DatasetInfo(
      name=f'synthetic-{dataset}',
      num_train=spec['num_train'],
      num_test=0,
      num_classes=spec['num_classes'],
      image_shape=shape,
    )
    self._rng = np.random.default_rng(seed)
    self._pool = self._rng.normal(size=(1024, *shape)).astype(np.float32)

  def train_epoch(self, epoch, *, batch_size, start_batch=0, process_index=0, process_count=1):
    """Batches of ``batch_size`` of one epoch, from ``start_batch`` on (one process only).

    Raises:
      ValueError: for ``process_count > 1`` (the synthetic set is for one process).
    """
    if process_count != 1 or process_index != 0:
      raise ValueError(f'--synthetic runs one process, got process_count={process_count}.')
    ids = np.random.default_rng(epoch).permutation(self.info.num_train).astype(np.int32)
    first = start_batch * batch_size
    for start in range(first, len(ids) - batch_size + 1, batch_size):
      rows = self._rng.integers(0, len(self._pool), batch_size)
      yield {
        'image': self._pool[rows],
        'label': self._rng.integers(0, self.info.num_classes, batch_size).astype(np.int32),
        'index': ids[start : start + batch_size],
      }


def create(input_config, *, seed: int) -> SyntheticDatasets:
  """Synthetic batches of ``input_config.dataset``'s shape (``image_size`` for ImageNet).

  Raises:
    ValueError: if the dataset is not in :data:`SHAPES`.
  """
  if input_config.dataset not in SHAPES:
    raise ValueError(
      f'--synthetic knows config.input.dataset in {sorted(SHAPES)}, got {input_config.dataset!r}.'
    )
  return SyntheticDatasets(input_config.dataset, seed, input_config.image_size)

"""What every input path shares: dataset names, ``DatasetInfo``, the ``Datasets`` interface.

No TensorFlow and no JAX here: ``saf_jax.data`` imports this module eagerly, and the
backends (``memory``, ``streamed``, ``synthetic``) only when a dataset is created.
"""

import dataclasses
from collections.abc import Iterator
from typing import Protocol

import numpy as np

from saf_jax.config_rules import Rule, check, int_at_least, is_int

# Where Debian's `dataset-fashion-mnist` package installs the Fashion-MNIST IDX files.
FASHION_MNIST_IDX_DIR = '/usr/share/datasets/fashion-mnist'
# config.input.dataset = FOLDER_PREFIX + root: an image folder or archive (saf_jax.data.folder).
FOLDER_PREFIX = 'folder:'

AUGMENTATIONS = ('none', 'flip', 'crop_flip')
# TFDS datasets streamed from their files instead of held in memory (saf_jax.data.streamed),
# and their augmentations.
STREAMED_DATASETS = ('imagenet2012',)
STREAMED_AUGMENTATIONS = ('inception_crop', 'none')

# Per-channel mean and standard deviation of the train split's pixels, in [0, 1] units (the std
# is over all pixels, not the mean of per-image stds).
CHANNEL_STATS = {
  'fashion_mnist': ((0.2860,), (0.3530,)),
  'mnist': ((0.1307,), (0.3081,)),
  'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
  'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
# TFDS names this pipeline holds in memory (it knows their normalisation constants).
IN_MEMORY_DATASETS = tuple(sorted(CHANNEL_STATS))
# Every TFDS name create_datasets serves.
DATASETS = IN_MEMORY_DATASETS + STREAMED_DATASETS


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


def augmentations(dataset: str) -> tuple[str, ...]:
  """The values of ``config.input.augment`` that ``dataset`` (a TFDS name or folder) takes."""
  return STREAMED_AUGMENTATIONS if dataset in STREAMED_DATASETS else AUGMENTATIONS


def _dataset_is_known(dataset) -> bool:
  return dataset in DATASETS or (isinstance(dataset, str) and dataset.startswith(FOLDER_PREFIX))


IMAGE_SIZE_RULE = Rule(
  'input.image_size',
  lambda x: is_int(x) and (x == -1 or x >= 1),
  '-1 (keep the images) or an integer >= 1 (pixels)',
)

# The rules of the config.input fields that only the input pipeline reads, in the order
# they are checked (saf_jax.config_rules); validation.validate_config applies them too.
INPUT_RULES = (
  Rule('input.dataset', _dataset_is_known, f"one of {list(DATASETS)} or '{FOLDER_PREFIX}/path'"),
  IMAGE_SIZE_RULE,
  Rule(
    'input.augment',
    lambda x, config, context: x in augmentations(config['input']['dataset']),
    lambda config, context: (
      f'one of {list(augmentations(config["input"]["dataset"]))} for dataset '
      f'{config["input"]["dataset"]!r}'
    ),
    cross_field=True,
  ),
  Rule('input.crop_padding', int_at_least(0), 'an integer >= 0 (pixels)'),
  Rule('input.shuffle_buffer', int_at_least(1), 'an integer >= 1 (examples)'),
)


def check_input(input_config) -> None:
  """Raises ``ValueError`` naming the first field of ``config.input`` that ``INPUT_RULES`` refuse.

  Raises:
    ValueError: ``config.input.<field> must be <allowed values>, got <value>.``
  """
  check({'input': input_config}, INPUT_RULES)


class Datasets(Protocol):
  """The training inputs' interface: ``memory.InMemoryDatasets``, ``streamed.StreamedDatasets``.

  (The benchmark's ``synthetic.SyntheticDatasets`` serves one process's ``train_epoch``
  only, in an order drawn from the epoch alone.)

  ``train_epoch`` yields one process's batches of an epoch, each a dict of numpy arrays:
  ``'image'`` float32 [B, H, W, C] (normalised, augmented), ``'label'`` and ``'index'``
  int32 [B], the index being the example's stable id in ``[0, info.num_train)``; the
  order depends on ``(seed, epoch)`` only. ``test_batches`` yields the test (or, for
  ``split='train'``, the unaugmented train) examples in order, each batch padded to
  ``batch_size`` with ``'mask'`` float32 [B] 1 on real rows. ``train_subset_batches``
  yields a fixed unaugmented subset for the sharpness tools.
  """

  info: DatasetInfo

  def train_epoch(
    self,
    epoch: int,
    *,
    batch_size: int,
    start_batch: int = 0,
    process_index: int = 0,
    process_count: int = 1,
  ) -> Iterator[dict[str, np.ndarray]]: ...

  def test_batches(
    self, *, batch_size: int, split: str = 'test', process_index: int = 0, process_count: int = 1
  ) -> Iterator[dict[str, np.ndarray]]: ...

  def train_subset_batches(
    self, *, num_batches: int, batch_size: int, seed: int
  ) -> Iterator[dict[str, np.ndarray]]: ...

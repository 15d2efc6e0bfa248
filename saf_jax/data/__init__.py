r"""Every input path, one interface: the train epochs, test batches and subsets SAF trains on.

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
* ``'flip'``: random horizontal flip. Use for Fashion-MNIST.
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

  datasets = data.create_datasets(config.input, seed=config.seed)
  for epoch in range(1, config.total_epochs + 1):
    for batch in datasets.train_epoch(epoch, batch_size=128):
      ...  # batch['image']: float32 [128, H, W, C]; batch['label'], batch['index']: int32 [128]
  for batch in datasets.test_batches(batch_size=1000):
    ...  # plus batch['mask']: float32 [1000], 0 on padding rows

The modules (none imports another backend, and none imports JAX itself):

* ``base``: names, ``DatasetInfo``, the ``Datasets`` interface (no TensorFlow).
* ``partition``: the id blocks of each process (no TensorFlow).
* ``memory``: TFDS splits and image folders held in memory (above).
* ``folder``: image folders and their archives, decoded (and cached) to arrays.
* ``streamed``: ImageNet streamed from its TFDS files, ids from ``tfds_id``.
* ``streamed_ops``: the TensorFlow operations of ``streamed``: ids from ``tfds_id``, stateless
  file and window shuffles, JPEG crops.
* ``synthetic``: random batches of a dataset's shape, for the benchmark.
* ``tfds_prep``: a TFDS dataset made ready, or ``DataNotFoundError`` saying how.
* ``fashion_mnist``: Debian's Fashion-MNIST IDX files written as a TFDS dataset.
* ``batching``: tf.data padding and numpy batches, shared by ``memory`` and ``streamed``.
* ``tf_runtime``: TensorFlow imported quietly, off the GPUs.

Importing ``saf_jax.data`` imports neither TensorFlow nor a backend; ``create_datasets``
imports the one it needs.

References:
  Du et al, `Sharpness-Aware Training for Free <https://arxiv.org/abs/2205.14083>`_, 2022.
"""

from saf_jax.data.base import (
  AUGMENTATIONS,
  DATASETS,
  FASHION_MNIST_IDX_DIR,
  FOLDER_PREFIX,
  IMAGE_SIZE_RULE,
  IN_MEMORY_DATASETS,
  INPUT_RULES,
  STREAMED_AUGMENTATIONS,
  STREAMED_DATASETS,
  DataNotFoundError,
  DatasetInfo,
  Datasets,
  augmentations,
  check_input,
)

__all__ = [
  'AUGMENTATIONS',
  'DATASETS',
  'FASHION_MNIST_IDX_DIR',
  'FOLDER_PREFIX',
  'IMAGE_SIZE_RULE',
  'IN_MEMORY_DATASETS',
  'INPUT_RULES',
  'STREAMED_AUGMENTATIONS',
  'STREAMED_DATASETS',
  'DataNotFoundError',
  'DatasetInfo',
  'Datasets',
  'augmentations',
  'check_input',
  'create_datasets',
  'ready_builder',
]


def create_datasets(
  input_config,
  *,
  seed: int,
  fashion_mnist_idx_dir: str = FASHION_MNIST_IDX_DIR,
  process_count: int = 1,
) -> Datasets:
  """The datasets of ``config.input``: ImageNet streamed, anything else held in memory.

  Args:
    input_config: ``config.input`` (``dataset``, ``data_dir``, ``num_train_examples``,
      ``num_test_examples``, ``augment``, ``crop_padding``, ``image_size``, and for
      ImageNet ``shuffle_buffer``).
    seed: seed of the train order and augmentation.
    fashion_mnist_idx_dir: Debian's Fashion-MNIST IDX files, written as the TFDS dataset
      when it is not prepared.
    process_count: processes of the run; with more than one, an unprepared ImageNet is
      refused rather than prepared by each process at once.

  Returns:
    ``memory.InMemoryDatasets`` or ``streamed.StreamedDatasets``: the ``Datasets``
    interface, with ``info`` describing what is served.

  Raises:
    ValueError: for a field that ``INPUT_RULES`` refuse (``check_input``, before anything
      is read), or if the data cannot serve ``input_config`` (e.g. more examples asked
      for than a split has).
    DataNotFoundError: if the dataset is not prepared in ``data_dir`` and cannot be
      provided from local files or downloaded.
  """
  check_input(input_config)
  if input_config.dataset in STREAMED_DATASETS:
    from saf_jax.data import streamed

    return streamed.create(input_config, seed=seed, process_count=process_count)
  from saf_jax.data import memory

  return memory.create(input_config, seed=seed, fashion_mnist_idx_dir=fashion_mnist_idx_dir)


def ready_builder(name: str, *, data_dir: str | None = None, **kwargs):
  """``tfds_prep.ready_builder``: the TFDS builder of ``name``, prepared (see there)."""
  from saf_jax.data import tfds_prep

  return tfds_prep.ready_builder(name, data_dir=data_dir, **kwargs)

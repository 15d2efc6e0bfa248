"""Which examples each process reads: the fixed id blocks of training and test (no TF, no JAX)."""


def process_partition(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """The fixed block of training example ids that one process reads in every epoch.

  With ``P`` processes, process ``p`` owns ids ``[p * n, (p + 1) * n)`` with
  ``n = num_examples // P``; the last ``num_examples % P`` ids (fewer than ``P``) are
  never read. Because the block never changes, the process that writes an example's row of
  SAF's logit table is the one that reads it back ``E_tilde`` epochs later, so each
  process's host-side table is exact and holds ``n`` rows (``saf_jax.logit_table``).

  Args:
    num_examples: training examples in the dataset.
    process_index: ``p`` in ``[0, P)``.
    process_count: ``P >= 1``.

  Returns:
    ``(first_id, num_ids)``.

  Raises:
    ValueError: if ``p`` is out of range or a block would be empty.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index must be in [0, {process_count}), got {process_index}.')
  num_ids = num_examples // process_count
  if num_ids < 1:
    raise ValueError(
      f'{num_examples} training examples cannot be split over {process_count} processes.'
    )
  return process_index * num_ids, num_ids


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
    ``(first_id, num_ids, num_batches)``: the ids ``process_partition(num_train,
    process_index, process_count)`` and the ``num_ids // batch_size`` batches of an epoch.

  Raises:
    ValueError: if ``epoch < 1``, ``batch_size`` is not in ``[1, num_ids]`` or
      ``start_batch`` is not in ``[0, num_batches]``.
  """
  if epoch < 1:
    raise ValueError(f'Epochs count from 1, got epoch={epoch}.')
  first_id, num_ids = process_partition(num_train, process_index, process_count)
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

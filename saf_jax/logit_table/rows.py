"""A table array assembled along its row axis from blocks that stay where they are.

A host table's checkpoint is one block of rows per process (``saf_jax.table_files``). A
run resumed on another number of processes takes each new process's rows from pieces of
the old blocks, plus rows that no old block held (never written). :class:`RowBlocks` is
that concatenation without a copy: its blocks may be views of memory-mapped files, and
``LogitTable.load_state_dict`` copies them into the table block by block, so a table
larger than RAM is never read into memory whole.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from saf_jax.logit_table import layout


class RowBlocks:
  """One table array, ``np.concatenate(blocks, axis=1)``, left unconcatenated.

  Attributes:
    blocks: arrays [E_tilde, rows_i, ...] of one dtype, alike but in axis 1 (the rows).
    shape: the concatenation's shape, [E_tilde, sum of rows_i, ...].
    dtype: the blocks' dtype.
  """

  def __init__(self, blocks: Sequence[np.ndarray]):
    """Raises ValueError without blocks, or if they differ in dtype or in another axis than 1."""
    if not blocks:
      raise ValueError('RowBlocks needs at least one block.')
    first = blocks[0]
    for block in blocks:
      if block.ndim < 2 or block.dtype != first.dtype or _other_axes(block) != _other_axes(first):
        raise ValueError(
          f'Row blocks must differ in axis 1 alone; got {block.dtype} {block.shape} and '
          f'{first.dtype} {first.shape}.'
        )
    self.blocks = list(blocks)
    self.dtype = first.dtype
    self.shape = (first.shape[0], sum(b.shape[1] for b in blocks), *first.shape[2:])

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    """The concatenation, in memory (NumPy's array protocol)."""
    del copy  # Always a new array.
    whole = np.concatenate(self.blocks, axis=1)
    return whole if dtype is None else whole.astype(dtype, copy=False)


def _other_axes(array: np.ndarray) -> tuple[int, ...]:
  return (array.shape[0], *array.shape[2:])


def never_written(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """Rows of the layout's array ``name`` as a new table holds them: ``written_epoch``
  ``NEVER_WRITTEN``, every other array zeros."""
  return np.full(shape, layout.NEVER_WRITTEN if name == 'written_epoch' else 0, dtype)


def select_rows(
  name: str, first_id: int, like: Any, blocks: Sequence[tuple[int, np.ndarray]]
) -> RowBlocks:
  """The rows of ids ``[first_id, first_id + num_rows)`` of array ``name``, from blocks
  that hold other id ranges.

  Args:
    name: the layout's array name (``'values'``, ``'written_epoch'``, ...).
    first_id: the first id wanted, >= 0.
    like: the result's shape [E_tilde, num_rows, ...] and dtype (an array, or a
      ``jax.ShapeDtypeStruct``); the blocks' must agree but in axis 1.
    blocks: ``(first id, array [E_tilde, rows, ...])`` per saved block, any number; their
      id ranges are disjoint.

  Returns:
    A ``RowBlocks`` like ``like``: views of the blocks (no copy; a memory-mapped block stays
    mapped) and, for ids that no block holds, new never-written rows (:func:`never_written`).

  Raises:
    ValueError: if the blocks' id ranges overlap, or their dtype or other axes differ.
  """
  shape, dtype = tuple(like.shape), np.dtype(like.dtype)
  end, at, previous_stop, pieces = first_id + shape[1], first_id, 0, []

  def gap(num_rows: int) -> np.ndarray:
    return never_written(name, (shape[0], num_rows, *shape[2:]), dtype)

  for start, array in sorted(blocks, key=lambda block: block[0]):
    if start < previous_stop:
      raise ValueError(f'Saved blocks of {name!r} overlap at id {start}.')
    previous_stop = start + array.shape[1]
    low, high = max(start, at), min(previous_stop, end)
    if low >= high:
      continue
    if low > at:
      pieces.append(gap(low - at))
    pieces.append(array[:, low - start : high - start])
    at = high
  if at < end:
    pieces.append(gap(end - at))
  result = RowBlocks(pieces)
  if result.shape != shape or result.dtype != dtype:
    raise ValueError(
      f'Saved blocks of {name!r} are {result.dtype} {result.shape}; need {dtype} {shape}.'
    )
  return result


def blocks_of(array) -> list[np.ndarray]:
  """A ``RowBlocks``' blocks, or ``[np.asarray(array)]`` (no copy for an ndarray or memmap)."""
  return list(array.blocks) if isinstance(array, RowBlocks) else [np.asarray(array)]


def copy_into(out: np.ndarray, array) -> None:
  """``out[...] = array``, cast to ``out``'s dtype, one block of rows at a time.

  Raises:
    ValueError: if the shapes differ.
  """
  if np.shape(array) != out.shape:
    raise ValueError(f'Cannot copy rows of shape {np.shape(array)} into {out.shape}.')
  start = 0
  for block in blocks_of(array):
    out[:, start : start + block.shape[1]] = block  # Cast as copied, never whole in RAM.
    start += block.shape[1]

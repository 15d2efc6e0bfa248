r"""SAF's per-example logit table on the host: NumPy arrays in RAM or memory-mapped files.

:class:`LogitTable` stores the arrays of one layout of :mod:`saf_jax.logit_table.layout`
and runs its codecs on the host: top-k and int8 compression when a row is written, the
reconstruction of float32 targets when it is read. ``write_async`` hands a device array's
transfer and the write to a background thread, so the training step does not wait for it.

Ordering contract with the training loop: within one epoch every example appears at
most once, so a read (done when the batch is prefetched) and the write of the same
example (after its step) cannot be reordered against another batch of that epoch. At
an epoch boundary the loop calls :meth:`LogitTable.flush` before reading the next
epoch, so that ``E_tilde = 1`` sees all of the previous epoch's writes.

With ``memmap_dir`` the arrays live in ``.npy`` files and the operating system pages them,
for tables larger than RAM (:func:`saf_jax.logit_table.layout.table_nbytes` gives their size).

References:
  Du et al, `Sharpness-Aware Training for Free <https://arxiv.org/abs/2205.14083>`_, 2022
"""

import os
import queue
import threading

import jax
import numpy as np

from saf_jax.logit_table import layout, rows


class LogitTable:
  """Host-side ring of past logits indexed by stable example id.

  Attributes:
    num_examples: rows per slot; valid ids are [first_id, first_id + num_examples).
    num_classes: the width of the logits, K.
    E_tilde: number of epochs between writing a row and reading it back.
    dtype: numpy storage dtype of the logits: float32, bfloat16, or uint8 (the codes of
      ``'int8'`` storage); targets are returned as float32.
    first_id: the example id of row 0.
    topk: 0 (full logits stored) or the number k of logits kept per row.
    tau: the trajectory loss's temperature used by top-k storage; None for full storage.
    memmap_dir: the directory of the ``.npy`` files, or None (arrays in RAM).

  The arrays themselves (``values``, ``written_epoch``, ...: the layout's, see
  :mod:`saf_jax.logit_table.layout`) are those :meth:`state_dict` returns.
  """

  def __init__(
    self,
    num_examples: int,
    num_classes: int,
    *,
    E_tilde: int,
    dtype: str = 'float32',
    first_id: int = 0,
    topk: int = 0,
    tau: float | None = None,
    memmap_dir: str | None = None,
  ):
    """Creates an empty table (every row never written).

    Args:
      num_examples: number of training examples (ids) this table holds, > 0.
      num_classes: number of logits per example, > 0.
      E_tilde: :math:`\\tilde E \\ge 1`, the look-back in epochs (Eq. 9).
      dtype: storage dtype name: 'float32' (default), 'bfloat16' (half the memory) or
        'int8' (a quarter, plus 8 bytes per row): uint8 codes of a per-row affine map, read
        back with an error of at most half the row's ``row_scale`` per logit
        (:mod:`saf_jax.logit_table.layout`). Applies to the kept logits with ``topk > 0``.
      first_id: the first example id held, >= 0: this process's partition is
        ``[first_id, first_id + num_examples)`` of the global ids.
      topk: 0 (default) stores every logit; ``k`` in ``[1, num_classes)`` stores the k
        largest logits per row, their class ids and the tail's log-sum-exp
        (:mod:`saf_jax.logit_table.layout`), exact for the top-k softened probabilities and
        the tail's total mass.
      tau: :math:`\\tau > 0`, the trajectory loss's temperature (``config.method.saf.tau``);
        required when ``topk > 0``, since the tail is summarised at that temperature.
      memmap_dir: if given, the arrays are ``.npy`` files in this directory (created if
        missing), memory-mapped so the OS pages them. Existing files of the same names are
        overwritten: the table starts empty. Use one directory per table (per process).

    Raises:
      ValueError: on a non-positive size, ``E_tilde < 1``, an unknown ``dtype``, a negative
        ``first_id``, ``topk`` outside ``{0} U [1, num_classes)``, or ``topk > 0`` without
        a ``tau > 0``.
    """
    layout.check_layout(num_examples, num_classes, E_tilde, dtype, topk)
    if first_id < 0:
      raise ValueError(f'LogitTable needs first_id >= 0, got {first_id}.')
    if topk and (tau is None or not tau > 0):
      raise ValueError(
        f'config.method.saf.tau must be > 0 when config.method.saf.table_topk > 0 (the tail '
        f'is summarised at the loss temperature), got {tau}.'
      )
    self.num_examples = int(num_examples)
    self.num_classes = int(num_classes)
    self.E_tilde = int(E_tilde)
    self.dtype = layout.DTYPES[dtype]
    self._int8 = dtype == 'int8'
    self.first_id = int(first_id)
    self.topk = int(topk)
    self.tau = float(tau) if topk else None
    self.memmap_dir = memmap_dir
    specs = layout.array_specs(
      self.num_examples, self.num_classes, E_tilde=self.E_tilde, dtype=dtype, topk=self.topk
    )
    if memmap_dir is not None:
      os.makedirs(memmap_dir, exist_ok=True)
    self._arrays: dict[str, np.ndarray] | None = {
      name: self._new_array(name, shape, dt) for name, (shape, dt) in specs.items()
    }
    self._arrays['written_epoch'][...] = layout.NEVER_WRITTEN
    self._queue: queue.Queue = queue.Queue(maxsize=64)
    self._error: BaseException | None = None
    self._writer: threading.Thread | None = None

  def _new_array(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if self.memmap_dir is None:
      return np.zeros(shape, dtype)
    # .npy has no bfloat16: its file holds the uint16 bit patterns (np.load(...).view(bfloat16)).
    file_dtype = np.dtype(np.uint16) if dtype == layout.DTYPES['bfloat16'] else dtype
    path = os.path.join(self.memmap_dir, f'{name}.npy')
    # Mode 'w+' truncates an existing file: a new table is empty (zeros), never stale rows.
    return np.lib.format.open_memmap(path, mode='w+', dtype=file_dtype, shape=shape).view(dtype)

  def _live(self) -> dict[str, np.ndarray]:
    if self._arrays is None:
      raise RuntimeError('This SAF LogitTable was closed.')
    return self._arrays

  @property
  def nbytes(self) -> int:
    """Bytes of the table's arrays (in RAM, or on disk with ``memmap_dir``); see
    :func:`saf_jax.logit_table.layout.table_nbytes`."""
    return int(sum(a.nbytes for a in self._live().values()))

  def _slot(self, epoch: int) -> int:
    if epoch < 1:
      raise ValueError(f'Epochs count from 1; got epoch={epoch}.')
    return epoch % self.E_tilde

  def _check_ids(self, ids: np.ndarray) -> np.ndarray:
    """Checks global ids; returns their rows (ids - first_id), int64 [batch]
    (:func:`saf_jax.logit_table.layout.check_ids`)."""
    return layout.check_ids(ids, self.first_id, self.num_examples)

  def _check_logits_shape(self, ids: np.ndarray, logits) -> None:
    if tuple(logits.shape) != (ids.size, self.num_classes):
      raise ValueError(
        f'Logits of shape {tuple(logits.shape)} do not match {ids.size} ids x '
        f'{self.num_classes} classes of the SAF table.'
      )

  def gather(self, ids: np.ndarray, *, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Reads the targets of epoch ``epoch`` (Algorithm 1, line 5; Eq. 9).

    With top-k storage the targets are reconstructed: the stored top-k logits, and
    :math:`\\tau (\\mathrm{rest\\_lse} - \\log(K - k))` on every other class
    (:mod:`saf_jax.logit_table.layout`). With int8 storage the (kept) logits are
    ``codes * row_scale + row_min``.

    Args:
      ids: int [batch], global example ids in [first_id, first_id + num_examples), distinct.
      epoch: the current epoch, counted from 1.

    Returns:
      ``(target_logits, target_mask)``: float32 [batch, num_classes], the logits written
      for these examples in epoch ``epoch - E_tilde`` (0 where invalid), and float32
      [batch], 1 where that row was written in exactly that epoch, else 0.

    Raises:
      ValueError: ids out of range (not in this process's partition), repeated, or not a
        1-D integer array.
    """
    rows = self._check_ids(ids)
    slot = self._slot(epoch)
    arrays = self._live()
    mask = arrays['written_epoch'][slot, rows] == epoch - self.E_tilde
    kept = arrays['topk_values' if self.topk else 'values'][slot, rows]  # A copy.
    if self._int8:
      kept = layout.dequantise_int8(
        kept, arrays['row_min'][slot, rows], arrays['row_scale'][slot, rows]
      )
    if self.topk:
      targets = layout.reconstruct_topk(
        kept,
        arrays['topk_ids'][slot, rows],
        arrays['rest_lse'][slot, rows],
        num_classes=self.num_classes,
        tau=self.tau,
      )
    else:
      targets = kept.astype(np.float32, copy=False)
    targets[~mask] = 0.0  # Never used: masked out of the loss.
    return targets, mask.astype(np.float32)

  def write(self, ids: np.ndarray, logits, *, epoch: int) -> None:
    """Records the training forward's logits for epoch ``epoch`` (Algorithm 1, line 4).

    With top-k or int8 storage the logits are compressed here, on the host
    (:mod:`saf_jax.logit_table.layout`).

    Args:
      ids: int [batch], global example ids in [first_id, first_id + num_examples), distinct.
      logits: float [batch, num_classes] (numpy or jax array), this step's own logits.
      epoch: the current epoch, counted from 1.

    Raises:
      ValueError: ids out of range (not in this process's partition) or repeated, or
        ``logits`` whose shape disagrees with ``ids`` or with the table's ``num_classes``.
    """
    rows = self._check_ids(ids)
    logits = np.asarray(logits)
    self._check_logits_shape(rows, logits)
    slot = self._slot(epoch)
    arrays = self._live()
    kept = logits
    if self.topk:
      kept, top_ids, rest_lse = layout.compress_topk(logits, k=self.topk, tau=self.tau)
      arrays['topk_ids'][slot, rows] = top_ids
      arrays['rest_lse'][slot, rows] = rest_lse
    name = 'topk_values' if self.topk else 'values'
    if self._int8:
      codes, row_min, row_scale = layout.quantise_int8(kept)
      arrays[name][slot, rows] = codes
      arrays['row_min'][slot, rows] = row_min
      arrays['row_scale'][slot, rows] = row_scale
    else:
      arrays[name][slot, rows] = kept.astype(self.dtype)
    arrays['written_epoch'][slot, rows] = epoch

  def write_async(self, ids: np.ndarray, logits: jax.Array, *, epoch: int) -> None:
    """Like :meth:`write`, but returns at once; a background thread waits for ``logits``.

    The ids are checked here, in the caller's thread. An error raised by a write in the
    background is re-raised by the next call to this method or to :meth:`flush`.
    """
    self._raise_pending()
    rows = self._check_ids(ids)
    self._check_logits_shape(rows, logits)  # Shapes are known before the values are.
    if self._writer is None or not self._writer.is_alive():
      self._writer = threading.Thread(target=self._drain, name='saf-table-writer', daemon=True)
      self._writer.start()
    if isinstance(logits, jax.Array):
      logits.copy_to_host_async()
    self._queue.put((ids, logits, epoch))

  def _drain(self) -> None:
    while True:
      ids, logits, epoch = self._queue.get()
      try:
        if self._error is None:
          self.write(ids, logits, epoch=epoch)
      except BaseException as e:  # Re-raised in the caller's thread.
        self._error = e
      finally:
        self._queue.task_done()

  def _raise_pending(self) -> None:
    if self._error is not None:
      error, self._error = self._error, None
      raise error

  def flush(self) -> None:
    """Blocks until every queued write has landed; re-raises a background error.

    Memory-mapped files are not synced to disk here (see :meth:`state_dict`, :meth:`close`).
    """
    self._queue.join()
    self._raise_pending()

  def _sync_files(self) -> None:
    for array in self._live().values():
      if isinstance(array, np.memmap):
        array.flush()

  def close(self) -> None:
    """Lands queued writes, syncs memory-mapped files to disk and releases the arrays.

    The files in ``memmap_dir`` are kept. Any later use of the table raises RuntimeError.
    """
    if self._arrays is None:
      return
    self.flush()
    self._sync_files()
    self._arrays = None

  def valid_fraction(self, epoch: int) -> float:
    """Share of all examples whose target for ``epoch`` is valid (diagnostics)."""
    slot = self._slot(epoch)
    return float(np.mean(self._live()['written_epoch'][slot] == epoch - self.E_tilde))

  def state_dict(self) -> dict[str, np.ndarray]:
    """The arrays to checkpoint, after every queued write has landed.

    Returns:
      ``{'values', 'written_epoch'}`` (full storage) or ``{'topk_values', 'topk_ids',
      'rest_lse', 'written_epoch'}`` (top-k), plus ``'row_min'`` and ``'row_scale'`` with
      ``dtype='int8'``, with the shapes and dtypes of :mod:`saf_jax.logit_table.layout`: the
      table's own arrays (memmaps, synced to disk, with ``memmap_dir``), so also a valid
      abstract target for restoring a checkpoint, and the way to inspect them.
    """
    self.flush()
    self._sync_files()
    return dict(self._live())

  def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
    """Restores the arrays of :meth:`state_dict` into this table.

    Copies into the table's existing arrays (memory-mapped files stay memory-mapped); logits
    are cast to this table's ``dtype`` (float32 and bfloat16 convert into each other; int8
    codes only load into an int8 table, whose keys differ). An array may be a
    :class:`saf_jax.logit_table.rows.RowBlocks` (rows gathered from another process
    count's checkpoint files): it is copied one block at a time, never whole into RAM.

    Raises:
      ValueError: if the keys are another layout's (full vs top-k storage, or int8 vs
        float32/bfloat16), if their shapes are not this table's (another ``num_examples``,
        ``num_classes``, ``topk`` or ``E_tilde``), if an int8 table's codes are not uint8,
        or if stored class ids are not below ``num_classes``.
    """
    self.flush()
    own = self._live()
    if set(arrays) != set(own):
      raise ValueError(
        f'Restored SAF table has arrays {sorted(arrays)} ({layout.describe(arrays)}); this '
        f'table stores {layout.describe(own)} in {sorted(own)}: config.method.saf.table_topk '
        'or config.method.saf.table_dtype differs from the checkpoint.'
      )
    got = {name: tuple(np.shape(arrays[name])) for name in own}
    need = {name: own[name].shape for name in own}
    if got != need:
      raise ValueError(
        f'Restored SAF table has shapes {got}; this run needs {need} (num_examples, '
        'num_classes, table_topk or E_tilde differ).'
      )
    name = 'topk_values' if self.topk else 'values'
    codes_dtype = rows.blocks_of(arrays[name])[0].dtype
    if self._int8 and codes_dtype != np.uint8:
      raise ValueError(
        f'Restored SAF table has {name!r} of dtype {codes_dtype}; this '
        'int8 table (config.method.saf.table_dtype) needs uint8 codes.'
      )
    if self.topk:
      ids = rows.blocks_of(arrays['topk_ids'])
      low, high = min(b.min() for b in ids), max(b.max() for b in ids)
      if low < 0 or high >= self.num_classes:
        raise ValueError(
          f'Restored SAF table has class ids in [{low}, {high}]; this run has '
          f'{self.num_classes} classes (num_classes differ).'
        )
    for name, array in own.items():
      rows.copy_into(array, arrays[name])  # In place.

r"""SAF's per-example memory of past logits, kept on the host.

SAF (Algorithm 1 of Du et al. 2022) records the training forward pass's own logits
for every example (line 4) and, :math:`\tilde E` epochs later, reads them back as the
target of the trajectory loss (line 5, Eq. 9). This module is that record::

  values:        [E_tilde, num_examples, num_classes]   (float32 or bfloat16)
  written_epoch: [E_tilde, num_examples]  int32, NEVER_WRITTEN = never written

In epoch ``e`` example ``i`` uses slot ``e % E_tilde``: its row is *read* (the logits
written in epoch ``e - E_tilde``) before the same slot is *overwritten* with epoch ``e``'s
logits. Only :math:`\tilde E` slots are needed, not :math:`\tilde E + 1`. A row whose
``written_epoch`` is not exactly ``e - E_tilde`` (never seen, dropped by
``drop_remainder`` in that epoch, or the first epochs) is masked out of the loss: it
is never used as a zero or uniform target.

Ordering contract with the training loop: within one epoch every example appears at
most once, so a read (done when the batch is prefetched) and the write of the same
example (after its step) cannot be reordered against another batch of that epoch. At
an epoch boundary the loop calls :meth:`LogitTable.flush` before reading the next
epoch, so that ``E_tilde = 1`` sees all of the previous epoch's writes.

Wiring::

  table = LogitTable(num_examples=60000, num_classes=10, E_tilde=3)
  for epoch in range(1, num_epochs + 1):
    for batch in batches(epoch):
      batch['target_logits'], batch['target_mask'] = table.gather(batch['index'], epoch=epoch)
      state, metrics, logits = saf_step(state, batch)     # logits: the step's own
      table.write_async(batch['index'], logits, epoch=epoch)  # no device sync here
    table.flush()

The table holds every training example of this process. Multi-host partitioning is
described in the README (issue "Scale out").
"""

import queue
import threading

import jax
import ml_dtypes
import numpy as np

# Below any epoch - E_tilde: a never-written row is never valid (-1 would be at e = E_tilde - 1).
NEVER_WRITTEN = np.iinfo(np.int32).min

_DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16)}


class LogitTable:
  """Host-side ring of past logits indexed by stable example id.

  Attributes:
    num_examples: rows per slot; valid ids are [0, num_examples).
    num_classes: columns, the width of the logits.
    E_tilde: number of epochs between writing a row and reading it back.
    dtype: numpy storage dtype (float32 or bfloat16); targets are returned as float32.
  """

  def __init__(
    self,
    num_examples: int,
    num_classes: int,
    *,
    E_tilde: int,
    dtype: str = 'float32',
  ):
    """Creates an empty table (every row never written).

    Args:
      num_examples: number of training examples (ids), > 0.
      num_classes: number of logits per example, > 0.
      E_tilde: :math:`\\tilde E \\ge 1`, the look-back in epochs (Eq. 9).
      dtype: storage dtype name, 'float32' (default) or 'bfloat16' (half the memory).

    Raises:
      ValueError: on a non-positive size, ``E_tilde < 1`` or an unknown ``dtype``.
    """
    if num_examples < 1 or num_classes < 1:
      raise ValueError(
        f'LogitTable needs num_examples >= 1 and num_classes >= 1, got '
        f'{num_examples} and {num_classes}.'
      )
    if E_tilde < 1:
      raise ValueError(f'config.method.saf.E_tilde must be an integer >= 1, got {E_tilde}.')
    if dtype not in _DTYPES:
      raise ValueError(
        f'config.method.saf.table_dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.'
      )
    self.num_examples = int(num_examples)
    self.num_classes = int(num_classes)
    self.E_tilde = int(E_tilde)
    self.dtype = _DTYPES[dtype]
    shape = (self.E_tilde, self.num_examples, self.num_classes)
    self.values = np.zeros(shape, self.dtype)
    self.written_epoch = np.full(shape[:2], NEVER_WRITTEN, np.int32)
    self._queue: queue.Queue = queue.Queue(maxsize=64)
    self._error: BaseException | None = None
    self._writer: threading.Thread | None = None

  @property
  def nbytes(self) -> int:
    """Host memory of the table in bytes (values plus written-epoch bookkeeping)."""
    return int(self.values.nbytes + self.written_epoch.nbytes)

  def _slot(self, epoch: int) -> int:
    if epoch < 1:
      raise ValueError(f'Epochs count from 1; got epoch={epoch}.')
    return epoch % self.E_tilde

  def _check_ids(self, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f'Example ids must be a 1-D integer array, got {ids.dtype} {ids.shape}.')
    if ids.size and (ids.min() < 0 or ids.max() >= self.num_examples):
      bad = ids[(ids < 0) | (ids >= self.num_examples)]
      raise ValueError(
        f'Example ids must lie in [0, {self.num_examples}) (the table was built for '
        f'{self.num_examples} training examples); got {bad[:8].tolist()}.'
      )
    if np.unique(ids).size != ids.size:
      uniq, counts = np.unique(ids, return_counts=True)
      raise ValueError(
        f'Example ids within one batch must be distinct; repeated: {uniq[counts > 1][:8].tolist()}.'
      )
    return ids

  def _check_logits_shape(self, ids: np.ndarray, logits) -> None:
    if tuple(logits.shape) != (ids.size, self.num_classes):
      raise ValueError(
        f'Logits of shape {tuple(logits.shape)} do not match {ids.size} ids x '
        f'{self.num_classes} classes of the SAF table.'
      )

  def gather(self, ids: np.ndarray, *, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Reads the targets of epoch ``epoch`` (Algorithm 1, line 5).

    Args:
      ids: int [batch], stable example ids in [0, num_examples), distinct.
      epoch: the current epoch, counted from 1.

    Returns:
      ``(target_logits, target_mask)``: float32 [batch, num_classes], the logits written
      for these examples in epoch ``epoch - E_tilde`` (0 where invalid), and float32
      [batch], 1 where that row was written in exactly that epoch, else 0.

    Raises:
      ValueError: ids out of range, repeated, or not a 1-D integer array.
    """
    ids = self._check_ids(ids)
    slot = self._slot(epoch)
    mask = self.written_epoch[slot, ids] == epoch - self.E_tilde
    targets = self.values[slot, ids].astype(np.float32)
    targets[~mask] = 0.0  # Never used: masked out of the loss.
    return targets, mask.astype(np.float32)

  def write(self, ids: np.ndarray, logits, *, epoch: int) -> None:
    """Records the training forward's logits for epoch ``epoch`` (Algorithm 1, line 4).

    Args:
      ids: int [batch], stable example ids, distinct.
      logits: float [batch, num_classes] (numpy or jax array), this step's own logits.
      epoch: the current epoch, counted from 1.

    Raises:
      ValueError: ids out of range or repeated, or ``logits`` whose shape disagrees with
        ``ids`` or with the table's ``num_classes``.
    """
    ids = self._check_ids(ids)
    logits = np.asarray(logits)
    self._check_logits_shape(ids, logits)
    slot = self._slot(epoch)
    self.values[slot, ids] = logits.astype(self.dtype)
    self.written_epoch[slot, ids] = epoch

  def write_async(self, ids: np.ndarray, logits: jax.Array, *, epoch: int) -> None:
    """Like :meth:`write`, but returns at once; a background thread waits for ``logits``.

    The ids are checked here, in the caller's thread. An error raised by a write in the
    background is re-raised by the next call to this method or to :meth:`flush`.
    """
    self._raise_pending()
    ids = self._check_ids(ids)
    self._check_logits_shape(ids, logits)  # Shapes are known before the values are.
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
    """Blocks until every queued write has landed; re-raises a background error."""
    self._queue.join()
    self._raise_pending()

  def valid_fraction(self, epoch: int) -> float:
    """Share of all examples whose target for ``epoch`` is valid (diagnostics)."""
    slot = self._slot(epoch)
    return float(np.mean(self.written_epoch[slot] == epoch - self.E_tilde))

  def state_dict(self) -> dict[str, np.ndarray]:
    """The arrays to checkpoint, after every queued write has landed."""
    self.flush()
    return {'values': self.values, 'written_epoch': self.written_epoch}

  def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
    """Restores the arrays of :meth:`state_dict` into this table.

    Raises:
      ValueError: if their shapes are not this table's (another ``num_examples``,
        ``num_classes`` or ``E_tilde``).
    """
    self.flush()
    values, written_epoch = arrays['values'], arrays['written_epoch']
    if values.shape != self.values.shape or written_epoch.shape != self.written_epoch.shape:
      raise ValueError(
        f'Restored SAF table has shapes {values.shape} and {written_epoch.shape}; this run '
        f'needs {self.values.shape} and {self.written_epoch.shape} (num_examples, '
        'num_classes or E_tilde differ).'
      )
    self.values = np.asarray(values, self.dtype)
    self.written_epoch = np.asarray(written_epoch, np.int32)

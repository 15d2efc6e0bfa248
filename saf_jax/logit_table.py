r"""SAF's per-example memory of past logits, kept on the host.

SAF (Algorithm 1 of Du et al. 2022) records the training forward pass's own logits
for every example (line 4) and, :math:`\tilde E` epochs later, reads them back as the
target of the trajectory loss (line 5, Eq. 9). This module is that record. A table holds
the ``num_examples`` example ids ``[first_id, first_id + num_examples)``: the whole
training set (``first_id = 0``), or one process's contiguous block of it in multi-host
training. Row ``r`` of every array below belongs to example id ``first_id + r``.

Full storage (``topk = 0``, the default) keeps every logit::

  values:        [E_tilde, num_examples, num_classes]   float32 or bfloat16
  written_epoch: [E_tilde, num_examples]  int32, NEVER_WRITTEN = never written

With ``dtype = 'int8'`` each row is quantised to 8 bits by its own affine map::

  values:        [E_tilde, num_examples, num_classes]   uint8 codes q in [0, 255]
  row_min:       [E_tilde, num_examples]  float32, the row's smallest logit
  row_scale:     [E_tilde, num_examples]  float32, (max - min) / 255; 0 for a constant row
  written_epoch: [E_tilde, num_examples]  int32, as above

written as :math:`q_j = \mathrm{round}((t_j - \min t) / s)` (0 where :math:`s = 0`) and read
back as :math:`\hat t_j = q_j s + \min t` in float32, so :math:`|\hat t_j - t_j| \le s / 2`
per logit (plus float32 rounding). The row's softened target then moves by little: with
:math:`\delta = (\hat t - t)/\tau` inside an interval of width :math:`s / \tau`, Hoeffding's
lemma gives :math:`\mathrm{KL}(p \| \hat p) = \log \mathbb{E}_p e^{\delta} -
\mathbb{E}_p \delta \le s^2 / (8 \tau^2)`, and Pinsker's inequality bounds the change of
the trajectory loss's gradient, :math:`\tau \|\hat p - p\|_1`, by :math:`s / 2`. A row
holding a non-finite logit is stored as NaN (``row_min = row_scale = NaN``) and reads back
as all NaN, as a float32 table would hand the non-finite value on to the loss.

Top-k storage (``topk = k``, ``1 <= k < num_classes``) keeps, per row, the ``k`` largest
logits, their class ids and the temperature-:math:`\tau` log-sum-exp of the other
``K - k`` logits (``K = num_classes``)::

  topk_values:   [E_tilde, num_examples, k]   float32 or bfloat16, the k largest logits
  topk_ids:      [E_tilde, num_examples, k]   uint16 (int32 if K > 65535), their classes
  rest_lse:      [E_tilde, num_examples]      float32, logsumexp_{j not in top-k} t_j / tau
  written_epoch: [E_tilde, num_examples]      int32, as above

and reads back the target :math:`\hat t` with :math:`\hat t_j = t_j` on the top-k classes
and, on every other class,

.. math::

  \hat t_j = \tau \big(\mathrm{rest\_lse} - \log(K - k)\big),

so the softened target :math:`\hat p = \mathrm{softmax}(\hat t/\tau)` equals
:math:`p = \mathrm{softmax}(t/\tau)` exactly (up to float rounding, and to bfloat16
rounding of the kept logits) on the top-k classes and in the total mass of the other
classes. The approximation is the shape of that tail, taken as flat. With :math:`q` the
student's softened prediction, the trajectory loss of the true target exceeds that of the
reconstructed one by

.. math::

  \tau^2 \Big(\mathrm{KL}(p \| \hat p)
    - \sum_{j \notin \text{top-}k} (p_j - \hat p_j) \log q_j\Big),

whose first term does not depend on the student, and their gradients with respect to the
student's logits differ by :math:`\tau (\hat p - p)`, nonzero only on the tail classes
and of L1 norm at most twice the tail mass. Both vanish when the target's tail is flat
(and so for ``k = K - 1``). With ``dtype = 'int8'``, ``topk_values`` holds uint8 codes of
the row's ``k`` kept logits, quantised as above with their own ``row_min`` and ``row_scale``
(float32 [E_tilde, num_examples]); ``rest_lse`` stays float32, from the unquantised logits.

:func:`storage_error` measures any layout's effect on the loss and its gradient on real
logits (:func:`topk_compression_error` for top-k).

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

Memory: :func:`table_nbytes` gives a layout's exact size without building it. For
ImageNet-1k (1,281,167 training examples, 1000 classes) with the paper's
:math:`\tilde E = 3`: 15,389 MB (14,676 MiB) in float32, which matches the 14,643 MB of
Table 2 of the paper if those are MiB; 7,702 MB in bfloat16; 3,890 MB in int8; 261 MB
with ``topk = 10`` (float32 values, uint16 ids), 177 MB with ``topk = 10`` in int8. With
``memmap_dir`` the arrays live in ``.npy`` files and the operating system pages them, for
tables larger than RAM.

Wiring::

  table = LogitTable(num_examples=60000, num_classes=10, E_tilde=3)
  for epoch in range(1, num_epochs + 1):
    for batch in batches(epoch):
      batch['target_logits'], batch['target_mask'] = table.gather(batch['index'], epoch=epoch)
      state, metrics, logits = saf_step(state, batch)     # logits: the step's own
      table.write_async(batch['index'], logits, epoch=epoch)  # no device sync here
    table.flush()

References:
  Du et al, `Sharpness-Aware Training for Free <https://arxiv.org/abs/2205.14083>`_, 2022
"""

import math
import os
import queue
import threading

import jax
import ml_dtypes
import numpy as np

# Below any epoch - E_tilde: a never-written row is never valid (-1 would be at e = E_tilde - 1).
NEVER_WRITTEN = np.iinfo(np.int32).min

# Storage dtype of the (kept) logits by config name; 'int8' stores uint8 codes (module docstring).
_DTYPES = {
  'float32': np.dtype(np.float32),
  'bfloat16': np.dtype(ml_dtypes.bfloat16),
  'int8': np.dtype(np.uint8),
}
_FULL_KEYS = ('values', 'written_epoch')
_TOPK_KEYS = ('topk_values', 'topk_ids', 'rest_lse', 'written_epoch')
_INT8_KEYS = ('row_min', 'row_scale')  # Added to either layout by dtype='int8'.


def _check_layout(num_examples: int, num_classes: int, E_tilde: int, dtype: str, topk: int):
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
  if topk != 0 and not 1 <= topk < num_classes:
    raise ValueError(
      f'config.method.saf.table_topk must be 0 (store all logits) or an integer in '
      f'[1, {num_classes}) for {num_classes} classes, got {topk}.'
    )


def _class_id_dtype(num_classes: int) -> np.dtype:
  return np.dtype(np.uint16) if num_classes <= 65535 else np.dtype(np.int32)


def _layout(
  num_examples: int, num_classes: int, *, E_tilde: int, dtype: str, topk: int
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """``{array name: (shape, dtype)}`` of a table; the order of :meth:`LogitTable.state_dict`."""
  rows = (E_tilde, num_examples)
  if not topk:
    layout = {'values': ((*rows, num_classes), _DTYPES[dtype])}
  else:
    layout = {
      'topk_values': ((*rows, topk), _DTYPES[dtype]),
      'topk_ids': ((*rows, topk), _class_id_dtype(num_classes)),
    }
  if dtype == 'int8':
    layout.update((name, (rows, np.dtype(np.float32))) for name in _INT8_KEYS)
  if topk:
    layout['rest_lse'] = (rows, np.dtype(np.float32))
  layout['written_epoch'] = (rows, np.dtype(np.int32))
  return layout


def _layout_name(keys) -> str:
  keys = set(keys)
  int8 = set(_INT8_KEYS) <= keys
  base = keys - set(_INT8_KEYS) if int8 else keys
  suffix = ' (int8)' if int8 else ''
  if base == set(_FULL_KEYS):
    return f'full logits{suffix}'
  if base == set(_TOPK_KEYS):
    return f'top-k logits{suffix}'
  return 'an unknown layout'


def table_nbytes(
  num_examples: int, num_classes: int, *, E_tilde: int, dtype: str = 'float32', topk: int = 0
) -> int:
  """Bytes of a :class:`LogitTable`'s arrays, as its ``nbytes`` reports, without allocating.

  Full storage: :math:`\\tilde E \\cdot N \\cdot (K \\cdot s + 4)` with ``s`` the bytes of
  ``dtype`` (4, 2, or 1 for int8); top-k: :math:`\\tilde E \\cdot N \\cdot (k \\cdot (s +
  s_{id}) + 4 + 4)` with ``s_id`` 2 (uint16 class ids) or 4 (int32, above 65535 classes).
  The trailing 4 bytes are ``written_epoch`` (int32) and, for top-k, ``rest_lse``
  (float32); int8 adds 4 + 4 per row for ``row_min`` and ``row_scale`` (float32).

  Args:
    num_examples: rows per slot, > 0.
    num_classes: logits per example, > 0.
    E_tilde: :math:`\\tilde E \\ge 1`, the number of slots (Eq. 9 of Du et al. 2022).
    dtype: 'float32', 'bfloat16' or 'int8' (per-row affine uint8 codes), the storage dtype
      of the (top-k) logits.
    topk: 0 for full storage, else the number of logits kept per row, in [1, num_classes).

  Returns:
    The size in bytes (RAM, or disk with ``memmap_dir``).

  Raises:
    ValueError: as :class:`LogitTable` does for the same arguments.
  """
  _check_layout(num_examples, num_classes, E_tilde, dtype, topk)
  layout = _layout(num_examples, num_classes, E_tilde=E_tilde, dtype=dtype, topk=topk)
  return sum(math.prod(shape) * dt.itemsize for shape, dt in layout.values())


def _compress_topk(
  logits: np.ndarray, *, k: int, tau: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Splits float32 [B, K] logits into (top-k logits [B, k], their classes [B, k], rest_lse [B])."""
  logits = np.asarray(logits, np.float32)
  num_classes = logits.shape[-1]
  top_ids = np.argpartition(logits, num_classes - k, axis=-1)[:, num_classes - k :]  # [B, k]
  top_values = np.take_along_axis(logits, top_ids, axis=-1)
  scaled = logits / np.float32(tau)  # [B, K], a copy.
  np.put_along_axis(scaled, top_ids, -np.inf, axis=-1)  # Only the K - k others remain.
  shift = scaled.max(axis=-1, keepdims=True)  # [B, 1]
  shift[~np.isfinite(shift)] = 0.0  # An all -inf tail: its log-sum-exp is -inf.
  scaled -= shift
  np.exp(scaled, out=scaled)
  with np.errstate(divide='ignore'):
    rest_lse = shift[:, 0] + np.log(np.sum(scaled, axis=-1, dtype=np.float64))
  return top_values, top_ids, rest_lse.astype(np.float32)


def _reconstruct_topk(
  top_values: np.ndarray, top_ids: np.ndarray, rest_lse: np.ndarray, *, num_classes: int, tau: float
) -> np.ndarray:
  """Float32 [B, K] target logits: the top-k as stored, the rest flat at the tail's mass."""
  k = top_values.shape[-1]
  fill = tau * (rest_lse.astype(np.float64) - np.log(num_classes - k))  # [B]
  targets = np.empty((len(fill), num_classes), np.float32)
  targets[:] = fill[:, None]
  np.put_along_axis(targets, top_ids.astype(np.intp), top_values.astype(np.float32), axis=-1)
  return targets


def _quantise_int8(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-row affine 8-bit codes of float [B, n] logits (module docstring).

  Returns:
    ``(codes, row_min, row_scale)``: uint8 [B, n] in [0, 255], float32 [B] and float32 [B]
    (``(max - min) / 255``, 0 for a constant row); NaN, NaN and codes 0 for a row with a
    non-finite logit.
  """
  logits = np.asarray(logits, np.float32)
  finite = np.isfinite(logits).all(axis=-1)  # [B]
  safe = np.where(finite[:, None], logits, 0.0).astype(np.float64)  # Float32 values, exact.
  lo = safe.min(axis=-1)  # [B]
  row_min = np.where(finite, lo, np.nan).astype(np.float32)  # Exact: a float32 logit.
  row_scale = np.where(finite, (safe.max(axis=-1) - lo) / 255.0, np.nan).astype(np.float32)
  # Codes of the stored (float32) min and scale, so that |q s + min - t| <= s / 2 holds for
  # the values read back, not only for the float64 ones.
  scale = np.where(row_scale > 0, row_scale, 1.0).astype(np.float64)  # NaN > 0 is False.
  codes = np.rint((safe - lo[:, None]) / scale[:, None])
  codes[~(row_scale > 0)] = 0.0  # Constant (or non-finite) rows.
  return np.clip(codes, 0, 255).astype(np.uint8), row_min, row_scale


def _dequantise_int8(codes: np.ndarray, row_min: np.ndarray, row_scale: np.ndarray) -> np.ndarray:
  """Float32 [B, n] logits ``codes * row_scale + row_min`` of uint8 [B, n], float32 [B] x 2."""
  return codes.astype(np.float32) * row_scale[:, None] + row_min[:, None]


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
    values, written_epoch, topk_values, topk_ids, rest_lse, row_min, row_scale: the
      arrays of the module docstring (None where the layout has no such array).
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
        back with an error of at most half the row's ``row_scale`` per logit (module
        docstring). Applies to the kept logits with ``topk > 0``.
      first_id: the first example id held, >= 0: this process's partition is
        ``[first_id, first_id + num_examples)`` of the global ids.
      topk: 0 (default) stores every logit; ``k`` in ``[1, num_classes)`` stores the k
        largest logits per row, their class ids and the tail's log-sum-exp (module
        docstring), exact for the top-k softened probabilities and the tail's total mass.
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
    _check_layout(num_examples, num_classes, E_tilde, dtype, topk)
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
    self.dtype = _DTYPES[dtype]
    self._int8 = dtype == 'int8'
    self.first_id = int(first_id)
    self.topk = int(topk)
    self.tau = float(tau) if topk else None
    self.memmap_dir = memmap_dir
    layout = _layout(
      self.num_examples, self.num_classes, E_tilde=self.E_tilde, dtype=dtype, topk=self.topk
    )
    if memmap_dir is not None:
      os.makedirs(memmap_dir, exist_ok=True)
    self._arrays: dict[str, np.ndarray] | None = {
      name: self._new_array(name, shape, dt) for name, (shape, dt) in layout.items()
    }
    self._arrays['written_epoch'][...] = NEVER_WRITTEN
    self._queue: queue.Queue = queue.Queue(maxsize=64)
    self._error: BaseException | None = None
    self._writer: threading.Thread | None = None

  def _new_array(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if self.memmap_dir is None:
      return np.zeros(shape, dtype)
    # .npy has no bfloat16: its file holds the uint16 bit patterns (np.load(...).view(bfloat16)).
    file_dtype = np.dtype(np.uint16) if dtype == _DTYPES['bfloat16'] else dtype
    path = os.path.join(self.memmap_dir, f'{name}.npy')
    # Mode 'w+' truncates an existing file: a new table is empty (zeros), never stale rows.
    return np.lib.format.open_memmap(path, mode='w+', dtype=file_dtype, shape=shape).view(dtype)

  def _live(self) -> dict[str, np.ndarray]:
    if self._arrays is None:
      raise RuntimeError('This SAF LogitTable was closed.')
    return self._arrays

  @property
  def values(self) -> np.ndarray | None:
    return self._live().get('values')

  @property
  def written_epoch(self) -> np.ndarray:
    return self._live()['written_epoch']

  @property
  def topk_values(self) -> np.ndarray | None:
    return self._live().get('topk_values')

  @property
  def topk_ids(self) -> np.ndarray | None:
    return self._live().get('topk_ids')

  @property
  def rest_lse(self) -> np.ndarray | None:
    return self._live().get('rest_lse')

  @property
  def row_min(self) -> np.ndarray | None:
    return self._live().get('row_min')

  @property
  def row_scale(self) -> np.ndarray | None:
    return self._live().get('row_scale')

  @property
  def nbytes(self) -> int:
    """Bytes of the table's arrays (in RAM, or on disk with ``memmap_dir``); see
    :func:`table_nbytes`."""
    return int(sum(a.nbytes for a in self._live().values()))

  def _slot(self, epoch: int) -> int:
    if epoch < 1:
      raise ValueError(f'Epochs count from 1; got epoch={epoch}.')
    return epoch % self.E_tilde

  def _check_ids(self, ids: np.ndarray) -> np.ndarray:
    """Checks global ids; returns their rows (ids - first_id), int64 [batch]."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f'Example ids must be a 1-D integer array, got {ids.dtype} {ids.shape}.')
    lo, hi = self.first_id, self.first_id + self.num_examples
    if ids.size and (ids.min() < lo or ids.max() >= hi):
      bad = ids[(ids < lo) | (ids >= hi)]
      raise ValueError(
        f'Example ids must lie in [{lo}, {hi}) (the table was built for '
        f'{self.num_examples} training examples from id {lo}); got {bad[:8].tolist()}, '
        "not in this process's partition."
      )
    if np.unique(ids).size != ids.size:
      uniq, counts = np.unique(ids, return_counts=True)
      raise ValueError(
        f'Example ids within one batch must be distinct; repeated: {uniq[counts > 1][:8].tolist()}.'
      )
    return ids.astype(np.int64) - self.first_id

  def _check_logits_shape(self, ids: np.ndarray, logits) -> None:
    if tuple(logits.shape) != (ids.size, self.num_classes):
      raise ValueError(
        f'Logits of shape {tuple(logits.shape)} do not match {ids.size} ids x '
        f'{self.num_classes} classes of the SAF table.'
      )

  def gather(self, ids: np.ndarray, *, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Reads the targets of epoch ``epoch`` (Algorithm 1, line 5; Eq. 9).

    With top-k storage the targets are reconstructed: the stored top-k logits, and
    :math:`\\tau (\\mathrm{rest\\_lse} - \\log(K - k))` on every other class (module
    docstring). With int8 storage the (kept) logits are ``codes * row_scale + row_min``.

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
      kept = _dequantise_int8(kept, arrays['row_min'][slot, rows], arrays['row_scale'][slot, rows])
    if self.topk:
      targets = _reconstruct_topk(
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

    With top-k or int8 storage the logits are compressed here, on the host (module
    docstring).

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
      kept, top_ids, rest_lse = _compress_topk(logits, k=self.topk, tau=self.tau)
      arrays['topk_ids'][slot, rows] = top_ids
      arrays['rest_lse'][slot, rows] = rest_lse
    name = 'topk_values' if self.topk else 'values'
    if self._int8:
      codes, row_min, row_scale = _quantise_int8(kept)
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
    return float(np.mean(self.written_epoch[slot] == epoch - self.E_tilde))

  def state_dict(self) -> dict[str, np.ndarray]:
    """The arrays to checkpoint, after every queued write has landed.

    Returns:
      ``{'values', 'written_epoch'}`` (full storage) or ``{'topk_values', 'topk_ids',
      'rest_lse', 'written_epoch'}`` (top-k), plus ``'row_min'`` and ``'row_scale'`` with
      ``dtype='int8'``, with the shapes and dtypes of the module docstring: the table's own
      arrays (memmaps, synced to disk, with ``memmap_dir``), so also a valid abstract target
      for restoring a checkpoint.
    """
    self.flush()
    self._sync_files()
    return dict(self._live())

  def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
    """Restores the arrays of :meth:`state_dict` into this table.

    Copies into the table's existing arrays (memory-mapped files stay memory-mapped); logits
    are cast to this table's ``dtype`` (float32 and bfloat16 convert into each other; int8
    codes only load into an int8 table, whose keys differ).

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
        f'Restored SAF table has arrays {sorted(arrays)} ({_layout_name(arrays)}); this '
        f'table stores {_layout_name(own)} in {sorted(own)}: config.method.saf.table_topk '
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
    if self._int8 and np.asarray(arrays[name]).dtype != np.uint8:
      raise ValueError(
        f'Restored SAF table has {name!r} of dtype {np.asarray(arrays[name]).dtype}; this '
        'int8 table (config.method.saf.table_dtype) needs uint8 codes.'
      )
    if self.topk:
      ids = np.asarray(arrays['topk_ids'])
      if ids.min() < 0 or ids.max() >= self.num_classes:
        raise ValueError(
          f'Restored SAF table has class ids in [{ids.min()}, {ids.max()}]; this run has '
          f'{self.num_classes} classes (num_classes differ).'
        )
    for name, array in own.items():
      array[...] = np.asarray(arrays[name]).astype(array.dtype, copy=False)  # In place.


def _log_softmax64(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  shift = x.max(axis=-1, keepdims=True)
  shift[~np.isfinite(shift)] = 0.0
  x = x - shift
  with np.errstate(divide='ignore'):
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def _kl64(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
  """KL(p || q) per row, float64, with 0 * log(0) := 0 as in ``saf_jax.losses``."""
  p = np.exp(log_p)
  with np.errstate(invalid='ignore'):
    return np.sum(np.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def storage_error(
  target_logits, student_logits, *, tau: float, dtype: str = 'float32', topk: int = 0
) -> dict[str, float]:
  """How much a storage layout changes SAF's trajectory loss (Eq. 9) on given logits.

  The targets go through a :class:`LogitTable` with this ``dtype`` and ``topk`` (``write``
  then ``gather``, the path training takes); both losses are then computed in float64
  NumPy as ``saf_jax.losses.trajectory_loss`` defines them,
  :math:`\\tau^2 \\cdot \\mathrm{mean}_i\\, \\mathrm{KL}(\\mathrm{softmax}(t_i/\\tau) \\|
  \\mathrm{softmax}(z_i/\\tau))`, once with the targets :math:`t` as given ("full") and
  once with the stored ones :math:`\\hat t`. So ``dtype='float32', topk=0`` measures zero
  error, and top-k with ``dtype='bfloat16'`` or ``'int8'`` includes the rounding of the kept
  logits.

  Args:
    target_logits: float [N, K], the logits :math:`t` to store (e.g. from a checkpoint).
    student_logits: float [N, K], the current logits :math:`z` of the same examples.
    tau: :math:`\\tau > 0`, the temperature (``config.method.saf.tau``).
    dtype: 'float32', 'bfloat16' or 'int8', the storage dtype of the (kept) logits.
    topk: 0 (full storage) or the logits kept per row, in [1, K).

  Returns:
    Floats: ``trajectory_loss_full`` and ``trajectory_loss_stored`` (nats, with the
    :math:`\\tau^2` factor), ``abs_error`` (absolute difference of the two), ``rel_error``
    (``abs_error`` over ``trajectory_loss_full``; 0 if both are 0, inf if only the full
    loss is), ``max_row_abs_error`` (largest per-example absolute difference of the
    :math:`\\tau^2`-scaled KLs), ``mean_kl_target`` (mean over rows of
    :math:`\\mathrm{KL}(p \\| \\hat p)` between the true and stored softened targets, nats,
    without :math:`\\tau^2`), and ``grad_rel_error``: the change of the loss's gradient
    with respect to the student logits, :math:`\\tau (p - \\hat p)`, relative to the
    gradient itself, :math:`\\tau (q - p)`, as a ratio of L1 norms summed over rows (inf if
    the student's softened prediction equals the target's everywhere but storage moved it).

  Raises:
    ValueError: if the arrays are not both [N, K] with N >= 1, or on a ``dtype``, ``topk``
      or ``tau`` that :class:`LogitTable` rejects.
  """
  full = np.asarray(target_logits, np.float64)
  student = np.asarray(student_logits, np.float64)
  if full.ndim != 2 or full.shape != student.shape or not full.shape[0]:
    raise ValueError(
      f'target_logits and student_logits must both be [N, K] with N >= 1, got '
      f'{full.shape} and {student.shape}.'
    )
  if tau is None or not tau > 0:
    raise ValueError(f'tau must be > 0 (config.method.saf.tau), got {tau}.')
  num, num_classes = full.shape
  table = LogitTable(num, num_classes, E_tilde=1, dtype=dtype, topk=topk, tau=tau)
  ids = np.arange(num)
  table.write(ids, np.asarray(target_logits, np.float32), epoch=1)  # Logits arrive as float32.
  stored, _ = table.gather(ids, epoch=2)
  table.close()
  log_q = _log_softmax64(student / tau)
  log_p_full = _log_softmax64(full / tau)
  log_p_stored = _log_softmax64(stored.astype(np.float64) / tau)
  rows_full = tau**2 * _kl64(log_p_full, log_q)  # [N], as trajectory_loss per example.
  rows_stored = tau**2 * _kl64(log_p_stored, log_q)
  loss_full, loss_stored = float(np.mean(rows_full)), float(np.mean(rows_stored))
  abs_error = abs(loss_stored - loss_full)
  # d(tau^2 KL(p || q))/dz = tau (q - p): storage changes the gradient by tau (p - p_stored).
  grad_change = float(np.sum(np.abs(np.exp(log_p_stored) - np.exp(log_p_full))))
  grad = float(np.sum(np.abs(np.exp(log_q) - np.exp(log_p_full))))
  return {
    'trajectory_loss_full': loss_full,
    'trajectory_loss_stored': loss_stored,
    'abs_error': abs_error,
    'rel_error': _ratio(abs_error, abs(loss_full)),
    'max_row_abs_error': float(np.max(np.abs(rows_stored - rows_full))),
    'mean_kl_target': float(np.mean(_kl64(log_p_full, log_p_stored))),
    'grad_rel_error': _ratio(grad_change, grad),
  }


def _ratio(num: float, den: float) -> float:
  """num / den, with 0 / 0 := 0 and x / 0 := inf."""
  if den:
    return num / den
  return 0.0 if num == 0 else float('inf')


def topk_compression_error(
  target_logits, student_logits, *, k: int, tau: float, dtype: str = 'float32'
) -> dict[str, float]:
  """:func:`storage_error` of top-k storage, with the stored loss named ``trajectory_loss_topk``.

  Args:
    target_logits: float [N, K], the stored logits :math:`t` (e.g. from a checkpoint).
    student_logits: float [N, K], the current logits :math:`z` of the same examples.
    k: logits kept per row, in [1, K).
    tau: :math:`\\tau > 0`, the temperature.
    dtype: 'float32', 'bfloat16' or 'int8', the storage dtype of the kept logits.

  Returns:
    :func:`storage_error`'s floats, ``trajectory_loss_stored`` renamed
    ``trajectory_loss_topk``.

  Raises:
    ValueError: as :func:`storage_error`, and for ``k < 1`` (that would be full storage).
  """
  if not k >= 1:
    raise ValueError(
      f'config.method.saf.table_topk must be an integer in [1, K) for top-k storage, got {k}.'
    )
  stats = storage_error(target_logits, student_logits, tau=tau, dtype=dtype, topk=k)
  stats['trajectory_loss_topk'] = stats.pop('trajectory_loss_stored')
  return stats

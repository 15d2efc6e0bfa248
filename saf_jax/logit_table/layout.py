r"""The storage layouts of SAF's logit table: array names, shapes, dtypes, codecs and sizes.

A table of past logits (Algorithm 1 of Du et al. 2022) stores :math:`\tilde E` slots of
``num_examples`` rows in one of the layouts below. Row ``r`` of every array belongs to
example id ``first_id + r``.

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
student's softened prediction, the trajectory loss (Eq. 9) of the true target exceeds that
of the reconstructed one by

.. math::

  \tau^2 \Big(\mathrm{KL}(p \| \hat p)
    - \sum_{j \notin \text{top-}k} (p_j - \hat p_j) \log q_j\Big),

whose first term does not depend on the student, and their gradients with respect to the
student's logits differ by :math:`\tau (\hat p - p)`, nonzero only on the tail classes
and of L1 norm at most twice the tail mass. Both vanish when the target's tail is flat
(and so for ``k = K - 1``). With ``dtype = 'int8'``, ``topk_values`` holds uint8 codes of
the row's ``k`` kept logits, quantised as above with their own ``row_min`` and ``row_scale``
(float32 [E_tilde, num_examples]); ``rest_lse`` stays float32, from the unquantised logits.

Memory: :func:`table_nbytes` gives a layout's exact size without building it. For
ImageNet-1k (1,281,167 training examples, 1000 classes) with the paper's
:math:`\tilde E = 3`: 15,389 MB (14,676 MiB) in float32, which matches the 14,643 MB of
Table 2 of the paper if those are MiB; 7,702 MB in bfloat16; 3,890 MB in int8; 261 MB
with ``topk = 10`` (float32 values, uint16 ids), 177 MB with ``topk = 10`` in int8.

References:
  Du et al, `Sharpness-Aware Training for Free <https://arxiv.org/abs/2205.14083>`_, 2022
"""

import math
from collections.abc import Iterable

import ml_dtypes
import numpy as np

# Below any epoch - E_tilde: a never-written row is never valid (-1 would be at e = E_tilde - 1).
NEVER_WRITTEN = np.iinfo(np.int32).min

# Storage dtype of the (kept) logits by config name; 'int8' stores uint8 codes (module docstring).
DTYPES = {
  'float32': np.dtype(np.float32),
  'bfloat16': np.dtype(ml_dtypes.bfloat16),
  'int8': np.dtype(np.uint8),
}
_FULL_KEYS = ('values', 'written_epoch')
_TOPK_KEYS = ('topk_values', 'topk_ids', 'rest_lse', 'written_epoch')
_INT8_KEYS = ('row_min', 'row_scale')  # Added to either layout by dtype='int8'.


def topk_range_message(topk: int, num_classes: int, *, full_storage: bool = True) -> str:
  """The error message for a ``topk`` outside its range: [1, K), or also 0 (full storage)."""
  full = '0 (store all logits) or ' if full_storage else ''
  return (
    f'config.method.saf.table_topk must be {full}an integer in [1, {num_classes}) for '
    f'{num_classes} classes, got {topk}.'
  )


def check_layout(num_examples: int, num_classes: int, E_tilde: int, dtype: str, topk: int) -> None:
  """Raises ValueError unless the arguments name a layout of the module docstring.

  Raises:
    ValueError: on a non-positive size, ``E_tilde < 1``, a ``dtype`` not in :data:`DTYPES`,
      or ``topk`` outside ``{0} U [1, num_classes)``.
  """
  if num_examples < 1 or num_classes < 1:
    raise ValueError(
      f'LogitTable needs num_examples >= 1 and num_classes >= 1, got '
      f'{num_examples} and {num_classes}.'
    )
  if E_tilde < 1:
    raise ValueError(f'config.method.saf.E_tilde must be an integer >= 1, got {E_tilde}.')
  if dtype not in DTYPES:
    raise ValueError(
      f'config.method.saf.table_dtype must be one of {sorted(DTYPES)}, got {dtype!r}.'
    )
  if topk != 0 and not 1 <= topk < num_classes:
    raise ValueError(topk_range_message(topk, num_classes))


def check_ids(ids: np.ndarray, first_id: int, num_examples: int) -> np.ndarray:
  """Checks a batch's global example ids against a table's ``[first_id, first_id + num_examples)``.

  Args:
    ids: int [batch], global example ids.
    first_id: the example id of the table's row 0.
    num_examples: the table's rows per slot.

  Returns:
    Their rows, ``ids - first_id``: int64 [batch].

  Raises:
    ValueError: ids that are not a 1-D integer array, lie outside the range (not in this
      process's partition), or repeat within the batch.
  """
  ids = np.asarray(ids)
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f'Example ids must be a 1-D integer array, got {ids.dtype} {ids.shape}.')
  lo, hi = first_id, first_id + num_examples
  if ids.size and (ids.min() < lo or ids.max() >= hi):
    bad = ids[(ids < lo) | (ids >= hi)]
    raise ValueError(
      f'Example ids must lie in [{lo}, {hi}) (the table was built for '
      f'{num_examples} training examples from id {lo}); got {bad[:8].tolist()}, '
      "not in this process's partition."
    )
  if np.unique(ids).size != ids.size:
    uniq, counts = np.unique(ids, return_counts=True)
    raise ValueError(
      f'Example ids within one batch must be distinct; repeated: {uniq[counts > 1][:8].tolist()}.'
    )
  return ids.astype(np.int64) - first_id


def _class_id_dtype(num_classes: int) -> np.dtype:
  return np.dtype(np.uint16) if num_classes <= 65535 else np.dtype(np.int32)


def array_specs(
  num_examples: int, num_classes: int, *, E_tilde: int, dtype: str, topk: int
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """``{array name: (shape, dtype)}`` of a checked layout, in the order a table stores them."""
  rows = (E_tilde, num_examples)
  if not topk:
    specs = {'values': ((*rows, num_classes), DTYPES[dtype])}
  else:
    specs = {
      'topk_values': ((*rows, topk), DTYPES[dtype]),
      'topk_ids': ((*rows, topk), _class_id_dtype(num_classes)),
    }
  if dtype == 'int8':
    specs.update((name, (rows, np.dtype(np.float32))) for name in _INT8_KEYS)
  if topk:
    specs['rest_lse'] = (rows, np.dtype(np.float32))
  specs['written_epoch'] = (rows, np.dtype(np.int32))
  return specs


def describe(names: Iterable[str]) -> str:
  """The layout a set of array names stores, e.g. ``'top-k logits (int8)'``, for messages."""
  names = set(names)
  int8 = set(_INT8_KEYS) <= names
  base = names - set(_INT8_KEYS) if int8 else names
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
  check_layout(num_examples, num_classes, E_tilde, dtype, topk)
  specs = array_specs(num_examples, num_classes, E_tilde=E_tilde, dtype=dtype, topk=topk)
  return sum(math.prod(shape) * dt.itemsize for shape, dt in specs.values())


def compress_topk(
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


def reconstruct_topk(
  top_values: np.ndarray, top_ids: np.ndarray, rest_lse: np.ndarray, *, num_classes: int, tau: float
) -> np.ndarray:
  """Float32 [B, K] target logits: the top-k as stored, the rest flat at the tail's mass."""
  k = top_values.shape[-1]
  fill = tau * (rest_lse.astype(np.float64) - np.log(num_classes - k))  # [B]
  targets = np.empty((len(fill), num_classes), np.float32)
  targets[:] = fill[:, None]
  np.put_along_axis(targets, top_ids.astype(np.intp), top_values.astype(np.float32), axis=-1)
  return targets


def quantise_int8(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def dequantise_int8(codes: np.ndarray, row_min: np.ndarray, row_scale: np.ndarray) -> np.ndarray:
  """Float32 [B, n] logits ``codes * row_scale + row_min`` of uint8 [B, n], float32 [B] x 2."""
  return codes.astype(np.float32) * row_scale[:, None] + row_min[:, None]

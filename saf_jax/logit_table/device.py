r"""SAF's per-example logit table on the devices: pure JAX functions over a dict of arrays.

:class:`DeviceTable` is the static description of a table (rows, classes, :math:`\tilde E`,
storage dtype, top-k, :math:`\tau`); the table itself is a dict of ``jax.Array`` with the
names, shapes and dtypes of :func:`saf_jax.logit_table.layout.array_specs`, exactly the
arrays :meth:`saf_jax.logit_table.LogitTable.state_dict` returns. A checkpoint therefore
stores the same arrays whichever table wrote them. :meth:`DeviceTable.gather` and
:meth:`DeviceTable.write` are pure functions of those arrays, written in ``jnp`` only, so
they run inside the jitted train step (and inside ``jax.lax.scan``) with the epoch traced:
one compilation serves every epoch. Their semantics are the host table's: in epoch ``e``
example ``r`` uses slot ``e % E_tilde``; a target is valid iff
``written_epoch[slot, r] == e - E_tilde`` (``layout.NEVER_WRITTEN`` for a row never
written); an invalid target is 0 and masked out of the loss; the storage codecs (float32,
bfloat16, per-row affine int8 codes, top-k with the tail's log-sum-exp) are those of
:mod:`saf_jax.logit_table.layout`, computed here in float32 (see each codec's docstring for
where a result can differ from the host's float64 one).

Memory: the caller shards every array along its row axis (axis 1) over the mesh's
``'data'`` axis, ``NamedSharding(mesh, P(None, 'data'))``, with ``num_rows`` padded to a
multiple of the device count (JAX refuses an uneven split). Each device then holds
``nbytes() / num_devices``: for ImageNet-1k (1,281,167 training examples, 1000 classes) at
the paper's :math:`\tilde E = 3` in int8, ``layout.table_nbytes(1281167, 1000, E_tilde=3,
dtype='int8')`` = 3,889,623,012 bytes (3,890 MB) in all, 486 MB (under 0.5 GB) a device
on 8 devices. Under that sharding XLA's partitioner reads and writes each device's own
rows; the collectives carry batch-sized data (the batch's rows and logits all-gathered, the
gathered rows all-reduced), never the table (the compiled HLO on 4 CPU devices). Donate the
table's arrays to the jitted step (``donate_argnums``) so that XLA can update them in place;
otherwise every step copies the whole table. On CPU, XLA still copies a table array once
per step when one computation gathers from it and writes it with no data dependency from
the gather to the write (temporary memory = its size; a write alone is in place); check
``jax.jit(step, donate_argnums=...).lower(...).compile().memory_analysis()`` on the
target platform.

Ordering contract: a step gathers its batch's targets at its start and writes its own
logits at its end, and the steps run one after another on the devices, each consuming the
arrays the previous one returned. So a read always sees every earlier write and no flush
is needed; with ``E_tilde = 1`` epoch ``e`` sees all of epoch ``e - 1``'s writes. Within
one epoch every example appears at most once, so the read and write of one example in a
step never race with another batch's.

Indices: the caller checks each batch's ids on the host before the step
(:func:`saf_jax.logit_table.layout.check_ids`): rows distinct and in ``[0, num_rows)``.
The functions do not clamp: a read of a row outside the range (or negative: no wrap-around)
returns ``NEVER_WRITTEN`` and so a masked zero target, a write there is dropped, so a bad
row can never read or overwrite another example's row. Repeated rows in one write are
undefined (the scatter is told its indices are unique).

Wiring::

  table = DeviceTable(num_rows=60000, num_classes=10, E_tilde=3)
  arrays = jax.jit(table.init, out_shardings=NamedSharding(mesh, P(None, 'data')))()

  @functools.partial(jax.jit, donate_argnums=0)
  def step(arrays, state, batch, epoch):
    targets, mask = table.gather(arrays, batch['index'], epoch)
    state, metrics, logits = saf_update(state, batch, targets, mask)
    return table.write(arrays, batch['index'], logits, epoch), state, metrics

References:
  Du et al, `Sharpness-Aware Training for Free <https://arxiv.org/abs/2205.14083>`_, 2022
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from saf_jax.logit_table import layout


def quantise_int8(logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-row affine 8-bit codes of float [B, n] logits, as :func:`layout.quantise_int8`.

  ``row_min`` is the row's smallest logit, ``row_scale = (max - min) / 255`` (0 for a
  constant row, whose codes are all 0), and the codes are chosen so that the values read
  back by :func:`dequantise_int8` satisfy :math:`|\\hat t_j - t_j| \\le s / 2` plus float32
  rounding of :math:`q s + \\min t`: the module bound of :mod:`saf_jax.logit_table.layout`.
  A row holding a non-finite logit is stored as ``row_min = row_scale = NaN`` and codes 0,
  and reads back as all NaN.

  Differences from the host codec, which computes in float64: ``row_scale`` is
  ``(max - min) / 255`` rounded in float32 (it may differ from the host's by an ulp); a code
  is the float32 estimate ``rint((t - min) / s)``, corrected by one step where that brings
  the float32 read-back closer to ``t``, so a code may differ from the host's by one (where
  ``(t - min) / s`` lies within float32 rounding of a half-integer). A finite row whose range
  ``max - min`` overflows float32 (beyond 3.4e38) is stored as non-finite (NaN), where the
  host still quantises it.

  Args:
    logits: float [B, n] (computed in float32).

  Returns:
    ``(codes, row_min, row_scale)``: uint8 [B, n] in [0, 255], float32 [B], float32 [B].
  """
  x = jnp.asarray(logits, jnp.float32)
  safe_rows = jnp.isfinite(x).all(axis=-1)  # [B]
  safe = jnp.where(safe_rows[:, None], x, 0.0)
  lo, hi = safe.min(axis=-1), safe.max(axis=-1)  # [B] each.
  span = hi - lo
  finite = safe_rows & jnp.isfinite(span)  # A range beyond float32 counts as non-finite.
  safe = jnp.where(finite[:, None], safe, 0.0)
  lo = jnp.where(finite, lo, 0.0)
  row_min = jnp.where(finite, lo, jnp.nan)
  row_scale = jnp.where(finite, span / 255.0, jnp.nan)
  # Constant and non-finite rows (NaN > 0 is False) divide 0 by 1: their codes are 0.
  scale = jnp.where(row_scale > 0, row_scale, 1.0)[:, None]  # [B, 1]
  offset = lo[:, None]

  def error(codes):  # |read-back - t| of float codes, as dequantise_int8 reads them.
    return jnp.abs(codes * scale + offset - safe)

  codes = jnp.clip(jnp.rint((safe - offset) / scale), 0, 255)
  best = error(codes)
  for step in (-1.0, 1.0):  # The float32 estimate is within one step of the nearest code.
    other = jnp.clip(codes + step, 0, 255)
    other_error = error(other)
    closer = other_error < best
    codes = jnp.where(closer, other, codes)
    best = jnp.where(closer, other_error, best)
  return codes.astype(jnp.uint8), row_min, row_scale


def dequantise_int8(codes: jax.Array, row_min: jax.Array, row_scale: jax.Array) -> jax.Array:
  """Float32 [B, n] logits ``codes * row_scale + row_min`` of uint8 [B, n], float32 [B] x 2.

  As :func:`layout.dequantise_int8`: read back within ``row_scale / 2`` of the logits
  quantised (plus float32 rounding); all NaN for a row stored as non-finite.
  """
  return codes.astype(jnp.float32) * row_scale[:, None] + row_min[:, None]


def compress_topk(
  logits: jax.Array, *, k: int, tau: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Splits float [B, K] logits into (top-k logits, their classes, the tail's log-sum-exp).

  As :func:`layout.compress_topk`: ``rest_lse`` is
  :math:`\\log \\sum_{j \\notin \\text{top-}k} e^{t_j / \\tau}` of the other ``K - k``
  logits (``-inf`` for an all ``-inf`` tail, as on the host).

  Differences from the host: the k classes of a row come in ``jax.lax.top_k``'s order
  (descending logit; the host keeps ``np.argpartition``'s), which the reconstruction does
  not depend on; among tied logits ``top_k`` keeps the lowest class ids, the host any of
  them, so with ties another class may be kept (the stored logits are the same values);
  the tail's sum of exponentials is float32 (float64 on the host), so ``rest_lse`` may
  differ by a few float32 ulps.

  Args:
    logits: float [B, K] (computed in float32).
    k: the number of logits kept, in [1, K).
    tau: the trajectory loss's temperature, > 0.

  Returns:
    ``(top_values, top_ids, rest_lse)``: float32 [B, k], int32 [B, k], float32 [B].
  """
  x = jnp.asarray(logits, jnp.float32)
  top_values, top_ids = jax.lax.top_k(x, k)  # [B, k] each.
  batch = jnp.arange(x.shape[0])[:, None]  # [B, 1]
  scaled = (x / np.float32(tau)).at[batch, top_ids].set(-jnp.inf, unique_indices=True)
  shift = scaled.max(axis=-1, keepdims=True)  # [B, 1]
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)  # An all -inf tail: its lse is -inf.
  rest_lse = shift[:, 0] + jnp.log(jnp.sum(jnp.exp(scaled - shift), axis=-1))
  return top_values, top_ids, rest_lse


def reconstruct_topk(
  top_values: jax.Array, top_ids: jax.Array, rest_lse: jax.Array, *, num_classes: int, tau: float
) -> jax.Array:
  """Float32 [B, K] target logits: the top-k as stored, the rest flat at the tail's mass.

  As :func:`layout.reconstruct_topk`: :math:`\\hat t_j = t_j` on the ``k`` stored classes,
  :math:`\\tau (\\mathrm{rest\\_lse} - \\log(K - k))` on the others. The fill is computed in
  float32 (float64, then rounded, on the host), so it may differ from the host's by a few
  float32 ulps.

  Args:
    top_values: float [B, k], the kept logits (float32, or bfloat16 read back).
    top_ids: int [B, k] (uint16 or int32 as stored), their classes, distinct per row.
    rest_lse: float32 [B].
    num_classes: K.
    tau: the temperature the tail was summarised at.
  """
  batch, k = top_values.shape
  fill = np.float32(tau) * (rest_lse - np.float32(math.log(num_classes - k)))  # [B]
  targets = jnp.broadcast_to(fill[:, None], (batch, num_classes))
  return targets.at[jnp.arange(batch)[:, None], top_ids.astype(jnp.int32)].set(
    top_values.astype(jnp.float32), unique_indices=True
  )


def _read(array: jax.Array, slot: jax.Array, rows: jax.Array, fill) -> jax.Array:
  """``array[slot, rows]``; ``fill`` for a row outside [0, num_rows) (no clamping or wrap)."""
  return array.at[slot, rows].get(mode='fill', fill_value=fill, wrap_negative_indices=False)


def _write(array: jax.Array, slot: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
  """``array[slot, rows] = values`` functionally; a row outside [0, num_rows) is dropped."""
  return array.at[slot, rows].set(
    values.astype(array.dtype), mode='drop', unique_indices=True, wrap_negative_indices=False
  )


@dataclasses.dataclass(frozen=True)
class DeviceTable:
  """Static description of a device table: rows, classes, E_tilde, dtype name, topk, tau.

  Hashable, so it can be a static argument or a closure constant of a jitted function; the
  table's arrays are passed to and returned by :meth:`gather` and :meth:`write`.

  Attributes:
    num_rows: rows per slot; row ``r`` holds example id ``r`` (the caller may pad beyond
      the number of training examples: to a multiple of the device count for sharding).
    num_classes: the width of the logits, K.
    E_tilde: :math:`\\tilde E \\ge 1`, the epochs between writing a row and reading it back.
    dtype: storage dtype name of the (kept) logits: 'float32', 'bfloat16' or 'int8'
      (:data:`saf_jax.logit_table.layout.DTYPES`).
    topk: 0 (full logits stored) or k in [1, num_classes), the logits kept per row.
    tau: the trajectory loss's temperature, > 0, required when ``topk > 0``; set to None
      when ``topk == 0`` (as :class:`saf_jax.logit_table.LogitTable` does).
  """

  num_rows: int
  num_classes: int
  E_tilde: int
  dtype: str = 'float32'
  topk: int = 0
  tau: float | None = None

  def __post_init__(self):
    """Checks the arguments as :class:`saf_jax.logit_table.LogitTable` does.

    Raises:
      ValueError: on a non-positive size, ``E_tilde < 1``, an unknown ``dtype``, ``topk``
        outside ``{0} U [1, num_classes)``, or ``topk > 0`` without a ``tau > 0``; the
        message names the config field (``config.method.saf.E_tilde``, ``table_dtype``,
        ``table_topk``, ``tau``).
    """
    layout.check_layout(self.num_rows, self.num_classes, self.E_tilde, self.dtype, self.topk)
    if self.topk and (self.tau is None or not self.tau > 0):
      raise ValueError(
        f'config.method.saf.tau must be > 0 when config.method.saf.table_topk > 0 (the tail '
        f'is summarised at the loss temperature), got {self.tau}.'
      )
    for name in ('num_rows', 'num_classes', 'E_tilde', 'topk'):
      object.__setattr__(self, name, int(getattr(self, name)))
    object.__setattr__(self, 'tau', float(self.tau) if self.topk else None)

  @property
  def _kept(self) -> str:
    return 'topk_values' if self.topk else 'values'

  def specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{array name: (shape, numpy dtype)}``: :func:`saf_jax.logit_table.layout.array_specs`."""
    return layout.array_specs(
      self.num_rows, self.num_classes, E_tilde=self.E_tilde, dtype=self.dtype, topk=self.topk
    )

  def nbytes(self) -> int:
    """Bytes of the table's arrays, all devices together:
    :func:`saf_jax.logit_table.layout.table_nbytes`."""
    return layout.table_nbytes(
      self.num_rows, self.num_classes, E_tilde=self.E_tilde, dtype=self.dtype, topk=self.topk
    )

  def abstract(
    self, sharding: jax.sharding.Sharding | None = None
  ) -> dict[str, jax.ShapeDtypeStruct]:
    """``{name: jax.ShapeDtypeStruct}`` of the arrays, e.g. a checkpoint's restore target.

    Args:
      sharding: one sharding for every array, or None. Every array has its rows on axis 1,
        so ``NamedSharding(mesh, P(None, 'data'))`` fits each of them.
    """
    return {
      name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
      for name, (shape, dtype) in self.specs().items()
    }

  def init(self) -> dict[str, jax.Array]:
    """An empty table: every array zeros, ``written_epoch`` all ``layout.NEVER_WRITTEN``.

    Pure ``jnp`` without arguments, so ``jax.jit(table.init, out_shardings=sharding)()``
    builds the table directly in its sharded place.
    """
    arrays = {name: jnp.zeros(shape, dtype) for name, (shape, dtype) in self.specs().items()}
    arrays['written_epoch'] = jnp.full_like(arrays['written_epoch'], layout.NEVER_WRITTEN)
    return arrays

  def _check_rows(self, rows) -> jax.Array:
    rows = jnp.asarray(rows)
    if rows.ndim != 1 or not jnp.issubdtype(rows.dtype, jnp.integer):
      raise ValueError(f'Table rows must be a 1-D integer array, got {rows.dtype} {rows.shape}.')
    return rows.astype(jnp.int32)

  def _slot(self, epoch) -> tuple[jax.Array, jax.Array]:
    epoch = jnp.asarray(epoch, jnp.int32)
    if epoch.ndim != 0:
      raise ValueError(f'The epoch must be a scalar, got shape {epoch.shape}.')
    return epoch, epoch % self.E_tilde

  def gather(self, arrays: dict[str, jax.Array], rows, epoch) -> tuple[jax.Array, jax.Array]:
    """Reads the targets of epoch ``epoch`` (Algorithm 1, line 5; Eq. 9), as ``LogitTable.gather``.

    With top-k storage the targets are reconstructed (:func:`reconstruct_topk`); with int8
    storage the (kept) logits are ``codes * row_scale + row_min`` (:func:`dequantise_int8`,
    within ``row_scale / 2`` of the logits written, plus float32 rounding). Float32 and
    bfloat16 full storage read back exactly what the host table would.

    Args:
      arrays: the table's arrays (:meth:`init`, or the last :meth:`write`'s result).
      rows: int [B] (traced), distinct rows in [0, num_rows): the batch's example ids. A row
        outside the range reads as never written (a masked zero target), never another row.
      epoch: int32 scalar (traced), the current epoch counted from 1.

    Returns:
      ``(target_logits, target_mask)``: float32 [B, num_classes], the logits written for
      these rows in epoch ``epoch - E_tilde`` (0 where invalid), and float32 [B], 1 where
      the row was written in exactly that epoch, else 0.
    """
    rows = self._check_rows(rows)
    epoch, slot = self._slot(epoch)
    written = _read(arrays['written_epoch'], slot, rows, layout.NEVER_WRITTEN)  # [B]
    mask = written == epoch - self.E_tilde
    kept = _read(arrays[self._kept], slot, rows, 0)  # [B, K] or [B, k]
    if self.dtype == 'int8':
      kept = dequantise_int8(
        kept, _read(arrays['row_min'], slot, rows, 0), _read(arrays['row_scale'], slot, rows, 0)
      )
    if self.topk:
      targets = reconstruct_topk(
        kept,
        _read(arrays['topk_ids'], slot, rows, 0),
        _read(arrays['rest_lse'], slot, rows, 0),
        num_classes=self.num_classes,
        tau=self.tau,
      )
    else:
      targets = kept.astype(jnp.float32)
    targets = jnp.where(mask[:, None], targets, 0.0)  # Never used: masked out of the loss.
    return targets, mask.astype(jnp.float32)

  def write(self, arrays: dict[str, jax.Array], rows, logits, epoch) -> dict[str, jax.Array]:
    """Records the step's logits for epoch ``epoch`` (Algorithm 1, line 4), as ``LogitTable.write``.

    Compresses with :func:`compress_topk` and :func:`quantise_int8` as the layout asks, then
    writes slot ``epoch % E_tilde`` of ``rows`` and sets their ``written_epoch`` to ``epoch``.

    Args:
      arrays: the table's arrays; not modified (donate them to the jitted step so that XLA
        updates them in place).
      rows: int [B] (traced), distinct rows in [0, num_rows). A row outside the range is
        dropped (no clamping onto another row); repeated rows are undefined.
      logits: float [B, num_classes] (traced; cast to float32), the step's own logits.
      epoch: int32 scalar (traced), the current epoch counted from 1.

    Returns:
      The new arrays (same names, shapes, dtypes and, under ``jit`` with matching
      ``out_shardings``, shardings).

    Raises:
      ValueError: at trace time, if ``logits`` is not [B, num_classes] for B rows.
    """
    rows = self._check_rows(rows)
    if tuple(logits.shape) != (rows.shape[0], self.num_classes):
      raise ValueError(
        f'Logits of shape {tuple(logits.shape)} do not match {rows.shape[0]} ids x '
        f'{self.num_classes} classes of the SAF table.'
      )
    epoch, slot = self._slot(epoch)
    new = dict(arrays)
    kept = jnp.asarray(logits, jnp.float32)
    if self.topk:
      kept, top_ids, rest_lse = compress_topk(kept, k=self.topk, tau=self.tau)
      new['topk_ids'] = _write(arrays['topk_ids'], slot, rows, top_ids)
      new['rest_lse'] = _write(arrays['rest_lse'], slot, rows, rest_lse)
    if self.dtype == 'int8':
      kept, row_min, row_scale = quantise_int8(kept)
      new['row_min'] = _write(arrays['row_min'], slot, rows, row_min)
      new['row_scale'] = _write(arrays['row_scale'], slot, rows, row_scale)
    new[self._kept] = _write(arrays[self._kept], slot, rows, kept)
    new['written_epoch'] = _write(
      arrays['written_epoch'], slot, rows, jnp.broadcast_to(epoch, rows.shape)
    )
    return new

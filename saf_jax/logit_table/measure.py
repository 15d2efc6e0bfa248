r"""How far a storage layout moves SAF's trajectory loss (Eq. 9) and its gradient, measured.

Each layout of :mod:`saf_jax.logit_table.layout` stores a target :math:`\hat t` in place of
the logits :math:`t`. :func:`storage_error` writes given logits through a
:class:`~saf_jax.logit_table.host.LogitTable` of that layout, reads them back, and compares
the loss :math:`\tau^2 \cdot \mathrm{mean}_i\, \mathrm{KL}(\mathrm{softmax}(t_i/\tau) \|
\mathrm{softmax}(z_i/\tau))` of both targets against a student's logits :math:`z`, in float64
NumPy; :func:`topk_compression_error` does so for top-k storage. They measure real logits,
e.g. a trained run's saved table (``saf_jax.tools.table_report``), against the bounds of the
layout module's docstring.

References:
  Du et al, `Sharpness-Aware Training for Free <https://arxiv.org/abs/2205.14083>`_, 2022
"""

import numpy as np

from saf_jax.logit_table import host, layout


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


def _ratio(num: float, den: float) -> float:
  """num / den, with 0 / 0 := 0 and x / 0 := inf."""
  if den:
    return num / den
  return 0.0 if num == 0 else float('inf')


def _logit_pair(target_logits, student_logits) -> tuple[np.ndarray, np.ndarray]:
  """Both float [N, K] arrays as float64, or ValueError unless their shapes are [N, K], N >= 1."""
  full = np.asarray(target_logits, np.float64)
  student = np.asarray(student_logits, np.float64)
  if full.ndim != 2 or full.shape != student.shape or not full.shape[0]:
    raise ValueError(
      f'target_logits and student_logits must both be [N, K] with N >= 1, got '
      f'{full.shape} and {student.shape}.'
    )
  return full, student


def _measure(
  full: np.ndarray, student: np.ndarray, *, tau: float, dtype: str, topk: int
) -> dict[str, float]:
  """:func:`storage_error` of float64 [N, K] target and student logits, checked as a pair."""
  if tau is None or not tau > 0:
    raise ValueError(f'tau must be > 0 (config.method.saf.tau), got {tau}.')
  num, num_classes = full.shape
  table = host.LogitTable(num, num_classes, E_tilde=1, dtype=dtype, topk=topk, tau=tau)
  ids = np.arange(num)
  table.write(ids, full.astype(np.float32), epoch=1)  # Logits arrive as float32.
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
  full, student = _logit_pair(target_logits, student_logits)
  return _measure(full, student, tau=tau, dtype=dtype, topk=topk)


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
  full, student = _logit_pair(target_logits, student_logits)
  if not k >= 1:  # storage_error takes 0 as full storage; the table checks k < K.
    raise ValueError(layout.topk_range_message(k, full.shape[1], full_storage=False))
  stats = _measure(full, student, tau=tau, dtype=dtype, topk=k)
  stats['trajectory_loss_topk'] = stats.pop('trajectory_loss_stored')
  return stats

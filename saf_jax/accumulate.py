r"""Gradient accumulation: one step's global batch as :math:`M` micro-batches in one ``lax.scan``.

``config.input.accum_steps`` = :math:`M`. The step's gradient is the mean of the
micro-batches' gradients, computed one micro-batch at a time inside the compiled step, so
that only one micro-batch's activations are alive at once: memory follows the micro-batch
(:math:`B/M` examples), not the batch :math:`B`.

**Split.** Micro-batch :math:`j \in [0, M)` holds rows :math:`j, j + M, j + 2M, \ldots` of
the batch (``x.reshape(B/M, M, ...)[:, j]``). With the batch's rows split over the devices
in contiguous blocks of :math:`B/D` (a multiple of :math:`M`), every micro-batch takes
:math:`B/(DM)` rows of each device's own block: no communication, and inside
``jax.shard_map`` (the per-device perturbation scope) the same rule on the local block picks
the same rows. Per-example outputs (SAF's logits) come back in batch order (:func:`merge`).

**Exact means.** Each micro-batch's objective is normalised by the *global* batch's counts,
computed before the scan (:func:`denominators`): the cross-entropy by :math:`B/M`, and the
trajectory loss's masked KL sum by :math:`\max(\sum_{i \in B} m_i, 1)/M`, so that

.. math::

  \frac{1}{M} \sum_j L_j(\theta) = L_B(\theta), \qquad
  L_j = \frac{M}{B} \sum_{i \in j} \ell_i
    + \lambda \tau^2 \frac{M \sum_{i \in j} m_i\, \mathrm{KL}_i}{\max(\sum_{i \in B} m_i, 1)}

exactly, also when SAF's mask differs between micro-batches (a micro-batch's own masked mean
would weigh its valid targets differently). Without BatchNorm the accumulated step is the
one-batch step up to float rounding.

**BatchNorm.** Each micro-batch's training forward normalises with its own statistics
(as a batch of :math:`B/M` would), and each starts from the step's running statistics
:math:`r`. The new running statistics are the mean over micro-batches of each one's
update: :math:`\frac{1}{M}\sum_j (\mu r + (1 - \mu) s_j) = \mu r + (1 - \mu) \bar s`, one
momentum update per step with :math:`\bar s` the mean of the micro-batch means (the global
mean) and of the micro-batch variances (Flax's biased variance; the mean of the
within-micro-batch variances, without the spread of the micro-batch means).

**SAM family** (``config.method.accum_scope``): ``'accumulated'`` takes the perturbation from
the mean gradient of the whole batch and gives the transform a ``grad_fn`` that runs a
second scan over the micro-batches at the perturbed params (the big-batch method, exactly
without BatchNorm); ``'per_microbatch'`` gives each micro-batch its own perturbation and
averages the final gradients (``transforms._sam_common.per_microbatch_final``).
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

ACCUM_SCOPES = ('accumulated', 'per_microbatch')

# The SAM-family methods without a per-micro-batch scope, and why (validation states it).
PER_MICROBATCH_REFUSED = {
  'looksam': "its stored component g_v belongs to one step's gradient, not to a micro-batch's",
  'msam': 'its perturbation comes from the momentum, not from a micro-batch gradient',
  'rwp': 'its perturbation is random noise, not from a micro-batch gradient',
}

Objective = Callable[..., tuple[jax.Array, Any]]
"""``objective(params, sub, denominators=None) -> (loss, (logits, batch_stats, ce, traj,
per_example))``, the training step's objective (``train_steps``): ``sub`` a dict of batch
arrays (``image``, ``label``, optional ``target_logits``, ``target_mask`` and ``weight``),
``denominators`` None (the batch's own means) or :func:`denominators`' dict."""


def check_accum_steps(accum_steps: int, batch_size: int | None = None) -> None:
  """Raises ValueError unless ``accum_steps`` is an int >= 1 (dividing ``batch_size`` if given)."""
  if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
    raise ValueError(f'accum_steps must be an integer >= 1, got {accum_steps!r}.')
  if batch_size is not None and batch_size % accum_steps:
    raise ValueError(
      f'accum_steps={accum_steps} must divide the batch of {batch_size} rows (per device in '
      'the per-device scope).'
    )


def microbatch(tree: Any, j: jax.Array | int, num: int) -> Any:
  """Micro-batch ``j`` of ``num``: rows ``j::num`` of every leaf.

  Args:
    tree: pytree of arrays [B, ...], ``B`` a multiple of ``num``.
    j: int32 scalar in [0, num), may be traced.
    num: :math:`M`, the number of micro-batches.

  Returns:
    The pytree with leaves [B / num, ...]: ``x.reshape(B / num, num, ...)[:, j]``.
  """

  def take(x):
    grouped = x.reshape(x.shape[0] // num, num, *x.shape[1:])
    return jax.lax.dynamic_index_in_dim(grouped, j, axis=1, keepdims=False)

  return jax.tree.map(take, tree)


def merge(stacked: Any) -> Any:
  """Inverse of :func:`microbatch` over all ``j``: leaves [M, b, ...] -> [b M, ...] in batch
  order (row ``i M + j`` is ``stacked[j, i]``)."""

  def put(x):
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])

  return jax.tree.map(put, stacked)


def denominators(sub: dict[str, jax.Array], num: int) -> dict[str, jax.Array | float]:
  r"""Each micro-batch's normalisers, from the whole (sub-)batch, before the scan.

  With :math:`w_i` = ``sub['weight']`` (1 without) and :math:`m_i` = ``sub['target_mask']``
  (1 without): ``'ce'`` :math:`= \sum_i w_i / M` and ``'kl'`` :math:`= \max(\sum_i w_i m_i,
  1) / M`. A micro-batch's objective is :math:`\sum_{i \in j} w_i \ell_i / \mathrm{ce} +
  \lambda \tau^2 \sum_{i \in j} w_i m_i \mathrm{KL}_i / \mathrm{kl}`, and the mean over the
  :math:`M` micro-batches is the whole batch's weighted, masked mean.

  Args:
    sub: the batch dict, leaves [B, ...].
    num: :math:`M`.

  Returns:
    ``{'ce': float32 scalar, 'kl': float32 scalar}`` (Python floats where static).
  """
  size = sub['label'].shape[0]
  weight, mask = sub.get('weight'), sub.get('target_mask')
  ce = size / num if weight is None else jnp.sum(weight) / num
  if mask is not None:
    mask = mask.astype(jnp.float32)
  valid = mask if weight is None else (weight if mask is None else weight * mask)
  kl = ce if valid is None else jnp.maximum(jnp.sum(valid), 1.0) / num
  return {'ce': ce, 'kl': kl}


def map_microbatches(fn: Callable[[Any], Any], tree: Any, num: int) -> Any:
  """``fn`` of each micro-batch in turn (``lax.map``: one micro-batch's forward at a time).

  Args:
    fn: ``fn(micro) -> outputs`` with leaves [B / num, ...] (e.g. MESA's teacher logits).
    tree: the batch, leaves [B, ...].
    num: :math:`M`.

  Returns:
    ``fn``'s outputs for the whole batch, leaves [B, ...] in batch order (:func:`merge`).
  """
  stacked = jax.lax.map(lambda j: fn(microbatch(tree, j, num)), jnp.arange(num))
  return merge(stacked)


def mean_gradient(
  loss_fn: Callable[[Any, Any], tuple[jax.Array, Any]],
  params: Any,
  tree: Any,
  num: int,
  *,
  keep_each: bool = False,
) -> tuple[Any, Any, Any]:
  r""":math:`\frac{1}{M}\sum_j \nabla_\theta\, \mathrm{loss\_fn}(\theta, \mathrm{micro}_j)`, one
  micro-batch at a time (``lax.scan``; the sum is a buffer like ``params``).

  Args:
    loss_fn: ``loss_fn(params, micro) -> (loss, aux)``.
    params: :math:`\theta`.
    tree: the batch, leaves [B, ...].
    num: :math:`M`.
    keep_each: also return each micro-batch's gradient, stacked (memory: M x params).

  Returns:
    ``(mean gradient, (losses [M], aux stacked [M, ...]), gradients [M, ...] or None)``.
  """

  def body(total, j):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, microbatch(tree, j, num))
    total = jax.tree.map(jnp.add, total, grads)
    return total, ((loss, aux), grads if keep_each else None)

  # zeros_like keeps params' device-varying type inside jax.shard_map.
  zeros = jax.tree.map(jnp.zeros_like, params)
  total, (outputs, each) = jax.lax.scan(body, zeros, jnp.arange(num))
  return jax.tree.map(lambda x: x / num, total), outputs, each


def accumulated_pass(
  objective: Objective,
  params: Any,
  full: dict[str, jax.Array],
  *,
  num: int,
  perturbation: str | None,
  scope: str,
  sam_step: bool | None,
) -> tuple[tuple[Any, ...], Any, dict[str, Any]]:
  r"""The clean pass of an accumulated step, and the SAM-family transform's arguments.

  Args:
    objective: the step's objective (:data:`Objective`).
    params: where the clean gradient is taken (MSAM: :math:`\tilde\theta`).
    full: the batch with its targets: ``image`` [B, ...], ``label`` [B] and, for the
      trajectory loss, ``target_logits`` float32 [B, K] (SAF: ``target_mask`` [B]).
    num: :math:`M \ge 2`, dividing B.
    perturbation: the SAM-family method, or None.
    scope: ``'accumulated'`` or ``'per_microbatch'`` (:data:`ACCUM_SCOPES`).
    sam_step: LookSAM's static step kind (``transforms.looksam``), or None.

  Returns:
    ``((loss, logits [B, K] in batch order, batch_stats, ce, traj), grads, extra_args)``:
    the means over micro-batches (the global batch's values), the new running statistics
    (module docstring), the mean gradient, and the keyword arguments of ``tx.update``.

  Raises:
    ValueError: if ``num`` does not divide B.
  """
  check_accum_steps(num, full['label'].shape[0])
  den = denominators(full, num)
  per_microbatch = perturbation not in (None, 'msam') and scope == 'per_microbatch'

  def loss_fn(p, micro):
    return objective(p, micro, den)

  grads, (loss, aux), each = mean_gradient(loss_fn, params, full, num, keep_each=per_microbatch)
  logits, batch_stats, ce, traj, per_example = aux
  means = (
    jnp.mean(loss),
    merge(logits),
    jax.tree.map(lambda x: jnp.mean(x, axis=0), batch_stats),
    jnp.mean(ce),
    jnp.mean(traj),
  )
  if perturbation in (None, 'msam'):  # MSAM's gradient is already at theta_tilde.
    return means, grads, {}
  if per_microbatch:
    microbatch_args = _microbatch_args(
      objective, full, num, den, per_example, esam=perturbation == 'esam'
    )
    return means, grads, {'microbatch_grads': each, 'microbatch_args': microbatch_args}
  args = _accumulated_args(objective, full, num, den, perturbation, sam_step, per_example)
  return means, grads, args


def _loss_only(objective, den):
  return lambda p, micro: (objective(p, micro, den)[0], None)


def _accumulated_args(objective, full, num, den, perturbation, sam_step, per_example):
  """``grad_fn`` (and kin) of the big-batch perturbation: a second scan at given params."""

  def grad_fn(params, indices=None):
    # Perturbed passes write no batch_stats: the aux output is dropped.
    if indices is None:
      return mean_gradient(_loss_only(objective, den), params, full, num)[0]
    sub = _select(full, indices, num)  # ESAM's B+: its rows, weighted, in micro-batches.
    return mean_gradient(_loss_only(objective, denominators(sub, num)), params, sub, num)[0]

  args = {'grad_fn': grad_fn}
  if perturbation == 'looksam' and sam_step is not None:
    args['sam_step'] = sam_step
  if perturbation == 'esam':
    args['per_example_loss_fn'] = lambda p: map_microbatches(
      lambda micro: objective(p, micro, den)[1][4], full, num
    )
    args['per_example_losses'] = merge(per_example)
  return args


def _select(full, indices, num):
  r"""Rows ``indices`` (int32 [k]) of ``full``, padded to a multiple of ``num`` rows.

  The padding repeats selected rows with ``weight`` 0; the selected rows have weight 1. The
  weighted objective over the padded rows is the objective of the :math:`k` rows exactly
  (without BatchNorm; with it, the padding rows enter the micro-batches' statistics).
  """
  k = indices.shape[0]
  padded = math.ceil(k / num) * num
  rows = indices[jnp.arange(padded) % k]
  sub = jax.tree.map(lambda x: x[rows], full)
  sub['weight'] = (jnp.arange(padded) < k).astype(jnp.float32)
  return sub


def _microbatch_args(objective, full, num, den, per_example, esam):
  """``j -> kwargs`` of micro-batch ``j``'s final gradient: ``grad_fn``, the gradient of its
  objective :math:`L_j` (and for ESAM its per-example losses, at given params and clean)."""

  def args(j):
    micro = microbatch(full, j, num)

    def grad_fn(params, indices=None):
      if indices is None:
        return jax.grad(lambda p: objective(p, micro, den)[0])(params)
      # ESAM's B+ within micro-batch j: their own mean, as the one-batch step's subset.
      sub = jax.tree.map(lambda x: x[indices], micro)
      return jax.grad(lambda p: objective(p, sub)[0])(params)

    if not esam:
      return {'grad_fn': grad_fn}
    return {
      'grad_fn': grad_fn,
      'per_example_loss_fn': lambda p: objective(p, micro, den)[1][4],
      'per_example_losses': per_example[j],
    }

  return args

r"""Losses: cross-entropy and the SAF/MESA trajectory loss.

The trajectory loss of Du et al. 2022 compares the current softened predictions of
each example with a *target* produced either by the same model :math:`\tilde E` epochs
ago (SAF, Eq. 9) or by an EMA copy of the weights (MESA, Eq. 13):

.. math::

  L^{tra} = \frac{\tau^2}{|B|} \sum_{i \in B}
      \mathrm{KL}\big(\mathrm{softmax}(t_i / \tau) \,\|\, \mathrm{softmax}(z_i / \tau)\big)

with :math:`z` the current logits (``logits``), :math:`t` the target logits
(``target_logits``) and :math:`\tau` the temperature (``temperature``, ``tau`` in configs).
The caller multiplies by :math:`\lambda` (``lam``).

References:
  Du et al, `Sharpness-Aware Training for Free <https://arxiv.org/abs/2205.14083>`_, 2022
"""

import jax
import jax.numpy as jnp


def per_example_cross_entropy(
  logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0
) -> jax.Array:
  r"""Softmax cross-entropy of each example with integer labels, optionally smoothed.

  With label smoothing :math:`\epsilon` the target is :math:`(1 - \epsilon)` on the label
  plus :math:`\epsilon / K` on every class (Szegedy et al. 2016; timm's
  ``LabelSmoothingCrossEntropy``, used by the paper's ImageNet runs with 0.1):
  :math:`(1 - \epsilon)\,\mathrm{CE} - \epsilon\,\mathrm{mean}_k \log p_k`.

  Args:
    logits: float [batch, num_classes], unnormalised; computed in float32.
    labels: int [batch], class ids in [0, num_classes).
    label_smoothing: :math:`\epsilon \in [0, 1)`; 0 is the plain cross-entropy.

  Returns:
    float32 [batch], in nats.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  if not label_smoothing:
    return nll
  return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels (Eq. 1 of Du et al. 2022).

  Args:
    logits: float [batch, num_classes], unnormalised; computed in float32.
    labels: int [batch], class ids in [0, num_classes).

  Returns:
    float32 scalar, the mean over the batch, in nats.
  """
  return jnp.mean(per_example_cross_entropy(logits, labels))


def per_example_kl(logits: jax.Array, target_logits: jax.Array, *, temperature: float) -> jax.Array:
  r""":math:`\mathrm{KL}(\mathrm{softmax}(t_i/\tau) \| \mathrm{softmax}(z_i/\tau))` per example.

  Args:
    logits: float [batch, num_classes], the student's logits :math:`z`.
    target_logits: float [batch, num_classes], the target's logits :math:`t`.
    temperature: :math:`\tau > 0`.

  Returns:
    float32 [batch], in nats, without the :math:`\tau^2` factor.
  """
  log_p_student = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  log_p_target = jax.nn.log_softmax(target_logits.astype(jnp.float32) / temperature, axis=-1)
  p_target = jnp.exp(log_p_target)
  # 0 * log(0) := 0: a target probability that underflowed must add nothing, not NaN.
  kl_terms = jnp.where(p_target > 0, p_target * (log_p_target - log_p_student), 0.0)
  return jnp.sum(kl_terms, axis=-1)


def trajectory_loss(
  logits: jax.Array,
  target_logits: jax.Array,
  *,
  temperature: float,
  mask: jax.Array | None = None,
  denominator: jax.Array | float | None = None,
) -> jax.Array:
  r"""The :math:`\tau^2`-scaled trajectory KL of SAF (Eq. 9) and MESA (Eq. 13).

  .. math::

    \tau^2 \cdot \frac{\sum_i m_i \, \mathrm{KL}(p^t_i \| p^z_i)}{D},
    \quad D = \max(\sum_i m_i, 1),
    \quad p^t_i = \mathrm{softmax}(t_i/\tau),\; p^z_i = \mathrm{softmax}(z_i/\tau)

  (:math:`m_i = 1` without a mask; :math:`D` = ``denominator`` when one is given).

  The direction is KL(target ‖ student), and the :math:`\tau^2` factor follows the
  reference implementation (and Hinton et al.'s distillation loss): it keeps the
  gradient's scale independent of :math:`\tau`.

  .. note::
    Eq. 9 and Eq. 13 as printed in the paper omit the :math:`\tau^2` factor and write
    :math:`\lambda` inside Eq. 9; here :math:`\lambda` (``lam``) is applied by the
    caller, as in Algorithm 1, line 11.

  Everything is computed in float32 from log-softmax (never the log of a softmax), so a
  target probability that underflows to 0 contributes exactly 0 and never NaN.

  Args:
    logits: float [batch, num_classes], the current model's unnormalised logits
      :math:`z = f_\theta(x)`.
    target_logits: float [batch, num_classes], the target's unnormalised logits: the
      same examples' logits recorded :math:`\tilde E` epochs ago (SAF) or the EMA
      model's logits (MESA). Treated as constants only if the caller stops gradients.
    temperature: :math:`\tau > 0`, the softening temperature (``tau``).
    mask: optional float or bool [batch]; 1 where the example's target is valid. Masked
      examples contribute neither to the sum nor to the count.
    denominator: optional float32 scalar :math:`D > 0` replacing :math:`\max(\sum_i m_i,
      1)` (the batch size without a mask). Gradient accumulation (``saf_jax.accumulate``)
      passes, for each of :math:`M` micro-batches, the *global* batch's
      :math:`\max(\sum_i m_i, 1) / M`: the micro-batches' losses then average to the global
      batch's masked mean exactly, also when their masks differ.

  Returns:
    float32 scalar: :math:`\tau^2` times the mean KL over unmasked examples, in nats;
    0 when no example is unmasked.
  """
  kl = per_example_kl(logits, target_logits, temperature=temperature)  # [B]
  if denominator is not None:
    masked = kl if mask is None else kl * mask.astype(jnp.float32)
    return temperature**2 * jnp.sum(masked) / denominator
  if mask is None:
    mean_kl = jnp.mean(kl)
  else:
    mask = mask.astype(jnp.float32)
    mean_kl = jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  return temperature**2 * mean_kl  # tau^2 as in the reference code; Eq. 9/13 omit it.

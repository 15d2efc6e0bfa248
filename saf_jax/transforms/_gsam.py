r"""GSAM (Zhuang et al. 2022): SAM plus an ascent on the surrogate gap, radius tied to the LR.

``gsam_rho`` maps the step's learning rate to the radius; ``gsam`` keeps ``SAMState``.
"""

import jax
import jax.numpy as jnp
import optax

from saf_jax.transforms import _sam_common


def gsam_rho(
  learning_rate: float | jax.Array,
  *,
  rho_max: float,
  rho_min: float,
  lr_max: float,
  lr_min: float,
) -> jax.Array:
  r"""GSAM's radius, proportional to the learning rate (Zhuang et al. 2022, Sec. 4).

  .. math::

    \rho_t = \rho_{min} + (\rho_{max} - \rho_{min})
      \frac{|\eta_t| - \eta_{min}}{\eta_{max} - \eta_{min}},
    \quad \text{clipped to } [\rho_{min}, \rho_{max}]

  The clip keeps :math:`\rho_t` in range, also during a warm-up whose learning rate lies
  below :math:`\eta_{min}`. With :math:`\eta_{max} = \eta_{min}` (constant schedule),
  :math:`\rho_t = \rho_{max}`.

  Args:
    learning_rate: :math:`\eta_t`, the step's learning rate (its absolute value is used).
    rho_max, rho_min: the radius range, :math:`0 \le \rho_{min} \le \rho_{max}`.
    lr_max, lr_min: the schedule's peak and final learning rates.

  Returns:
    float32 scalar :math:`\rho_t`.
  """
  lr = jnp.abs(jnp.asarray(learning_rate, jnp.float32))
  if lr_max == lr_min:
    return jnp.asarray(rho_max, jnp.float32)
  frac = (lr - lr_min) / (lr_max - lr_min)
  return jnp.clip(rho_min + (rho_max - rho_min) * frac, rho_min, rho_max)


def gsam(
  base_optimizer: optax.GradientTransformation,
  *,
  learning_rate: float | optax.Schedule,
  lr_max: float,
  lr_min: float = 0.0,
  rho_max: float = 0.05,
  rho_min: float = 0.05,
  alpha: float = 0.1,
  batch_axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Surrogate Gap guided SAM (Zhuang et al. 2022, Algorithm 1).

  .. math::

    g = \nabla L_B(\theta), \quad
    g_p = \nabla L_B\big(\theta + \rho_t\, g / \|g\|\big), \quad
    g_\perp = g - \Big(g \cdot \frac{g_p}{\|g_p\|}\Big) \frac{g_p}{\|g_p\|}, \qquad
    \theta \leftarrow \theta + \mathrm{base}(g_p - \alpha\, g_\perp)

  :math:`g_\perp` is the part of the clean gradient orthogonal to the perturbed one;
  descending along :math:`-\alpha g_\perp` lowers the surrogate gap without changing the
  perturbed loss to first order. :math:`\rho_t` follows :func:`gsam_rho` of the step's
  learning rate. With :math:`\alpha = 0` and :math:`\rho_{min} = \rho_{max}` this is
  :func:`sam`. BatchNorm policy and perturbation scope as :func:`sam` (per device,
  :math:`g_\perp` is formed from each device's gradients before averaging).

  Args:
    base_optimizer: any optax transform; it receives :math:`g_p - \alpha g_\perp`.
    learning_rate: the base optimizer's learning rate or schedule (of the step count).
    lr_max, lr_min: the schedule's peak and final learning rates.
    rho_max, rho_min: :math:`0 \le \rho_{min} \le \rho_{max}`.
    alpha: :math:`\alpha \ge 0`, weight of the ascent on the surrogate gap.
    batch_axis_name: as in :func:`sam`.

  Returns:
    A gradient transformation; ``update(grads, state, params, *, grad_fn)``.

  Raises:
    ValueError: if ``rho_min < 0``, ``rho_min > rho_max``, ``alpha < 0`` or
      ``lr_min > lr_max``.

  References:
    Zhuang et al, `Surrogate Gap Minimization Improves Sharpness-Aware Training
    <https://arxiv.org/abs/2203.08065>`_, 2022
  """
  _sam_common.check_nonnegative('gsam rho_min', rho_min)
  _sam_common.check_nonnegative('gsam alpha', alpha)
  if rho_min > rho_max:
    raise ValueError(f'gsam rho_min must be <= rho_max, got {rho_min} > {rho_max}.')
  if lr_min > lr_max:
    raise ValueError(f'gsam lr_min must be <= lr_max, got {lr_min} > {lr_max}.')
  schedule = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)

  def final_gradient(g, params, count, grad_fn, **extra_args):
    del extra_args
    rho = gsam_rho(schedule(count), rho_max=rho_max, rho_min=rho_min, lr_max=lr_max, lr_min=lr_min)
    g_p = grad_fn(optax.apply_updates(params, _sam_common.sam_perturbation(g, rho)))
    g_p_unit = _sam_common.tree_scale(g_p, _sam_common.safe_inverse(_sam_common.global_norm(g_p)))
    g_along_g_p = _sam_common.tree_vdot(g, g_p_unit)
    g_perp = _sam_common.tree_axpy(-g_along_g_p, g_p_unit, g)  # Algorithm 1, line 6.
    return _sam_common.tree_axpy(-alpha, g_perp, g_p)

  return _sam_common.wrap_base(
    'gsam', base_optimizer, final_gradient, batch_axis_name=batch_axis_name
  )

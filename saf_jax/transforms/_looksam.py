r"""LookSAM (Liu et al. 2022): the SAM gradient every ``k`` steps, a reused direction between.

Its state, ``LookSAMState``, holds the reused component :math:`g_v` next to the base state.
"""

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from saf_jax.transforms import _sam_common

# A g_v whose norm is below this fraction of ||g_s|| is rounding noise.
_REL_TOL = 1e-5


class LookSAMState(NamedTuple):
  """State of :func:`looksam`.

  Attributes:
    count: optimizer steps taken; shape=(), int32. Steps with ``count % k == 0``
      compute the full SAM gradient.
    g_v: the stored orthogonal component :math:`g_v`, a pytree matching ``params``
      (zeros before the first SAM step).
    base_state: the state of the wrapped base optimizer.
  """

  count: jax.Array
  g_v: Any
  base_state: optax.OptState


def looksam(
  base_optimizer: optax.GradientTransformation,
  *,
  rho: float = 0.05,
  k: int = 5,
  alpha: float = 0.7,
  batch_axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM (Liu et al. 2022, Algorithm 1): the SAM gradient every ``k`` steps only.

  On steps :math:`t \equiv 0 \pmod k`, with :math:`g = \nabla L_B(\theta)`:

  .. math::

    g_s = \nabla L_B\big(\theta + \rho\, g/\|g\|\big), \quad
    g_v = g_s - \frac{g_s \cdot g}{\|g\|^2}\, g, \qquad
    \theta \leftarrow \theta + \mathrm{base}(g_s)

  and on the other steps, reusing the stored :math:`g_v` with the adaptive ratio:

  .. math::

    \theta \leftarrow \theta + \mathrm{base}\Big(g + \alpha \frac{\|g\|}{\|g_v\|}\, g_v\Big)

  The in-between steps call no ``grad_fn``, so they cost one forward-backward. By
  default the choice is made in the graph (``jax.lax.cond`` on ``count % k``); a loop
  that knows its step number can pass ``sam_step=`` (a Python bool, equal to
  ``count % k == 0``) and compile the two steps separately, which avoids the
  conditional's cost: XLA can run the SAM branch inside the conditional several times
  slower than the same SAM step outside it, enough to make LookSAM no faster than SAM.
  A :math:`g_v` whose norm is below 1e-5 of :math:`\|g_s\|` is rounding noise
  (:math:`g_s \parallel g`, e.g. :math:`\rho = 0`) and is stored as zero. With ``k = 1``
  this is :func:`sam` (no conditional). BatchNorm policy and perturbation scope as
  :func:`sam`; per device, the stored :math:`g_v` is the average of the devices' :math:`g_v`.

  Args:
    base_optimizer: any optax transform.
    rho: :math:`\rho \ge 0`, as in :func:`sam`.
    k: :math:`k \ge 1`, steps between SAM gradients (5 in the paper).
    alpha: :math:`\alpha \ge 0`, weight of the reused component (0.7 in the paper).
    batch_axis_name: as in :func:`sam`.

  Returns:
    A gradient transformation; ``update(grads, state, params, *, grad_fn,
    sam_step=None)``. A ``sam_step`` passed in is trusted to equal ``count % k == 0``
    (not checked in the graph); ``experiment.Experiment.dispatch_for`` derives it from
    ``state.step``, which advances with ``count``.

  Raises:
    ValueError: if ``rho < 0``, ``k < 1`` or ``alpha < 0`` (construction), or if
      ``grad_fn`` or ``params`` is missing (update).

  References:
    Liu et al, `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, 2022
  """
  _sam_common.check_nonnegative('looksam rho', rho)
  _sam_common.check_nonnegative('looksam alpha', alpha)
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
    raise ValueError(f'looksam k must be an integer >= 1, got {k!r}.')
  k = int(k)

  def init_fn(params):
    return LookSAMState(
      count=jnp.zeros([], jnp.int32),
      g_v=jax.tree.map(jnp.zeros_like, params),
      base_state=base_optimizer.init(params),
    )

  def update_fn(updates, state, params=None, *, grad_fn=None, sam_step=None, **extra_args):
    del extra_args
    grad_fn = _sam_common.require_grad_fn('looksam', grad_fn, params)
    g = updates

    def full_step(_):
      g_s = grad_fn(optax.apply_updates(params, _sam_common.sam_perturbation(g, rho)))  # Line 5.
      g_norm_sq = _sam_common.global_norm(g) ** 2
      safe_norm_sq = jnp.where(g_norm_sq > 0, g_norm_sq, 1)
      coef = jnp.where(g_norm_sq > 0, _sam_common.tree_vdot(g_s, g) / safe_norm_sq, 0)
      g_v = _sam_common.tree_axpy(-coef, g, g_s)  # Line 6: the part of g_s orthogonal to g.
      noise = _sam_common.global_norm(g_v) <= _REL_TOL * _sam_common.global_norm(g_s)
      g_v = _sam_common.tree_scale(g_v, jnp.where(noise, 0.0, 1.0))
      return g_s, _sam_common.maybe_pmean(g_v, batch_axis_name)

    def reuse_step(_):
      g_v_norm = _sam_common.global_norm(state.g_v)
      ratio = alpha * _sam_common.global_norm(g) * _sam_common.safe_inverse(g_v_norm)  # Line 8.
      return _sam_common.tree_axpy(ratio, state.g_v, g), state.g_v

    if k == 1:
      final, g_v = full_step(None)
    elif sam_step is None:
      final, g_v = jax.lax.cond(state.count % k == 0, full_step, reuse_step, None)
    else:
      final, g_v = (full_step if sam_step else reuse_step)(None)
    new_updates, base_state = _sam_common.base_update(
      base_optimizer, final, state.base_state, params, axis_name=batch_axis_name
    )
    return new_updates, LookSAMState(count=state.count + 1, g_v=g_v, base_state=base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

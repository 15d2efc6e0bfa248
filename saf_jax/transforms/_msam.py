r"""Momentum-SAM (Becker et al. 2024): perturb against the momentum, one gradient per step.

The perturbation is the base optimizer's own momentum buffer, normalised, so no ascent
gradient is computed. ``MSAMState`` keeps the radius next to the base state, so that
:func:`msam_perturbed_params` can give the point of the step's one gradient from the
state alone (the training step evaluates its only forward-backward there).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from saf_jax.transforms import _sam_common

# The base-optimizer states whose buffer is MSAM's momentum, and the buffer's field.
_MOMENTUM_FIELDS = ((optax.TraceState, 'trace'), (optax.ScaleByAdamState, 'mu'))


class MSAMState(NamedTuple):
  r"""State of :func:`msam`.

  Attributes:
    count: optimizer steps taken; shape=(), int32.
    rho: :math:`\rho`, the radius; shape=(), float32. In the state so that
      :func:`msam_perturbed_params` needs nothing else; once the state exists (a restored
      checkpoint too), it is this value, not ``msam``'s argument, that is used.
    base_state: the state of the wrapped base optimizer, which holds the momentum.
  """

  count: jax.Array
  rho: jax.Array
  base_state: optax.OptState


def msam_momentum(base_state: optax.OptState) -> Any:
  r"""The momentum buffer :math:`v` that MSAM follows, found in a base optimizer's state.

  ``optax.TraceState.trace`` (``optax.sgd(..., momentum=mu)``: :math:`v \leftarrow \mu v +
  g`, PyTorch's ``momentum_buffer``) or ``optax.ScaleByAdamState.mu`` (Adam/AdamW's first
  moment, PyTorch's ``exp_avg``), wherever it sits in the state (chains, masks).

  Args:
    base_state: the base optimizer's state.

  Returns:
    The buffer: a pytree matching the params.

  Raises:
    ValueError: if the state holds no such buffer (e.g. SGD without momentum) or several.
  """
  types = tuple(t for t, _ in _MOMENTUM_FIELDS)
  nodes = jax.tree.leaves(base_state, is_leaf=lambda x: isinstance(x, types))
  found = [getattr(n, f) for n in nodes for t, f in _MOMENTUM_FIELDS if isinstance(n, t)]
  if len(found) != 1:
    raise ValueError(
      f'msam needs a base optimizer with exactly one momentum buffer (optax.trace / optax.sgd '
      f'with momentum > 0, or Adam/AdamW), found {len(found)}.'
    )
  return found[0]


def _msam_state(opt_state: optax.OptState) -> MSAMState:
  """The one ``MSAMState`` in ``opt_state`` (itself, or inside a chain's tuple)."""
  nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, MSAMState))
  found = [n for n in nodes if isinstance(n, MSAMState)]
  if len(found) != 1:
    raise ValueError(f'Expected one MSAMState in the optimizer state, found {len(found)}.')
  return found[0]


def msam_perturbed_params(opt_state: optax.OptState, params: Any) -> Any:
  r""":math:`\tilde\theta_t = \theta_t - \rho\, v_t/\|v_t\|_2`: where MSAM takes its gradient.

  Becker et al. 2024, Algorithm 1 (the "perturb for next iteration" line, applied at the
  start of the step instead); :math:`v_t` is the base optimizer's momentum before this
  step (:func:`msam_momentum`) and :math:`\|\cdot\|_2` the global L2 norm over all leaves.
  A zero momentum (the first step) gives :math:`\tilde\theta_t = \theta_t`.

  Args:
    opt_state: the state of :func:`msam` (or a state holding exactly one ``MSAMState``).
    params: :math:`\theta_t`, the unperturbed params; any float dtypes.

  Returns:
    A pytree like ``params`` (same dtypes).

  Raises:
    ValueError: if ``opt_state`` holds no (or several) ``MSAMState``.
  """
  state = _msam_state(opt_state)
  v = msam_momentum(state.base_state)
  scale = state.rho * _sam_common.safe_inverse(_sam_common.global_norm(v))
  return _sam_common.tree_axpy(-scale, v, params)


def msam(
  base_optimizer: optax.GradientTransformation,
  *,
  rho: float = 3.0,
  batch_axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Momentum-SAM (Becker et al. 2024, Algorithm 1): SAM's ascent replaced by the momentum.

  With :math:`v_t` the base optimizer's momentum buffer (:func:`msam_momentum`) and
  :math:`\theta_t` the unperturbed params:

  .. math::

    \tilde\theta_t = \theta_t - \rho\, \frac{v_t}{\|v_t\|_2}, \qquad
    g_t = \nabla L_B(\tilde\theta_t), \qquad
    \theta_{t+1} = \theta_t + \mathrm{base}(g_t;\ \tilde\theta_t)

  For SGD with momentum :math:`\mu` as base this is :math:`v_{t+1} = \mu v_t + g_t +
  \lambda_{wd} \tilde\theta_t`, :math:`\theta_{t+1} = \theta_t - \eta_t v_{t+1}`: the
  same trajectory as the authors' ``MSAM`` optimizer, which *stores*
  :math:`\tilde\theta_t`, moves back to :math:`\theta_t = \tilde\theta_t + \rho
  v_t/\|v_t\|` inside ``step``, takes the SGD step and moves to
  :math:`\tilde\theta_{t+1}` (``optimizer/msam.py``; its L2 term is added at the stored,
  perturbed weights, hence the base optimizer gets :math:`\tilde\theta_t` as its params
  here). The two differ only in where the weights live: here ``params`` stay
  :math:`\theta_t` between steps, so evaluation, EMAs, checkpoints and analysis see the
  unperturbed weights with no ``move_back_from_momentumAscent()``. Their norm has a +1e-12;
  a zero momentum here gives no perturbation. One gradient per step, at
  :math:`\tilde\theta_t`; nothing at :math:`\theta_t`.

  With Adam/AdamW as base, :math:`v` is the first moment (``mu``), as the authors'
  ``AdamW_MSAM``; the decoupled weight decay then acts on :math:`\tilde\theta_t` (theirs
  decays the weights after the Adam step, a difference of order
  :math:`\eta\lambda_{wd}\rho`). A base without a momentum buffer is refused.

  .. note::
    BatchNorm: the step's only forward pass is at :math:`\tilde\theta_t`, so it is that
    pass that updates ``batch_stats`` (as in the authors' code, whose weights sit at
    :math:`\tilde\theta` during the training forward).

  Args:
    base_optimizer: an optax transform with a momentum buffer (SGD with momentum, Adam,
      AdamW); it receives :math:`g_t` with params :math:`\tilde\theta_t`.
    rho: :math:`\rho \ge 0`, the L2 radius in parameter units; the authors' CIFAR setting
      with SGD is 3 (``configs/CIFAR100_WRN16_4.ini``, ``[SAM] rho = 3``). With 0 this is
      the base optimizer exactly.
    batch_axis_name: mapped axis to average :math:`g_t` over (per-device scope, as in
      ``sam``; the point :math:`\tilde\theta_t` is the same on every device, and
      ``grad_fn`` gets it marked device-varying, from replicated ``params``), or None.

  Returns:
    A gradient transformation; ``update(grads, state, params, *, grad_fn=None)``. Without
    ``grad_fn``, ``grads`` is :math:`g_t`, the gradient the caller evaluated at
    ``msam_perturbed_params(state, params)`` (the training step does this, so that its one
    forward-backward also gives the loss, logits and ``batch_stats``). With ``grad_fn``,
    the transform calls ``grad_fn(msam_perturbed_params(state, params))`` once and
    ``grads`` is ignored (pass None).

  Raises:
    ValueError: if ``rho < 0`` (construction), if the base state has no momentum buffer
      (``init``), or if ``params``, or both ``grads`` and ``grad_fn``, are missing.

  References:
    Becker, Altrock and Risse, `Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024
  """
  _sam_common.check_nonnegative('msam rho', rho)

  def init_fn(params):
    base_state = base_optimizer.init(params)
    msam_momentum(base_state)  # Refuses a base without momentum now, not at the first step.
    return MSAMState(
      count=jnp.zeros([], jnp.int32), rho=jnp.asarray(rho, jnp.float32), base_state=base_state
    )

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError('msam.update needs params, the unperturbed point theta_t.')
    perturbed = msam_perturbed_params(state, params)
    if grad_fn is not None:
      grads = grad_fn(_sam_common.mark_varying(perturbed, batch_axis_name))
    else:
      grads = updates
    if grads is None:
      raise ValueError(
        'msam.update needs the gradient at msam_perturbed_params(state, params), or grad_fn=.'
      )
    new_updates, base_state = _sam_common.base_update(
      base_optimizer, grads, state.base_state, perturbed, axis_name=batch_axis_name
    )
    return new_updates, MSAMState(count=state.count + 1, rho=state.rho, base_state=base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

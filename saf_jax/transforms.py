r"""Optax-style transforms for sharpness-aware training.

Two groups: MESA's parameter EMA (``ema_params``), and the SAM-family baselines (``sam``,
``asam``, ``gsam``, ``looksam``, ``esam``), each wrapping a base optimizer. The latter
follow ``optax.contrib.sam``'s opaque mode: ``update`` receives the clean gradient
:math:`g = \nabla L_B(\theta)` and a ``grad_fn`` for the gradient at other params::

  eps = perturbation(g, params)                  # e.g. rho * g / ||g||  (SAM, Eq. 4)
  final = combine(g, grad_fn(params + eps))      # e.g. the perturbed gradient itself
  updates, base_state = base.update(final, base_state, params)

so that a loop with side effects (BatchNorm statistics) controls every forward pass.

MESA's teacher (Eq. 10 of Du et al. 2022) is an exponential moving average of the
weights, not of the updates (``optax.ema`` averages updates)::

  v_0 = theta_0
  v_t = ema_decay * v_{t-1} + (1 - ema_decay) * theta_t     # after every step

``ema_update`` is that rule on any pytree; the training loop applies it to ``params``
and ``batch_stats`` kept explicitly in ``TrainState``. ``ema_params`` wraps the same rule
as a gradient transformation for users with their own loop: put it *last* in an
``optax.chain`` (it needs the final updates to know the new params) and read the
average with ``get_ema_params``::

  tx = optax.chain(optax.sgd(0.1, momentum=0.9), transforms.ema_params(ema_decay=0.9995))
  opt_state = tx.init(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  teacher_params = transforms.get_ema_params(opt_state)
"""

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def _check_decay(ema_decay: float) -> None:
  if not 0.0 < ema_decay < 1.0:
    raise ValueError(
      f'config.method.mesa.ema_decay must lie in the open interval (0, 1), got {ema_decay}.'
    )


def ema_update(ema_tree: Any, tree: Any, *, ema_decay: float) -> Any:
  r"""One step of :math:`v \leftarrow \beta v + (1-\beta)\theta` (Eq. 10 of Du et al. 2022).

  Args:
    ema_tree: the running average :math:`v`, a pytree matching ``tree``.
    tree: the new value :math:`\theta` (e.g. params after this step's update).
    ema_decay: :math:`\beta \in (0, 1)`.

  Returns:
    The new average, same structure and dtypes as ``ema_tree``.
  """
  return jax.tree.map(
    lambda v, x: (ema_decay * v + (1.0 - ema_decay) * x.astype(v.dtype)).astype(v.dtype),
    ema_tree,
    tree,
  )


class EmaParamsState(NamedTuple):
  """State of :func:`ema_params`.

  Attributes:
    count: number of updates averaged so far; shape=(), int32.
    ema_params: the parameter average :math:`v_t`, a pytree matching ``params``.
  """

  count: jax.Array
  ema_params: Any


def ema_params(ema_decay: float) -> optax.GradientTransformationExtraArgs:
  r"""Keeps an EMA of the *parameters* in the optimizer state (MESA's teacher, Eq. 10).

  .. math::

    v_0 = \theta_0, \qquad v_t = \beta v_{t-1} + (1 - \beta)(\theta_{t-1} + u_t)

  where :math:`u_t` are the incoming (final) updates and :math:`\beta` is
  ``ema_decay``. Updates pass through unchanged.

  .. warning::
    Place it last in the chain: it assumes the updates it sees are the ones applied.

  Args:
    ema_decay: :math:`\beta \in (0, 1)`; 0.9995 for CIFAR, 0.9998 for ImageNet in the paper.

  Returns:
    A gradient transformation whose ``update`` requires ``params``.

  Raises:
    ValueError: if ``ema_decay`` is not in (0, 1).

  References:
    Du et al, `Sharpness-Aware Training for Free <https://arxiv.org/abs/2205.14083>`_, 2022
  """
  _check_decay(ema_decay)

  def init_fn(params):
    # A copy, not an alias: a step that donates params and opt_state must not donate
    # one buffer twice.
    return EmaParamsState(count=jnp.zeros([], jnp.int32), ema_params=jax.tree.map(jnp.copy, params))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError('ema_params needs `params` in update() to average the new weights.')
    new_params = optax.apply_updates(params, updates)
    new_ema = ema_update(state.ema_params, new_params, ema_decay=ema_decay)  # Eq. 10.
    return updates, EmaParamsState(count=state.count + 1, ema_params=new_ema)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def get_ema_params(opt_state: Any) -> Any:
  """Returns the averaged params held by an :func:`ema_params` link of ``opt_state``.

  Args:
    opt_state: the state of ``ema_params(...)`` alone or of a chain containing it.

  Returns:
    The pytree of averaged params (matching ``params``).

  Raises:
    ValueError: if no ``EmaParamsState`` is found, or more than one.
  """
  found = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaParamsState))
    if isinstance(s, EmaParamsState)
  ]
  if len(found) != 1:
    raise ValueError(f'Expected exactly one EmaParamsState in opt_state, found {len(found)}.')
  return found[0].ema_params


# --------------------------------------------------------------------------------------
# The SAM family: SAM, ASAM, GSAM, LookSAM and ESAM as wrappers of a base optimizer.
# --------------------------------------------------------------------------------------

GradFn = Callable[..., Any]
"""``grad_fn(params, indices=None) -> grads``: gradient of the mini-batch loss at ``params``.

``indices`` (int32 [k], only passed by :func:`esam`) restricts the mean loss to those
examples of the batch. It must not update BatchNorm statistics (see the module notes).
"""

# A direction whose norm is below this fraction of its reference is rounding noise.
_REL_TOL = 1e-5


def _check_nonnegative(name: str, value: float) -> None:
  if not value >= 0:
    raise ValueError(f'{name} must be >= 0, got {value}.')


def _norm(tree: Any) -> jax.Array:
  """Global L2 norm over all leaves, accumulated in float32."""
  return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def _scale(tree: Any, factor: jax.Array) -> Any:
  return jax.tree.map(lambda x: (x * factor).astype(x.dtype), tree)


def _axpy(a: jax.Array, x: Any, y: Any) -> Any:
  """``a * x + y`` leaf by leaf, in the dtype of ``y``."""
  return jax.tree.map(lambda xi, yi: (a * xi + yi).astype(yi.dtype), x, y)


def _safe_inverse(norm: jax.Array) -> jax.Array:
  """``1 / norm``, and 0 for a zero norm: a zero gradient gives a zero perturbation."""
  return jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)


def _sam_perturbation(grads: Any, rho: jax.Array | float) -> Any:
  r""":math:`\hat\epsilon = \rho\, g / \|g\|_2` (Eq. 4 of Du et al. 2022; Foret et al. 2021)."""
  return _scale(grads, rho * _safe_inverse(_norm(grads)))


def _maybe_pmean(tree: Any, axis_name: str | None) -> Any:
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name=axis_name)


def _require_grad_fn(name: str, grad_fn: GradFn | None, params: Any) -> GradFn:
  if grad_fn is None:
    raise ValueError(f'{name}.update needs grad_fn=..., the gradient at given params.')
  if params is None:
    raise ValueError(f'{name}.update needs params, the point the perturbation starts from.')
  return grad_fn


class SAMState(NamedTuple):
  """State of :func:`sam` and :func:`asam`.

  Attributes:
    count: optimizer steps taken; shape=(), int32.
    base_state: the state of the wrapped base optimizer.
  """

  count: jax.Array
  base_state: optax.OptState


def _base_update(base_optimizer, grads, state, params, *, axis_name):
  """Averages the final gradient over ``axis_name`` (per-device scope), then the base step."""
  grads = _maybe_pmean(grads, axis_name)
  return base_optimizer.update(grads, state, params)


def _wrap_base(
  name: str,
  base_optimizer: optax.GradientTransformation,
  final_gradient: Callable[..., Any],
  *,
  batch_axis_name: str | None,
) -> optax.GradientTransformationExtraArgs:
  """A transform with :class:`SAMState` whose base optimizer steps on a final gradient.

  ``final_gradient(g, params, count, grad_fn, **extra_args)`` maps the clean gradient to
  the method's gradient; the rest (state, checks, per-device averaging) is shared.
  """

  def init_fn(params):
    return SAMState(count=jnp.zeros([], jnp.int32), base_state=base_optimizer.init(params))

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    grad_fn = _require_grad_fn(name, grad_fn, params)
    final = final_gradient(updates, params, state.count, grad_fn, **extra_args)
    new_updates, base_state = _base_update(
      base_optimizer, final, state.base_state, params, axis_name=batch_axis_name
    )
    return new_updates, SAMState(count=state.count + 1, base_state=base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sam(
  base_optimizer: optax.GradientTransformation,
  *,
  rho: float = 0.05,
  batch_axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-Aware Minimization (Foret et al. 2021; Eq. 2-4 of Du et al. 2022).

  .. math::

    \hat\epsilon = \rho\, \frac{g}{\|g\|_2}, \quad g = \nabla L_B(\theta), \qquad
    \theta \leftarrow \theta + \mathrm{base}\big(\nabla L_B(\theta + \hat\epsilon)\big)

  with :math:`\rho` = ``rho`` and :math:`\|\cdot\|_2` the global L2 norm over all params
  (a zero gradient gives :math:`\hat\epsilon = 0`). ``update``'s first argument is
  :math:`g`, the gradient at ``params``; ``grad_fn`` gives the gradient at
  :math:`\theta + \hat\epsilon`, which goes to the base optimizer *at* ``params``.

  .. note::
    BatchNorm: ``batch_stats`` are updated once per step, by the caller, from the clean
    forward pass at :math:`\theta`; ``grad_fn`` must normalise with the current batch's
    statistics and write no running statistics.

  .. note::
    Perturbation scope: with ``batch_axis_name=None`` :math:`g` is whatever the caller
    passes (the global batch's gradient under ``jit``). Inside ``jax.shard_map`` with
    ``batch_axis_name`` set, :math:`g` and ``grad_fn`` are per device (each device
    perturbs with its own shard's gradient, the m-sharpness of Foret et al.) and the
    perturbed gradients are averaged over that axis before the base optimizer.

  Args:
    base_optimizer: any optax transform; it receives the perturbed gradient. Weight
      decay inside it acts on the final gradient only, never on :math:`\hat\epsilon`.
    rho: :math:`\rho \ge 0`, L2 radius of the perturbation, in parameter units.
    batch_axis_name: mapped axis to average the final gradient over, or None.

  Returns:
    A gradient transformation; ``update(grads, state, params, *, grad_fn)`` with
    ``grad_fn(params) -> grads`` (see :data:`GradFn`).

  Raises:
    ValueError: if ``rho < 0`` (construction) or ``grad_fn``/``params`` is missing.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from saf_jax import transforms
    >>> loss = lambda p: 0.5 * jnp.sum(p['w'] ** 2)
    >>> tx = transforms.sam(optax.sgd(0.1), rho=0.05)
    >>> params = {'w': jnp.array([3.0, 4.0])}
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss)(params)
    >>> updates, state = tx.update(grads, state, params, grad_fn=jax.grad(loss))
    >>> optax.apply_updates(params, updates)['w']
    Array([2.697, 3.596], dtype=float32)

  References:
    Foret et al, `Sharpness-Aware Minimization for Efficiently Improving Generalization
    <https://arxiv.org/abs/2010.01412>`_, 2021
  """
  _check_nonnegative('sam rho', rho)

  def final_gradient(g, params, count, grad_fn, **extra_args):
    del count, extra_args
    eps = _sam_perturbation(g, rho)  # Eq. 4.
    return grad_fn(optax.apply_updates(params, eps))  # Eq. 3: gradient at theta + eps.

  return _wrap_base('sam', base_optimizer, final_gradient, batch_axis_name=batch_axis_name)


ASAM_ADAPTIVE_PARAMS = ('weights', 'kernels', 'all')


def asam_adaptive_mask(params: Any, adaptive_params: str = 'weights') -> Any:
  """Which leaves of ``params`` get ASAM's adaptive scaling :math:`T_\\theta`.

  Args:
    params: a Flax params pytree (nested dicts named ``kernel``, ``bias``, ``scale``...).
    adaptive_params: ``'weights'``: every leaf named ``kernel`` (conv, dense) or ``scale``
      (BatchNorm/LayerNorm :math:`\\gamma`), not biases; this is the ASAM authors' code,
      which scales every PyTorch parameter whose name contains ``'weight'`` (BatchNorm's
      :math:`\\gamma` is ``bn.weight`` there). ``'kernels'``: ``kernel`` leaves only.
      ``'all'``: every leaf (the paper's formula taken literally).

  Returns:
    A pytree of Python bools matching ``params``.

  Raises:
    ValueError: for another ``adaptive_params``.
  """
  if adaptive_params not in ASAM_ADAPTIVE_PARAMS:
    raise ValueError(
      f'config.method.asam.adaptive_params must be one of {list(ASAM_ADAPTIVE_PARAMS)}, '
      f'got {adaptive_params!r}.'
    )
  names = {'weights': ('kernel', 'scale'), 'kernels': ('kernel',)}.get(adaptive_params)

  def is_adaptive(path, _):
    if names is None or not path:  # A bare array (no name) counts as a weight.
      return True
    last = path[-1]
    key = getattr(last, 'key', getattr(last, 'name', None))
    return key in names

  return jax.tree_util.tree_map_with_path(is_adaptive, params)


def asam(
  base_optimizer: optax.GradientTransformation,
  *,
  rho: float = 0.5,
  eta: float = 0.01,
  adaptive_params: str = 'weights',
  batch_axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adaptive SAM (Kwon et al. 2021): the perturbation is scaled by the weights.

  .. math::

    T_\theta = |\theta| + \eta \ \text{(adaptive leaves; 1 elsewhere)}, \qquad
    \hat\epsilon = \rho\, \frac{T_\theta^2\, g}{\|T_\theta\, g\|_2}, \qquad
    \theta \leftarrow \theta + \mathrm{base}\big(\nabla L_B(\theta + \hat\epsilon)\big)

  with products elementwise, :math:`\rho` = ``rho``, :math:`\eta` = ``eta`` and the
  adaptive leaves chosen by ``adaptive_params`` (:func:`asam_adaptive_mask`; default:
  kernels and normalisation scales, as the authors' code). With :math:`\eta` and every
  :math:`T = 1` this is SAM. BatchNorm policy and perturbation scope as :func:`sam`.

  Args:
    base_optimizer: any optax transform; it receives the perturbed gradient.
    rho: :math:`\rho \ge 0`; the authors use 0.5 (CIFAR-10) to 1.0 (CIFAR-100).
    eta: :math:`\eta \ge 0`, added to :math:`|\theta|`, in parameter units.
    adaptive_params: ``'weights'`` | ``'kernels'`` | ``'all'``.
    batch_axis_name: as in :func:`sam`.

  Returns:
    A gradient transformation; ``update(grads, state, params, *, grad_fn)``.

  Raises:
    ValueError: if ``rho < 0``, ``eta < 0`` or ``adaptive_params`` is unknown.

  References:
    Kwon et al, `ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks <https://arxiv.org/abs/2102.11600>`_, 2021
  """
  _check_nonnegative('asam rho', rho)
  _check_nonnegative('asam eta', eta)
  asam_adaptive_mask({}, adaptive_params)  # Validates the name.

  def final_gradient(g, params, count, grad_fn, **extra_args):
    del count, extra_args
    mask = asam_adaptive_mask(params, adaptive_params)
    t_w = jax.tree.map(lambda p, m: jnp.abs(p) + eta if m else jnp.ones_like(p), params, mask)
    t_g = jax.tree.map(lambda t, gi: t * gi, t_w, g)  # T_theta g.
    scale = rho * _safe_inverse(_norm(t_g))
    eps = jax.tree.map(lambda t, tg: (scale * t * tg).astype(tg.dtype), t_w, t_g)
    return grad_fn(optax.apply_updates(params, eps))

  return _wrap_base('asam', base_optimizer, final_gradient, batch_axis_name=batch_axis_name)


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


def _vdot(a: Any, b: Any) -> jax.Array:
  return sum(
    jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


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
  _check_nonnegative('gsam rho_min', rho_min)
  _check_nonnegative('gsam alpha', alpha)
  if rho_min > rho_max:
    raise ValueError(f'gsam rho_min must be <= rho_max, got {rho_min} > {rho_max}.')
  if lr_min > lr_max:
    raise ValueError(f'gsam lr_min must be <= lr_max, got {lr_min} > {lr_max}.')
  schedule = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)

  def final_gradient(g, params, count, grad_fn, **extra_args):
    del extra_args
    rho = gsam_rho(schedule(count), rho_max=rho_max, rho_min=rho_min, lr_max=lr_max, lr_min=lr_min)
    g_p = grad_fn(optax.apply_updates(params, _sam_perturbation(g, rho)))
    g_p_unit = _scale(g_p, _safe_inverse(_norm(g_p)))
    g_perp = _axpy(-_vdot(g, g_p_unit), g_p_unit, g)  # Algorithm 1, line 6.
    return _axpy(-alpha, g_perp, g_p)

  return _wrap_base('gsam', base_optimizer, final_gradient, batch_axis_name=batch_axis_name)


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
  conditional's cost (measured here: XLA:CPU ran the SAM branch inside the conditional
  9x slower than the same SAM step outside it, and on an H200 LookSAM with the
  conditional was no faster than SAM). A :math:`g_v` whose norm is below 1e-5 of
  :math:`\|g_s\|` is rounding noise (:math:`g_s \parallel g`, e.g. :math:`\rho = 0`) and
  is stored as zero. With ``k = 1`` this is :func:`sam` (no conditional). BatchNorm
  policy and perturbation scope as :func:`sam`; per device, the stored :math:`g_v` is
  the average of the devices' :math:`g_v`.

  Args:
    base_optimizer: any optax transform.
    rho: :math:`\rho \ge 0`, as in :func:`sam`.
    k: :math:`k \ge 1`, steps between SAM gradients (5 in the paper).
    alpha: :math:`\alpha \ge 0`, weight of the reused component (0.7 in the paper).
    batch_axis_name: as in :func:`sam`.

  Returns:
    A gradient transformation; ``update(grads, state, params, *, grad_fn,
    sam_step=None)``. A ``sam_step`` passed in is trusted to equal ``count % k == 0``
    (not checked in the graph); ``train.Experiment`` derives it from ``state.step``,
    which advances with ``count``.

  Raises:
    ValueError: if ``rho < 0``, ``k < 1`` or ``alpha < 0`` (construction), or if
      ``grad_fn`` or ``params`` is missing (update).

  References:
    Liu et al, `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, 2022
  """
  _check_nonnegative('looksam rho', rho)
  _check_nonnegative('looksam alpha', alpha)
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
    grad_fn = _require_grad_fn('looksam', grad_fn, params)
    g = updates

    def full_step(_):
      g_s = grad_fn(optax.apply_updates(params, _sam_perturbation(g, rho)))  # Line 5.
      g_norm_sq = _norm(g) ** 2
      coef = jnp.where(g_norm_sq > 0, _vdot(g_s, g) / jnp.where(g_norm_sq > 0, g_norm_sq, 1), 0)
      g_v = _axpy(-coef, g, g_s)  # Line 6: the part of g_s orthogonal to g.
      noise = _norm(g_v) <= _REL_TOL * _norm(g_s)
      g_v = _scale(g_v, jnp.where(noise, 0.0, 1.0))
      return g_s, _maybe_pmean(g_v, batch_axis_name)

    def reuse_step(_):
      ratio = alpha * _norm(g) * _safe_inverse(_norm(state.g_v))  # Line 8.
      return _axpy(ratio, state.g_v, g), state.g_v

    if k == 1:
      final, g_v = full_step(None)
    elif sam_step is None:
      final, g_v = jax.lax.cond(state.count % k == 0, full_step, reuse_step, None)
    else:
      final, g_v = (full_step if sam_step else reuse_step)(None)
    new_updates, base_state = _base_update(
      base_optimizer, final, state.base_state, params, axis_name=batch_axis_name
    )
    return new_updates, LookSAMState(count=state.count + 1, g_v=g_v, base_state=base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def esam(
  base_optimizer: optax.GradientTransformation,
  *,
  rho: float = 0.05,
  beta: float = 0.6,
  gamma: float = 0.5,
  seed: int = 0,
  batch_axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Efficient SAM (Du et al. 2022a, Algorithm 1): SWP and SDS.

  **Stochastic weight perturbation** (SWP): each parameter entry is perturbed with
  probability :math:`\beta`, and the perturbation is scaled by :math:`1/\beta` so that it
  equals SAM's in expectation,

  .. math::

    \hat\epsilon = \frac{\rho}{\beta}\, m \odot \frac{g}{\|g\|_2}, \qquad
    m_i \sim \mathrm{Bernoulli}(\beta)\ \text{i.i.d.}

  (the authors' PyTorch code draws :math:`m` per parameter tensor; we draw it per entry,
  the paper's form; the key is ``fold_in(PRNGKey(seed), count)``, the same on every
  device). **Sharpness-sensitive data selection** (SDS): with :math:`\ell_i` the clean
  per-example losses, the :math:`\lceil\gamma |B|\rceil` examples with the largest
  :math:`\ell_i(\theta + \hat\epsilon) - \ell_i(\theta)` form :math:`B^+`, and

  .. math::

    \theta \leftarrow \theta + \mathrm{base}\big(\nabla L_{B^+}(\theta + \hat\epsilon)\big)

  With :math:`\beta = \gamma = 1` this is :func:`sam` exactly (no mask, no extra
  forward). BatchNorm policy as :func:`sam`: the perturbed passes (the scoring forward
  over :math:`B` and the gradient over :math:`B^+`) normalise with their own batch's
  statistics and write none. Perturbation scope as :func:`sam`; per device, each
  device selects from its own shard.

  Args:
    base_optimizer: any optax transform.
    rho: :math:`\rho \ge 0`.
    beta: :math:`\beta \in (0, 1]`, fraction of parameter entries perturbed.
    gamma: :math:`\gamma \in (0, 1]`, fraction of the batch used for the second gradient.
    seed: integer seed of the SWP masks.
    batch_axis_name: as in :func:`sam`.

  Returns:
    A gradient transformation; ``update(grads, state, params, *, grad_fn,
    per_example_loss_fn, per_example_losses)``: ``grad_fn(params)`` for the whole batch
    and, when ``gamma < 1``, ``grad_fn(params, indices)`` with ``indices`` int32 [k];
    ``per_example_loss_fn(params) -> float32 [B]`` and ``per_example_losses`` float32
    [B], the clean losses at ``params``.

  Raises:
    ValueError: if ``rho < 0`` or ``beta``/``gamma`` is outside (0, 1].

  References:
    Du et al, `Efficient Sharpness-aware Minimization for Improved Training of Neural
    Networks <https://arxiv.org/abs/2110.03141>`_, 2022
  """
  _check_nonnegative('esam rho', rho)
  for name, value in (('beta', beta), ('gamma', gamma)):
    if not 0 < value <= 1:
      raise ValueError(f'esam {name} must lie in (0, 1], got {value}.')

  def final_gradient(
    g, params, count, grad_fn, *, per_example_loss_fn=None, per_example_losses=None, **extra_args
  ):
    del extra_args
    eps = _sam_perturbation(g, rho)
    if beta < 1:  # SWP (Sec. 3.1 of the ESAM paper).
      key = jax.random.fold_in(jax.random.PRNGKey(seed), count)
      leaves, treedef = jax.tree.flatten(eps)
      keys = jax.random.split(key, len(leaves))
      leaves = [
        jnp.where(jax.random.bernoulli(k_i, beta, x.shape), x / beta, 0).astype(x.dtype)
        for k_i, x in zip(keys, leaves, strict=True)
      ]
      eps = jax.tree.unflatten(treedef, leaves)
    perturbed = optax.apply_updates(params, eps)
    indices = None
    if gamma < 1:  # SDS (Sec. 3.2 of the ESAM paper).
      if per_example_loss_fn is None or per_example_losses is None:
        raise ValueError('esam with gamma < 1 needs per_example_loss_fn and per_example_losses.')
      sharpness = per_example_loss_fn(perturbed) - per_example_losses  # [B]
      # round() first: 0.07 * 100 is 7.000000000000001 in floats, and must select 7.
      num_selected = max(1, math.ceil(round(gamma * sharpness.shape[0], 9)))
      _, indices = jax.lax.top_k(jax.lax.stop_gradient(sharpness), num_selected)
    return grad_fn(perturbed) if indices is None else grad_fn(perturbed, indices)

  return _wrap_base('esam', base_optimizer, final_gradient, batch_axis_name=batch_axis_name)

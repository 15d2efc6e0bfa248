r"""SAM and ASAM: the gradient at a point a fixed radius uphill, plain or scaled by the weights.

SAM (Foret et al. 2021; Eq. 2-4 of Du et al. 2022) perturbs along :math:`g/\|g\|_2`;
ASAM (Kwon et al. 2021) scales the perturbation by :math:`T_\theta = |\theta| + \eta`
on the leaves ``asam_adaptive_mask`` picks. Both keep ``SAMState``.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from saf_jax.transforms import _sam_common


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
    ``grad_fn(params) -> grads`` (see ``transforms.GradFn``).

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
  _sam_common.check_nonnegative('sam rho', rho)

  def final_gradient(g, params, count, grad_fn, **extra_args):
    del count, extra_args
    eps = _sam_common.sam_perturbation(g, rho)  # Eq. 4.
    return grad_fn(optax.apply_updates(params, eps))  # Eq. 3: gradient at theta + eps.

  return _sam_common.wrap_base(
    'sam', base_optimizer, final_gradient, batch_axis_name=batch_axis_name
  )


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
  _sam_common.check_nonnegative('asam rho', rho)
  _sam_common.check_nonnegative('asam eta', eta)
  asam_adaptive_mask({}, adaptive_params)  # Validates the name.

  def final_gradient(g, params, count, grad_fn, **extra_args):
    del count, extra_args
    mask = asam_adaptive_mask(params, adaptive_params)
    t_w = jax.tree.map(lambda p, m: jnp.abs(p) + eta if m else jnp.ones_like(p), params, mask)
    t_g = jax.tree.map(lambda t, gi: t * gi, t_w, g)  # T_theta g.
    scale = rho * _sam_common.safe_inverse(_sam_common.global_norm(t_g))
    eps = jax.tree.map(lambda t, tg: (scale * t * tg).astype(tg.dtype), t_w, t_g)
    return grad_fn(optax.apply_updates(params, eps))

  return _sam_common.wrap_base(
    'asam', base_optimizer, final_gradient, batch_axis_name=batch_axis_name
  )

r"""m-RWP (Li et al. 2024): mix the clean gradient with one at a random, filter-scaled point.

The random point does not depend on the clean gradient, so the two gradients are
independent; the transform keeps ``SAMState``.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from saf_jax.transforms import _sam_common

# Folded into PRNGKey(seed) first, so the noise is a stream of its own (not the init's key,
# fold_in(key(seed), 0), nor ESAM's masks).
_NOISE_STREAM = 0x525750  # 'RWP'
# Added to a 1-D parameter's norm, as the authors' code does (their 1e-16).
_NORM_EPS = 1e-16


def rwp_noise_key(seed: int, count: jax.Array | int) -> jax.Array:
  """The key of step ``count``'s noise: ``fold_in(fold_in(PRNGKey(seed), 0x525750), count)``."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _NOISE_STREAM), count)


def rwp_noise_std(params: Any, sigma: float) -> Any:
  r"""The noise's standard deviation per entry: :math:`\sigma` times the norm of its filter.

  A leaf with two or more axes is a kernel whose last axis is the output unit (Flax's
  ``Conv`` ``[kh, kw, in, out]`` and ``Dense`` ``[in, out]``): entry :math:`j` of filter
  :math:`i` gets :math:`\sigma \|\theta_{\cdot, i}\|_2`, the L2 norm over every other axis.
  That is the authors' per-output-filter norm (PyTorch's ``[out, in, kh, kw]``, norm
  over all but the first axis). For other multi-axis leaves (attention's ``DenseGeneral``
  kernels, ViT's position embedding) it is the same rule on the last axis, not the
  PyTorch layout's. A leaf with fewer than two axes (biases, BatchNorm scale and bias)
  gets :math:`\sigma (\|\theta\|_2 + 10^{-16})` with the norm over the whole leaf.

  Args:
    params: pytree of float arrays.
    sigma: :math:`\sigma \ge 0`, relative scale (dimensionless).

  Returns:
    A pytree like ``params`` of float32 arrays that broadcast against each leaf:
    ``[1, ..., 1, out]`` for kernels, shape ``()`` otherwise.
  """

  def std(x):
    x = x.astype(jnp.float32)
    if x.ndim >= 2:
      return sigma * jnp.sqrt(jnp.sum(x * x, axis=tuple(range(x.ndim - 1)), keepdims=True))
    return sigma * (jnp.sqrt(jnp.sum(x * x)) + _NORM_EPS)

  return jax.tree.map(std, params)


def rwp_noise(key: jax.Array, params: Any, sigma: float) -> Any:
  r"""The noise :math:`\epsilon \sim \mathcal N(0, \mathrm{diag}(s^2))`, s of :func:`rwp_noise_std`.

  One key per leaf (``jax.random.split(key, num_leaves)`` in ``jax.tree.leaves`` order),
  standard normals in float32, scaled and cast to each leaf's dtype.

  Args:
    key: a PRNG key (e.g. :func:`rwp_noise_key`).
    params: pytree of float arrays, the unperturbed :math:`\theta`.
    sigma: :math:`\sigma \ge 0`; 0 gives exact zeros.

  Returns:
    A pytree like ``params``.
  """
  leaves, treedef = jax.tree.flatten(params)
  stds = jax.tree.leaves(rwp_noise_std(params, sigma))
  keys = jax.random.split(key, len(leaves))
  noise = [
    (s * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
    for k, s, x in zip(keys, stds, leaves, strict=True)
  ]
  return jax.tree.unflatten(treedef, noise)


def rwp(
  base_optimizer: optax.GradientTransformation,
  *,
  sigma: float = 0.01,
  lam: float = 0.5,
  seed: int = 0,
  batch_axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Mixed random weight perturbation, m-RWP (Li et al., TMLR 2024).

  The gradient of the mixed loss :math:`L_m(\theta) = \lambda\, L_B(\theta + \epsilon) +
  (1 - \lambda)\, L_B(\theta)`, a one-sample estimate of the Bayes loss
  :math:`\mathbb E_\epsilon L_B(\theta + \epsilon)` mixed with the clean loss:

  .. math::

    \epsilon \sim \mathcal N\big(0, \mathrm{diag}(s^2)\big),\
    s = \sigma \|\theta_{\mathrm{filter}}\|_2, \qquad
    \theta \leftarrow \theta + \mathrm{base}\big(\lambda\, \nabla L_B(\theta + \epsilon)
    + (1 - \lambda)\, \nabla L_B(\theta)\big)

  with the per-filter scale of :func:`rwp_noise_std` and fresh noise every step (key
  :func:`rwp_noise_key` of ``seed`` and the step count, the same on every device). As the
  authors' ``train_mrwp_parallel.py`` (``--lambda``: the weight of the *perturbed*
  gradient; ``--sigma``). The base optimizer, weight decay included, acts at
  :math:`\theta`. With :math:`\lambda = 0` no second gradient is taken (the base optimizer
  exactly); with :math:`\sigma = 0` both gradients are at :math:`\theta`. The two
  gradients do not depend on each other: in one compiled step XLA may run them in either
  order or together. Unlike the authors, who take them on two different batches (and
  double the epochs so that the optimizer steps stay as many), both use the step's batch
  :math:`B`: twice SGD's gradient work per step, the same data order as every method.

  .. note::
    BatchNorm: ``batch_stats`` are updated from the clean pass at :math:`\theta`; the
    pass at :math:`\theta + \epsilon` (``grad_fn``) normalises with its batch's
    statistics and writes none, as the authors' ``train_marwp.py`` (BatchNorm momentum 0
    during the perturbed pass). Perturbation scope as ``sam``.

  Args:
    base_optimizer: any optax transform; it receives the mixed gradient at :math:`\theta`.
    sigma: :math:`\sigma \ge 0`, noise scale relative to each filter's norm (authors' code:
      0.01 by default, 0.015 in their CIFAR-100 scripts).
    lam: :math:`\lambda \in [0, 1]`, the weight of the perturbed gradient (authors: 0.5).
    seed: integer seed of the noise.
    batch_axis_name: as in ``sam``; inside ``jax.shard_map``, ``params`` must be the
      replicated params (as the training step passes them): the point
      :math:`\theta + \epsilon`, the same on every device, is marked device-varying so
      that ``grad_fn`` gives each device's shard gradient.

  Returns:
    A gradient transformation; ``update(grads, state, params, *, grad_fn)``: ``grads`` is
    :math:`\nabla L_B(\theta)` and ``grad_fn(params)`` the gradient at other params.

  Raises:
    ValueError: if ``sigma < 0`` or ``lam`` is outside [0, 1] (construction), or if
      ``grad_fn``/``params`` is missing (update).

  References:
    Li et al, `Revisiting Random Weight Perturbation for Efficiently Improving
    Generalization <https://openreview.net/forum?id=WbbgOHpoPX>`_, TMLR 2024
  """
  _sam_common.check_nonnegative('rwp sigma', sigma)
  if not 0 <= lam <= 1:
    raise ValueError(f'rwp lam must lie in [0, 1], got {lam}.')

  def final_gradient(g, params, count, grad_fn, **extra_args):
    del extra_args
    if lam == 0:  # The clean gradient alone: no noise, no second gradient.
      return g
    eps = rwp_noise(rwp_noise_key(seed, count), params, sigma)
    point = _sam_common.mark_varying(optax.apply_updates(params, eps), batch_axis_name)
    g_s = grad_fn(point)  # Independent of g.
    return jax.tree.map(lambda a, b: (lam * b + (1 - lam) * a).astype(a.dtype), g, g_s)

  return _sam_common.wrap_base(
    'rwp', base_optimizer, final_gradient, batch_axis_name=batch_axis_name
  )

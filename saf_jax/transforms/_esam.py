r"""ESAM (Du et al. 2022a): SAM on a random subset of weights and the sharpest examples.

Stochastic weight perturbation (SWP) and sharpness-sensitive data selection (SDS); the
transform keeps ``SAMState``.
"""

import math

import jax
import jax.numpy as jnp
import optax

from saf_jax.transforms import _sam_common


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
  _sam_common.check_nonnegative('esam rho', rho)
  for name, value in (('beta', beta), ('gamma', gamma)):
    if not 0 < value <= 1:
      raise ValueError(f'esam {name} must lie in (0, 1], got {value}.')

  def final_gradient(
    g, params, count, grad_fn, *, per_example_loss_fn=None, per_example_losses=None, **extra_args
  ):
    del extra_args
    eps = _sam_common.sam_perturbation(g, rho)
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

  return _sam_common.wrap_base(
    'esam', base_optimizer, final_gradient, batch_axis_name=batch_axis_name
  )

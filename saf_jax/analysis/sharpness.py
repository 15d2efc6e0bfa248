r"""Sharpness measurements: SAM's sharpness, the Hessian's top eigenvalues and its trace.

Each tool takes a scalar loss ``loss_fn(params, batch) -> float32 []`` (the mean loss of
one batch) and a list of equally sized batches, so it works for any model; :func:`model_loss_fn`
builds the one the paper measures, the cross-entropy of the eval-mode forward (BatchNorm
reads its running statistics, which stay frozen; the trajectory loss is not included).

* :func:`sam_sharpness`: SAM's sharpness measure (Eq. 3-4 of Du et al. 2022, the
  measurement of Fig. 4b), per batch
  :math:`R_B = L_B(\theta + \rho\, g_B / \|g_B\|_2) - L_B(\theta)` with
  :math:`g_B = \nabla L_B(\theta)`, averaged over the batches.
* :func:`hessian_top_eigenvalues`: the largest eigenvalues of the Hessian of
  :math:`L = \frac{1}{|S|}\sum_B L_B` by Lanczos iteration on Hessian-vector products
  (``jax.jvp`` of ``jax.grad``), with each Ritz value's residual as its convergence.
* :func:`hessian_trace`: Hutchinson's estimate :math:`\mathbb{E}_v[v^\top H v]` of the trace,
  with Rademacher :math:`v`, and its standard error.

References:
  Du et al, `Sharpness-Aware Training for Free <https://arxiv.org/abs/2205.14083>`_, 2022.
  Foret et al, `Sharpness-Aware Minimization <https://arxiv.org/abs/2010.01412>`_, 2021.
  Lanczos, `An iteration method for the solution of the eigenvalue problem
  <https://doi.org/10.6028/jres.045.026>`_, 1950.
  Hutchinson, `A stochastic estimator of the trace of the influence matrix
  <https://doi.org/10.1080/03610918908812806>`_, 1989.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from saf_jax import losses

LossFn = Callable[[Any, Any], jax.Array]

# The SAM sharpness of Fig. 4b of Du et al. 2022 uses rho = 0.05.
DEFAULT_RHO = 0.05


def model_loss_fn(model: Any, batch_stats: Any) -> LossFn:
  """The paper's measured loss: mean cross-entropy of the eval-mode forward.

  Args:
    model: a Flax classifier (``saf_jax.models``).
    batch_stats: BatchNorm running statistics, used as they are (frozen).

  Returns:
    ``loss_fn(params, batch) -> float32 []``, nats, with ``batch['image']`` float32
    [B, H, W, C] and ``batch['label']`` int32 [B].
  """

  def loss_fn(params, batch):
    variables = {'params': params, 'batch_stats': batch_stats}
    logits = model.apply(variables, batch['image'], train=False)
    return losses.cross_entropy(logits, batch['label'])

  return loss_fn


def sam_sharpness_fn(loss_fn: LossFn, *, rho: float = DEFAULT_RHO) -> Callable[..., dict]:
  r"""SAM's sharpness of one batch, :math:`R_B(\theta)` (Eq. 3-4 of Du et al. 2022).

  Args:
    loss_fn: ``loss_fn(params, batch) -> float32 []``.
    rho: :math:`\rho > 0`, the L2 radius of the perturbation.

  Returns:
    ``fn(params, batch) -> dict`` of float32 scalars: ``sharpness``
    :math:`L_B(\theta + \hat\epsilon) - L_B(\theta)` with
    :math:`\hat\epsilon = \rho\, g_B / \|g_B\|_2` (0 where :math:`g_B = 0`), ``loss``
    :math:`L_B(\theta)` and ``grad_norm`` :math:`\|g_B\|_2`. Pure; jit it.

  Raises:
    ValueError: if ``rho <= 0``.
  """
  if not rho > 0:
    raise ValueError(f'rho must be > 0, got {rho}.')

  def fn(params, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    grad_norm = optax.global_norm(grads)
    scale = jnp.where(grad_norm > 0, rho / jnp.where(grad_norm > 0, grad_norm, 1.0), 0.0)
    perturbed = jax.tree.map(lambda p, g: p + scale * g, params, grads)
    return {
      'sharpness': loss_fn(perturbed, batch) - loss,
      'loss': loss,
      'grad_norm': grad_norm,
    }

  return fn


def sam_sharpness(
  loss_fn: LossFn, params: Any, batches: Sequence[Any], *, rho: float = DEFAULT_RHO
) -> dict[str, float]:
  r"""SAM's sharpness measure averaged over ``batches`` (Fig. 4b of Du et al. 2022).

  Each batch gets its own ascent direction, as in SAM's training step; the result is the
  mean over batches of :func:`sam_sharpness_fn`'s values.

  Args:
    loss_fn: ``loss_fn(params, batch) -> float32 []``, e.g. :func:`model_loss_fn`.
    params: the weights :math:`\theta`, a pytree of float arrays.
    batches: the fixed batches measured (at least one).
    rho: the radius; 0.05 as in Fig. 4b.

  Returns:
    ``{'sharpness', 'loss', 'grad_norm'}``, each the mean over batches, as Python floats
    (nats for the first two).

  Raises:
    ValueError: if ``batches`` is empty or ``rho <= 0``.
  """
  fn = jax.jit(sam_sharpness_fn(loss_fn, rho=rho))
  return batch_mean(functools.partial(fn, params), batches)


def model_sam_sharpness_fn(model: Any, *, rho: float = DEFAULT_RHO) -> Callable[..., dict]:
  """:func:`sam_sharpness_fn` of :func:`model_loss_fn`, jitted once for a model.

  The training loop measures every few epochs with new ``batch_stats``; taking them as an
  argument (not a closure) compiles the measurement once per run.

  Returns:
    ``fn(params, batch_stats, batch) -> {'sharpness', 'loss', 'grad_norm'}``, jitted.
  """

  @jax.jit
  def fn(params, batch_stats, batch):
    return sam_sharpness_fn(model_loss_fn(model, batch_stats), rho=rho)(params, batch)

  return fn


def batch_mean(fn: Callable[[Any], dict], batches: Sequence[Any]) -> dict[str, float]:
  """The mean over ``batches`` of each scalar in ``fn(batch)``, in float64, as Python floats.

  Raises:
    ValueError: if ``batches`` is empty.
  """
  if not batches:
    raise ValueError('A measurement needs at least one batch.')
  values = jax.device_get([fn(batch) for batch in batches])
  return {k: float(np.mean([v[k] for v in values], dtype=np.float64)) for k in values[0]}


def hessian_vector_product(loss_fn: LossFn, params: Any, batch: Any, vector: Any) -> Any:
  r""":math:`H v` with :math:`H = \nabla^2_\theta L_B(\theta)`, forward-over-reverse.

  Computed as ``jax.jvp(jax.grad(loss_fn), (params,), (vector,))``: one forward and one
  backward pass with tangents, about 3x a gradient's cost, never forming :math:`H`.

  Args:
    loss_fn: ``loss_fn(params, batch) -> float32 []``.
    params: :math:`\theta`, a pytree of float arrays.
    batch: one batch.
    vector: :math:`v`, a pytree like ``params``.

  Returns:
    :math:`H v`, a pytree like ``params``.
  """
  grad_fn = jax.grad(lambda p: loss_fn(p, batch))
  return jax.jvp(grad_fn, (params,), (vector,))[1]


def _flat_hvp(
  loss_fn: LossFn, params: Any, batches: Sequence[Any]
) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
  """``matvec(v) = mean_B H_B v`` on flat float64 host vectors, and the dimension.

  The per-batch products are dispatched together and summed on the device; one vector
  crosses to the host per ``matvec``.
  """
  flat, unravel = ravel_pytree(params)
  dim, dtype = flat.size, flat.dtype
  del flat

  @jax.jit
  def hvp(params, batch, flat_vector):
    vector = unravel(flat_vector.astype(dtype))
    return ravel_pytree(hessian_vector_product(loss_fn, params, batch, vector))[0]

  def matvec(v: np.ndarray) -> np.ndarray:
    v = jnp.asarray(v, dtype)
    total = sum(hvp(params, batch, v) for batch in batches)
    return np.asarray(total, np.float64) / len(batches)

  return matvec, dim


@dataclasses.dataclass(frozen=True)
class HessianEigenvalues:
  """The result of :func:`hessian_top_eigenvalues`.

  Attributes:
    eigenvalues: float64 [m], the largest Ritz values, descending; ``m = k`` unless the
      Krylov space became invariant first (then ``m < k``, every value is exact and
      ``converged`` is False: fewer distinct eigenvalues are reachable from the start).
    residuals: float64 [m], Lanczos' estimate :math:`\\beta_m |s_{m,i}|` of
      :math:`\\|H y_i - \\lambda_i y_i\\|_2` for each unit Ritz vector :math:`y_i` (equal
      in exact arithmetic; an eigenvalue of :math:`H` then lies within it of
      :math:`\\lambda_i`). With a float32 Hessian-vector product it cannot resolve below
      float32 rounding, so a ``tol`` under ~1e-6 is not meaningful.
    iterations: Lanczos iterations run (Hessian-vector products over all batches).
    converged: whether every residual reached ``tol * |eigenvalue|``.
  """

  eigenvalues: np.ndarray
  residuals: np.ndarray
  iterations: int
  converged: bool


def lanczos(
  matvec: Callable[[np.ndarray], np.ndarray],
  dim: int,
  *,
  k: int = 1,
  max_iterations: int = 100,
  tol: float = 1e-4,
  seed: int = 0,
) -> HessianEigenvalues:
  r"""The ``k`` largest (algebraic) eigenvalues of a symmetric operator by Lanczos.

  Lanczos iteration with full re-orthogonalisation (twice per step) in float64 on the
  host. A single start vector sees each distinct eigenvalue once: for a repeated top
  eigenvalue (e.g. ``[5, 5, 3]``) ``k = 2`` returns ``[5, 3]``, each value an eigenvalue
  within its residual. It stops when each of the top ``k`` Ritz values has residual
  :math:`|\beta_m s_{m,i}| \le` ``tol`` :math:`\cdot |\lambda_i|`, when the Krylov space is
  invariant (exact), or after ``max_iterations``. Host memory: ``max_iterations * dim``
  float64 values for the basis.

  Args:
    matvec: :math:`v \mapsto H v` on float64 [dim] vectors, :math:`H` symmetric.
    dim: the dimension.
    k: how many eigenvalues, ``1 <= k <= dim``.
    max_iterations: the most Lanczos steps (matvecs), >= k.
    tol: relative residual at which a Ritz value counts as converged.
    seed: seed of the random start vector.

  Returns:
    A :class:`HessianEigenvalues`.

  Raises:
    ValueError: if ``k``, ``max_iterations`` or ``tol`` is out of range.
  """
  if not 1 <= k <= dim:
    raise ValueError(f'k must be in [1, {dim}], got {k}.')
  if max_iterations < k:
    raise ValueError(f'max_iterations must be >= k={k}, got {max_iterations}.')
  if not tol > 0:
    raise ValueError(f'tol must be > 0, got {tol}.')
  num_steps = min(max_iterations, dim)
  basis = np.empty((num_steps, dim), np.float64)  # Row j is the Lanczos vector q_j.
  q = np.random.default_rng(seed).standard_normal(dim)
  basis[0] = q / np.linalg.norm(q)
  alphas, betas = [], []
  for m in range(1, num_steps + 1):
    w = matvec(basis[m - 1])
    alphas.append(float(basis[m - 1] @ w))
    q_mat = basis[:m]
    for _ in range(2):  # Full re-orthogonalisation, twice ("twice is enough").
      w = w - q_mat.T @ (q_mat @ w)
    beta = float(np.linalg.norm(w))
    tridiagonal = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    ritz_values, ritz_vectors = np.linalg.eigh(tridiagonal)
    top = np.argsort(ritz_values)[::-1][: min(k, m)]
    eigenvalues = ritz_values[top]
    residuals = np.abs(beta * ritz_vectors[-1, top])
    scale = max(float(np.max(np.abs(ritz_values))), np.finfo(np.float64).tiny)
    invariant = beta <= 1e-12 * scale
    if m >= k and (invariant or np.all(residuals <= tol * np.abs(eigenvalues))):
      return HessianEigenvalues(eigenvalues, residuals, m, True)
    if invariant:  # Fewer than k eigenvalues are reachable from this start vector.
      break
    betas.append(beta)
    if m < num_steps:
      basis[m] = w / beta
  return HessianEigenvalues(eigenvalues, residuals, m, False)


def hessian_top_eigenvalues(
  loss_fn: LossFn,
  params: Any,
  batches: Sequence[Any],
  *,
  k: int = 1,
  max_iterations: int = 100,
  tol: float = 1e-4,
  seed: int = 0,
) -> HessianEigenvalues:
  r"""The ``k`` largest eigenvalues of :math:`\nabla^2_\theta \frac{1}{n}\sum_B L_B(\theta)`.

  :func:`lanczos` on :func:`hessian_vector_product` averaged over ``batches``; each
  iteration costs one HVP per batch. The top eigenvalue is the sharpness measure of
  Keskar et al. 2017 that Du et al. 2022 cite (Sec. 1).

  Args:
    loss_fn: ``loss_fn(params, batch) -> float32 []``, e.g. :func:`model_loss_fn`.
    params: :math:`\theta`, a pytree of float arrays.
    batches: the fixed batches whose mean loss is differentiated (at least one).
    k: number of eigenvalues.
    max_iterations: the most Lanczos iterations.
    tol: relative residual for convergence.
    seed: seed of the start vector.

  Returns:
    A :class:`HessianEigenvalues` (eigenvalues in nats per unit squared parameter norm).

  Raises:
    ValueError: if ``batches`` is empty or an argument of :func:`lanczos` is out of range.
  """
  if not batches:
    raise ValueError('hessian_top_eigenvalues needs at least one batch.')
  matvec, dim = _flat_hvp(loss_fn, params, batches)
  return lanczos(matvec, dim, k=k, max_iterations=max_iterations, tol=tol, seed=seed)


def hessian_trace(
  loss_fn: LossFn, params: Any, batches: Sequence[Any], *, num_samples: int = 100, seed: int = 0
) -> dict[str, float]:
  r"""Hutchinson's estimate of :math:`\mathrm{tr}\,\nabla^2_\theta L(\theta)`.

  :math:`\frac{1}{n}\sum_{j=1}^{n} v_j^\top H v_j` with Rademacher :math:`v_j \in \{\pm 1\}^d`,
  unbiased, exact for a diagonal :math:`H`.

  Args:
    loss_fn: ``loss_fn(params, batch) -> float32 []``.
    params: :math:`\theta`.
    batches: the fixed batches whose mean loss is differentiated (at least one).
    num_samples: :math:`n \ge 2`, probe vectors.
    seed: seed of the probes.

  Returns:
    ``{'trace': estimate, 'stderr': its standard error, 'num_samples': n}``.

  Raises:
    ValueError: if ``batches`` is empty or ``num_samples < 2``.
  """
  if not batches:
    raise ValueError('hessian_trace needs at least one batch.')
  if num_samples < 2:
    raise ValueError(f'num_samples must be >= 2, got {num_samples}.')
  matvec, dim = _flat_hvp(loss_fn, params, batches)
  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(num_samples):
    v = rng.choice(np.array([-1.0, 1.0]), size=dim)
    samples.append(float(v @ matvec(v)))
  samples = np.asarray(samples)
  return {
    'trace': float(samples.mean()),
    'stderr': float(samples.std(ddof=1) / np.sqrt(num_samples)),
    'num_samples': num_samples,
  }

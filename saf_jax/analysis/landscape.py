r"""2D loss landscapes with filter-normalised random directions (Li et al. 2018).

The surface around weights :math:`\theta` along two directions :math:`\delta, \eta` is

.. math::

  f(a, b) = L(\theta + a\,\delta + b\,\eta)

on a grid of :math:`(a, b)`. Each direction is Gaussian, then *filter-normalised*: every
filter of a direction is rescaled to the norm of the matching filter of :math:`\theta`, so
a direction moves every filter by the same amount relative to its own size, and
landscapes of networks whose filters have different scales (e.g. after different weight
decay, which BatchNorm makes scale-free in training) can be compared.
Filters are slices along the last (output-feature) axis of a Flax kernel: a conv kernel
``[kh, kw, in, out]`` has ``out`` filters of ``kh * kw * in`` entries, a dense kernel
``[in, out]`` has ``out`` filters of ``in`` entries. One-dimensional parameters (biases,
BatchNorm scale and bias) get a zero direction, as Li et al.'s ``ignore='biasbn'`` does.

This is how Du et al. 2022 draw Figs. 2 and 5 ("two random sampled orthogonal Gaussian
perturbations", 100 x 100 points). Two Gaussian directions in :math:`d` dimensions are
orthogonal up to :math:`O(1/\sqrt d)`; :func:`loss_surface`'s caller can report their cosine.

References:
  Li et al, `Visualizing the Loss Landscape of Neural Nets
  <https://arxiv.org/abs/1712.09913>`_, NeurIPS 2018.
  Du et al, `Sharpness-Aware Training for Free <https://arxiv.org/abs/2205.14083>`_, 2022.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saf_jax import losses

# The smallest grid that has a centre and a point on each side.
MIN_GRID_SIZE = 3


def filter_normalize(direction: Any, params: Any) -> Any:
  r"""Rescales each filter of ``direction`` to the norm of ``params``' filter (Li et al. Sec. 4).

  For a leaf with ``ndim >= 2`` and filter :math:`j` (index ``[..., j]``):
  :math:`d_j \leftarrow d_j \, \|\theta_j\|_2 / \|d_j\|_2` (0 where :math:`d_j = 0`). Leaves with
  ``ndim <= 1`` (biases, BatchNorm scale and bias) become zeros.

  Args:
    direction: a pytree like ``params``.
    params: :math:`\theta`, a pytree of float arrays.

  Returns:
    The normalised direction, float32, a pytree like ``params``.
  """

  def normalize(d, p):
    d = d.astype(jnp.float32)
    if p.ndim <= 1:
      return jnp.zeros_like(d)
    axes = tuple(range(p.ndim - 1))
    d_norm = jnp.sqrt(jnp.sum(d**2, axis=axes, keepdims=True))
    p_norm = jnp.sqrt(jnp.sum(p.astype(jnp.float32) ** 2, axis=axes, keepdims=True))
    return jnp.where(d_norm > 0, d * p_norm / jnp.where(d_norm > 0, d_norm, 1.0), 0.0)

  return jax.tree.map(normalize, direction, params)


def random_directions(rng: jax.Array, params: Any, *, num: int = 2) -> list[Any]:
  """``num`` independent standard Gaussian directions, each filter-normalised to ``params``.

  Args:
    rng: a PRNG key (the direction seed).
    params: :math:`\\theta`, a pytree of float arrays.
    num: how many directions.

  Returns:
    A list of ``num`` float32 pytrees like ``params`` (:func:`filter_normalize` applied).
  """
  leaves, treedef = jax.tree.flatten(params)
  directions = []
  for rng_direction in jax.random.split(rng, num):
    keys = jax.random.split(rng_direction, len(leaves))
    gaussian = [
      jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves, strict=True)
    ]
    directions.append(filter_normalize(jax.tree.unflatten(treedef, gaussian), params))
  return directions


def grid_coordinates(size: int, extent: float = 1.0) -> np.ndarray:
  """``size`` evenly spaced coordinates in ``[-extent, extent]``, symmetric about 0.

  An odd ``size`` has a centre coordinate that is exactly 0 (the grid holds θ itself);
  an even one does not.

  Raises:
    ValueError: if ``size < 3`` or ``extent <= 0``.
  """
  if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < MIN_GRID_SIZE:
    raise ValueError(f'The grid size must be an integer >= {MIN_GRID_SIZE}, got {size!r}.')
  if not extent > 0:
    raise ValueError(f'The grid extent must be > 0, got {extent!r}.')
  return (np.arange(size) - (size - 1) / 2) * (2 * extent / (size - 1))


def model_metrics_fn(model: Any, batch_stats: Any) -> Callable[[Any, Any], dict[str, jax.Array]]:
  """Mean cross-entropy and top-1 accuracy of the eval-mode forward (BatchNorm frozen).

  Returns:
    ``fn(params, batch) -> {'loss': float32 [] nats, 'accuracy': float32 [] in [0, 1]}``.
  """

  def fn(params, batch):
    variables = {'params': params, 'batch_stats': batch_stats}
    logits = model.apply(variables, batch['image'], train=False)
    return {
      'loss': losses.cross_entropy(logits, batch['label']),
      'accuracy': jnp.mean((jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)),
    }

  return fn


def loss_surface(
  metrics_fn: Callable[[Any, Any], Any],
  params: Any,
  directions: Sequence[Any],
  xs: np.ndarray,
  ys: np.ndarray,
  batches: Sequence[Any],
  *,
  chunk_size: int = 1,
  progress: Callable[[int], None] | None = None,
) -> Any:
  r""":math:`f(a, b) = \mathrm{metrics}(\theta + a\delta + b\eta)` on the grid ``ys x xs``.

  Grid points are evaluated ``chunk_size`` at a time by one compiled program (``jax.vmap``
  over the points when ``chunk_size > 1``) for the whole grid; values are averaged over
  ``batches`` in float64 on the host. On a CPU keep ``chunk_size=1``: XLA:CPU turns convs
  vmapped over their kernels into grouped convs, which run several times slower per point
  (docs/sharpness.md gives the figures). On an accelerator a larger chunk fills the device.

  Args:
    metrics_fn: ``fn(params, batch)`` returning a float32 scalar or a pytree of them (the
      batch mean), e.g. :func:`model_metrics_fn`.
    params: :math:`\theta`.
    directions: :math:`(\delta, \eta)`, two pytrees like ``params``.
    xs: float [nx], the coefficients :math:`a` of ``directions[0]``.
    ys: float [ny], the coefficients :math:`b` of ``directions[1]``.
    batches: equally sized batches (at least one).
    chunk_size: grid points per vectorised call (memory grows linearly with it).
    progress: called with the number of grid points just finished after each chunk (e.g.
      a progress bar's ``update``); the calls add up to ``len(xs) * len(ys)``.

  Returns:
    ``metrics_fn``'s structure with each scalar replaced by a float64 [ny, nx] array whose
    entry ``[i, j]`` is the value at :math:`(a, b) = (x_j, y_i)`.

  Raises:
    ValueError: if ``directions`` is not two pytrees, ``batches`` is empty or
      ``chunk_size < 1``.
  """
  if len(directions) != 2:
    raise ValueError(f'loss_surface needs 2 directions, got {len(directions)}.')
  if not batches:
    raise ValueError('loss_surface needs at least one batch.')
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be >= 1, got {chunk_size}.')
  xs, ys = np.asarray(xs, np.float32), np.asarray(ys, np.float32)
  grid_b, grid_a = np.meshgrid(ys, xs, indexing='ij')  # [ny, nx] each.
  points = np.stack([grid_a.ravel(), grid_b.ravel()], axis=1)  # [ny * nx, 2]
  num_points = len(points)
  padded = -(-num_points // chunk_size) * chunk_size
  points = np.concatenate([points, np.zeros((padded - num_points, 2), np.float32)])

  @jax.jit
  def evaluate_chunk(params, directions, coefficients, batch):
    def at(ab):
      moved = jax.tree.map(
        lambda p, d0, d1: p + ab[0] * d0 + ab[1] * d1, params, directions[0], directions[1]
      )
      return metrics_fn(moved, batch)

    return jax.vmap(at)(coefficients)

  directions = tuple(directions)
  totals = None
  for start in range(0, padded, chunk_size):
    coefficients = jnp.asarray(points[start : start + chunk_size])
    chunk = None
    for batch in batches:
      out = evaluate_chunk(params, directions, coefficients, batch)
      chunk = out if chunk is None else jax.tree.map(jnp.add, chunk, out)
    chunk = jax.tree.map(lambda v: np.asarray(v, np.float64) / len(batches), chunk)
    totals = [chunk] if totals is None else totals + [chunk]
    if progress is not None:
      progress(min(chunk_size, num_points - start))
  flat = jax.tree.map(lambda *parts: np.concatenate(parts)[:num_points], *totals)
  return jax.tree.map(lambda v: v.reshape(len(ys), len(xs)), flat)

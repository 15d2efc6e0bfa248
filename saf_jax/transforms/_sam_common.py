r"""What the SAM-family transforms share: the ``grad_fn`` protocol, state, checks, tree math.

Every method maps the clean gradient :math:`g` to a final gradient (``final_gradient``),
and :func:`wrap_base` turns that map into a transform with :class:`SAMState`: it checks
``grad_fn`` and ``params``, averages the final gradient over ``batch_axis_name`` and steps
the base optimizer. ``looksam`` keeps more state and builds its transform itself from the
same pieces.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

GradFn = Callable[..., Any]
"""``grad_fn(params, indices=None) -> grads``: gradient of the mini-batch loss at ``params``.

``indices`` (int32 [k], only passed by ``esam``) restricts the mean loss to those
examples of the batch. It must not update BatchNorm statistics (see the notes of ``sam``).
"""


def check_nonnegative(name: str, value: float) -> None:
  """Raises ValueError unless ``value >= 0`` (NaN included); ``name`` goes in the message."""
  if not value >= 0:
    raise ValueError(f'{name} must be >= 0, got {value}.')


def global_norm(tree: Any) -> jax.Array:
  """Global L2 norm over all leaves, accumulated in float32; shape=(), float32."""
  return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def tree_scale(tree: Any, factor: jax.Array) -> Any:
  """``factor * tree`` leaf by leaf, each leaf keeping its dtype."""
  return jax.tree.map(lambda x: (x * factor).astype(x.dtype), tree)


def tree_axpy(a: jax.Array, x: Any, y: Any) -> Any:
  """``a * x + y`` leaf by leaf, in the dtype of ``y``."""
  return jax.tree.map(lambda xi, yi: (a * xi + yi).astype(yi.dtype), x, y)


def tree_vdot(a: Any, b: Any) -> jax.Array:
  """Inner product of two matching pytrees over all leaves, in float32; shape=()."""
  return sum(
    jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def safe_inverse(norm: jax.Array) -> jax.Array:
  """``1 / norm``, and 0 for a zero norm: a zero gradient gives a zero perturbation."""
  return jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)


def sam_perturbation(grads: Any, rho: jax.Array | float) -> Any:
  r""":math:`\hat\epsilon = \rho\, g / \|g\|_2` (Eq. 4 of Du et al. 2022; Foret et al. 2021)."""
  return tree_scale(grads, rho * safe_inverse(global_norm(grads)))


def maybe_pmean(tree: Any, axis_name: str | None) -> Any:
  """``tree`` averaged over the mapped axis ``axis_name``, or unchanged when it is None."""
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name=axis_name)


def mark_varying(tree: Any, axis_name: str | None) -> Any:
  """``tree`` marked device-varying over ``axis_name`` inside ``jax.shard_map`` (None: as is).

  A point built from the replicated params alone (MSAM's, m-RWP's) is device-invariant, and
  the gradient with respect to an invariant input is summed over the devices; marked
  varying, ``grad_fn`` at it gives each device's own shard gradient. The leaves must be
  invariant (JAX refuses to mark a varying value again).
  """
  if axis_name is None:
    return tree
  return jax.tree.map(lambda x: jax.lax.pcast(x, axis_name, to='varying'), tree)


def require_grad_fn(name: str, grad_fn: GradFn | None, params: Any) -> GradFn:
  """``grad_fn`` itself; ValueError naming transform ``name`` if it or ``params`` is None."""
  if grad_fn is None:
    raise ValueError(f'{name}.update needs grad_fn=..., the gradient at given params.')
  if params is None:
    raise ValueError(f'{name}.update needs params, the point the perturbation starts from.')
  return grad_fn


class SAMState(NamedTuple):
  """State of ``sam``, ``asam``, ``gsam`` and ``esam``.

  Attributes:
    count: optimizer steps taken; shape=(), int32.
    base_state: the state of the wrapped base optimizer.
  """

  count: jax.Array
  base_state: optax.OptState


def per_microbatch_final(
  name: str,
  final_gradient: Callable[..., Any],
  microbatch_grads: Any,
  microbatch_args: Callable[[jax.Array], dict[str, Any]] | None,
  params: Any,
  count: jax.Array,
) -> Any:
  r"""The mean over :math:`M` micro-batches of each one's final gradient (the m-sharpness mode).

  .. math::

    \bar g = \frac{1}{M} \sum_{j=0}^{M-1} F\big(g_j;\ \nabla L_j\big)

  with :math:`g_j = \nabla L_j(\theta)` micro-batch :math:`j`'s clean gradient and
  :math:`F` the method's map from a clean gradient and a ``grad_fn`` to its final gradient
  (SAM: :math:`\nabla L_j(\theta + \rho g_j/\|g_j\|)`): each micro-batch perturbs with its
  own gradient, as the devices of the per-device scope do. One ``lax.scan`` over :math:`j`;
  the final gradients are summed in a buffer like ``params``.

  Args:
    name: the transform's name, for errors.
    final_gradient: ``final_gradient(g, params, count, grad_fn, **kwargs)`` (``wrap_base``).
    microbatch_grads: the clean gradients stacked on a new leading axis: a pytree like
      ``params`` with leaves [M, ...] (memory: M times the params).
    microbatch_args: ``microbatch_args(j) -> dict`` for a traced int32 scalar ``j``: the
      keyword arguments of micro-batch ``j``'s ``final_gradient``, with ``grad_fn`` (the
      gradient of :math:`L_j` at given params) and, for ``esam``, ``per_example_loss_fn``
      and ``per_example_losses`` of micro-batch ``j``'s examples.
    params: :math:`\theta`.
    count: the transform's step count.

  Returns:
    :math:`\bar g`, a pytree like ``params``.

  Raises:
    ValueError: if ``microbatch_args``, ``params`` or a ``grad_fn`` in it is missing.
  """
  if microbatch_args is None:
    raise ValueError(f'{name}.update with microbatch_grads needs microbatch_args=..., too.')
  num = jax.tree.leaves(microbatch_grads)[0].shape[0]

  def body(total, j):
    kwargs = dict(microbatch_args(j))
    grad_fn = require_grad_fn(name, kwargs.pop('grad_fn', None), params)
    g_j = jax.tree.map(lambda x: x[j], microbatch_grads)
    final = final_gradient(g_j, params, count, grad_fn, **kwargs)
    return jax.tree.map(jnp.add, total, final), None

  # zeros_like keeps a per-device gradient's device-varying type inside jax.shard_map.
  zeros = jax.tree.map(lambda x: jnp.zeros_like(x[0]), microbatch_grads)
  total, _ = jax.lax.scan(body, zeros, jnp.arange(num))
  return jax.tree.map(lambda x: (x / num).astype(x.dtype), total)


def base_update(base_optimizer, grads, state, params, *, axis_name):
  """Averages the final gradient over ``axis_name`` (per-device scope), then the base step."""
  grads = maybe_pmean(grads, axis_name)
  return base_optimizer.update(grads, state, params)


def wrap_base(
  name: str,
  base_optimizer: optax.GradientTransformation,
  final_gradient: Callable[..., Any],
  *,
  batch_axis_name: str | None,
) -> optax.GradientTransformationExtraArgs:
  """A transform with :class:`SAMState` whose base optimizer steps on a final gradient.

  ``final_gradient(g, params, count, grad_fn, **extra_args)`` maps the clean gradient to
  the method's gradient; the rest (state, checks, per-device averaging, the per-micro-batch
  mode of :func:`per_microbatch_final`) is shared.

  ``update(grads, state, params, *, grad_fn, **extra_args)`` takes the clean gradient; or,
  per micro-batch, ``update(grads, state, params, *, microbatch_grads, microbatch_args)``
  (``grads`` then unused, e.g. their mean; see :func:`per_microbatch_final`).
  """

  def init_fn(params):
    return SAMState(count=jnp.zeros([], jnp.int32), base_state=base_optimizer.init(params))

  def update_fn(
    updates,
    state,
    params=None,
    *,
    grad_fn=None,
    microbatch_grads=None,
    microbatch_args=None,
    **extra_args,
  ):
    if microbatch_grads is not None:
      final = per_microbatch_final(
        name, final_gradient, microbatch_grads, microbatch_args, params, state.count
      )
    else:
      grad_fn = require_grad_fn(name, grad_fn, params)
      final = final_gradient(updates, params, state.count, grad_fn, **extra_args)
    new_updates, base_state = base_update(
      base_optimizer, final, state.base_state, params, axis_name=batch_axis_name
    )
    return new_updates, SAMState(count=state.count + 1, base_state=base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

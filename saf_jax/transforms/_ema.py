r"""MESA's teacher: an exponential moving average of the weights (Eq. 10 of Du et al. 2022).

``ema_update`` is the rule on any pytree, for a loop that keeps the average itself (as
``TrainState`` does); ``ema_params`` keeps it in the optimizer state, as the last link of an
``optax.chain``, and ``get_ema_params`` reads it back. ``optax.ema`` is another thing: it
averages the updates, not the weights.
"""

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

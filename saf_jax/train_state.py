"""The train state: arrays only; the model and optimizer are passed to step factories."""

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from saf_jax import methods


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes, as one pytree of arrays.

  SAF's logit table is not here: it lives on the host (``saf_jax.logit_table``), and its
  targets enter the step through the batch.

  Attributes:
    step: number of optimizer steps taken; shape=(), int32.
    params: model parameters, a pytree of float32 arrays.
    batch_stats: BatchNorm running statistics, a pytree of float32 arrays (may be empty).
    opt_state: the optax state of the base optimizer.
    ema_params: MESA's teacher weights v (Eq. 10 of Du et al. 2022), a pytree matching
      ``params``; None for other methods.
    ema_batch_stats: EMA of ``batch_stats`` with the same decay, used by the teacher's
      eval-mode forward; None for other methods.
    model_ema_params: the evaluation-only model EMA of ``params`` (timm's ``ModelEmaV2``,
      what the authors' scripts evaluate; ``config.eval.ema_decay``), any method; None
      when off. The same update (``transforms.ema_update``) as MESA's teacher, with its
      own decay; it never enters the loss.
    model_ema_batch_stats: its EMA of ``batch_stats``; None when off.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any = None
  ema_batch_stats: Any = None
  model_ema_params: Any = None
  model_ema_batch_stats: Any = None


def create_train_state(
  model: Any,
  tx: optax.GradientTransformation,
  *,
  rng: jax.Array,
  image_shape,
  method: str | methods.Method,
  model_ema: bool = False,
) -> TrainState:
  """Initialises params, batch_stats, opt_state and (MESA) their EMA copies.

  MESA's EMA and the model EMA start at the initial weights and statistics
  (:math:`v_0 = \\theta_0`, as timm's ``ModelEmaV2``).

  Args:
    model: a Flax module (``init(rng, images, train=False)``).
    tx: the base optimizer.
    rng: PRNG key for the parameter init.
    image_shape: (height, width, channels) of one example.
    method: a name of ``methods.NAMES`` or its ``methods.Method``; only MESA (alone or
      composed, e.g. 'mesa+sam') allocates ``ema_params``.
    model_ema: whether to allocate the evaluation-only ``model_ema_params``.

  Returns:
    A ``TrainState`` at step 0.
  """
  variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  state = TrainState(
    step=jnp.zeros([], jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=tx.init(params),
  )
  copy = functools.partial(jax.tree.map, jnp.copy)
  if methods.parse(method).mesa:
    state = state.replace(ema_params=copy(params), ema_batch_stats=copy(batch_stats))
  if model_ema:
    state = state.replace(model_ema_params=copy(params), model_ema_batch_stats=copy(batch_stats))
  return state

"""The train state: arrays only; the model and optimizer are passed to step factories."""

from typing import Any

import flax.struct
import jax


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
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any = None
  ema_batch_stats: Any = None

"""saf_jax: sharpness-aware training for free (SAF, MESA) and its baselines in JAX/Flax.

User-facing names; everything else is reached through its module.
"""

from saf_jax.logit_table import LogitTable
from saf_jax.losses import cross_entropy, trajectory_loss
from saf_jax.train_state import TrainState
from saf_jax.transforms import EmaParamsState, ema_params, ema_update, get_ema_params

__all__ = [
  'EmaParamsState',
  'LogitTable',
  'TrainState',
  'cross_entropy',
  'ema_params',
  'ema_update',
  'get_ema_params',
  'trajectory_loss',
]

"""saf_jax: sharpness-aware training for free (SAF, MESA) and its baselines in JAX/Flax.

User-facing names; everything else is reached through its module.
"""

from saf_jax.logit_table import LogitTable
from saf_jax.losses import cross_entropy, trajectory_loss
from saf_jax.train_state import TrainState
from saf_jax.transforms import (
  EmaParamsState,
  LookSAMState,
  MSAMState,
  SAMState,
  asam,
  ema_params,
  ema_update,
  esam,
  get_ema_params,
  gsam,
  looksam,
  msam,
  rwp,
  sam,
)

__all__ = [
  'EmaParamsState',
  'LogitTable',
  'LookSAMState',
  'MSAMState',
  'SAMState',
  'TrainState',
  'asam',
  'cross_entropy',
  'ema_params',
  'ema_update',
  'esam',
  'get_ema_params',
  'gsam',
  'looksam',
  'msam',
  'rwp',
  'sam',
  'trajectory_loss',
]

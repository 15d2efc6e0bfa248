r"""Optax-style transforms for sharpness-aware training.

Two groups: MESA's parameter EMA (``ema_params``), and the SAM-family baselines (``sam``,
``asam``, ``gsam``, ``looksam``, ``esam``, ``msam``, ``rwp``), each wrapping a base
optimizer. The latter follow ``optax.contrib.sam``'s opaque mode: ``update`` receives the
clean gradient :math:`g = \nabla L_B(\theta)` and a ``grad_fn`` for the gradient at other
params::

  eps = perturbation(g, params)                  # e.g. rho * g / ||g||  (SAM, Eq. 4)
  final = combine(g, grad_fn(params + eps))      # e.g. the perturbed gradient itself
  updates, base_state = base.update(final, base_state, params)

so that a loop with side effects (BatchNorm statistics) controls every forward pass.
``msam`` needs no gradient at :math:`\theta`: its one gradient is at
``msam_perturbed_params(state, params)``, passed as ``update``'s first argument (or taken
by ``grad_fn``). ``rwp``'s perturbation is random, independent of :math:`g`.

MESA's teacher (Eq. 10 of Du et al. 2022) is an exponential moving average of the
weights, not of the updates (``optax.ema`` averages updates)::

  v_0 = theta_0
  v_t = ema_decay * v_{t-1} + (1 - ema_decay) * theta_t     # after every step

``ema_update`` is that rule on any pytree; the training loop applies it to ``params``
and ``batch_stats`` kept explicitly in ``TrainState``. ``ema_params`` wraps the same rule
as a gradient transformation for users with their own loop: put it *last* in an
``optax.chain`` (it needs the final updates to know the new params) and read the
average with ``get_ema_params``::

  tx = optax.chain(optax.sgd(0.1, momentum=0.9), transforms.ema_params(ema_decay=0.9995))
  opt_state = tx.init(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  teacher_params = transforms.get_ema_params(opt_state)

Every public name lives in a private module, as in ``optax.transforms``, and is used from
here (``transforms.sam``, ``transforms.ema_params``):

* ``_ema``: ``ema_update``, ``ema_params``, ``EmaParamsState``, ``get_ema_params``.
* ``_sam``: ``sam`` and ``asam`` (with ``asam_adaptive_mask``, ``ASAM_ADAPTIVE_PARAMS``).
* ``_gsam``: ``gsam`` and its radius schedule ``gsam_rho``.
* ``_looksam``: ``looksam`` and ``LookSAMState``.
* ``_esam``: ``esam``.
* ``_msam``: ``msam``, ``MSAMState``, ``msam_perturbed_params`` and ``msam_momentum``.
* ``_rwp``: ``rwp`` with its noise: ``rwp_noise``, ``rwp_noise_std``, ``rwp_noise_key``.
* ``_sam_common``: what the SAM family shares: ``SAMState``, ``GradFn``, the checks, the
  tree math and the base-optimizer wrapper.
"""

from saf_jax.transforms._ema import EmaParamsState, ema_params, ema_update, get_ema_params
from saf_jax.transforms._esam import esam
from saf_jax.transforms._gsam import gsam, gsam_rho
from saf_jax.transforms._looksam import LookSAMState, looksam
from saf_jax.transforms._msam import MSAMState, msam, msam_momentum, msam_perturbed_params
from saf_jax.transforms._rwp import rwp, rwp_noise, rwp_noise_key, rwp_noise_std
from saf_jax.transforms._sam import ASAM_ADAPTIVE_PARAMS, asam, asam_adaptive_mask, sam
from saf_jax.transforms._sam_common import GradFn, SAMState

__all__ = [
  'ASAM_ADAPTIVE_PARAMS',
  'EmaParamsState',
  'GradFn',
  'LookSAMState',
  'MSAMState',
  'SAMState',
  'asam',
  'asam_adaptive_mask',
  'ema_params',
  'ema_update',
  'esam',
  'get_ema_params',
  'gsam',
  'gsam_rho',
  'looksam',
  'msam',
  'msam_momentum',
  'msam_perturbed_params',
  'rwp',
  'rwp_noise',
  'rwp_noise_key',
  'rwp_noise_std',
  'sam',
]

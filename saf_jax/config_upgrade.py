"""Upgrades a ``config.json`` written by an earlier saf_jax to the current config's fields.

A workdir's ``config.json`` records its run's config as it was then. A field added since
is missing from it, but the code of that time behaved as if it had one value, the one
:func:`upgrade_config` fills in. Every reader of a stored config upgrades it first
(``guard.check_config``, ``analysis.runs``), so they all agree on what an old run
did.
"""

import copy
from typing import Any

# Each field added to configs/default.py after the first version, with the value that a
# run written before it implicitly used (see upgrade_config).
ADDED_FIELDS = {
  'method.perturbation_scope': 'global',
  # The SAM family's sections: the methods that read them did not exist yet, so an old run
  # (sgd, saf or mesa) is read with the defaults that a rerun of its command has.
  'method.sam.rho': 0.05,
  'method.asam.rho': 0.5,
  'method.asam.eta': 0.01,
  'method.asam.adaptive_params': 'weights',
  'method.gsam.rho_max': 0.05,
  'method.gsam.rho_min': 0.0,
  'method.gsam.alpha': 0.1,
  'method.looksam.rho': 0.05,
  'method.looksam.k': 5,
  'method.looksam.alpha': 0.7,
  'method.esam.rho': 0.05,
  'method.esam.beta': 0.6,
  'method.esam.gamma': 0.5,
  'analysis.sharpness_every_epochs': 0,
  'analysis.rho': 0.05,
  'analysis.sharpness_num_batches': 8,
  'analysis.subset_seed': 0,
  'checkpoint.every_steps': 0,
  'mesh.param_sharding': 'replicated',
  'method.saf.table_topk': 0,
  'method.saf.table_memmap': False,
  'model.dtype': 'float32',
  'label_smoothing': 0.0,
  'input.image_size': -1,
  'input.shuffle_buffer': 16_384,
  'eval.ema_decay': 0.0,
  'eval.train_accuracy': False,
  'steps_per_dispatch': 1,
  'input.placement': 'host',
  'method.saf.table_placement': 'host',
  'mesh.device_memory_fraction': 0.25,
  # MSAM's and m-RWP's sections: no earlier run read them (as the SAM family's above).
  'method.msam.rho': 3.0,
  'method.rwp.sigma': 0.01,
  'method.rwp.lam': 0.5,
  'input.accum_steps': 1,
  'method.accum_scope': 'accumulated',
}


def upgrade_config(config_dict: dict[str, Any]) -> dict[str, Any]:
  """``config_dict`` with every field added since its run filled in with its old value.

  The development versions before 0.1.0 wrote configs without these fields (0.1.0 has
  them all); a run written before a field existed behaved as its value here says:

  ==================================  ==========  =====================================
  Field                               Added       Value for older runs
  ==================================  ==========  =====================================
  ``method.perturbation_scope``       2026-11-29  ``'global'``: no SAM-family method
                                                  existed, and only those read it.
  ``method.{sam,asam,gsam,looksam,   2026-11-29  Today's defaults (``configs/default.py``):
  esam}.*``                                       no method of such a run read them.
  ``analysis.sharpness_every_epochs`` 2026-11-29  ``0``: training did not measure it.
  ``analysis.rho``                    2026-11-29  ``0.05``, the radius of Fig. 4b.
  ``analysis.sharpness_num_batches``  2026-11-29  ``8`` batches for the sharpness tool.
  ``analysis.subset_seed``            2026-11-29  ``0``.
  ``checkpoint.every_steps``          2026-11-30  ``0``: saved at epoch ends only.
  ``mesh.param_sharding``             2026-11-30  ``'replicated'``, the only layout.
  ``method.saf.table_topk``           2026-11-30  ``0``: the table stored every logit.
  ``method.saf.table_memmap``         2026-11-30  ``False``: the table was in RAM.
  ``model.dtype``                     2026-11-30  ``'float32'`` computation.
  ``label_smoothing``                 2026-11-30  ``0.0``: plain cross-entropy.
  ``input.image_size``                2026-11-30  ``-1``: images kept at their size.
  ``input.shuffle_buffer``            2026-11-30  ``16384`` examples (nothing was
                                                  streamed before; in-memory data
                                                  ignores it).
  ``eval.ema_decay``                  2026-12-05  ``0.0``: no model EMA.
  ``eval.train_accuracy``             2026-12-05  ``False``: not measured.
  ``steps_per_dispatch``              2026-12-06  ``1``: one step per call.
  ``input.placement``                 2026-12-06  ``'host'``: the tf.data pipeline.
  ``method.saf.table_placement``      2026-12-06  ``'host'``: the ``LogitTable``.
  ``mesh.device_memory_fraction``     2026-12-06  ``0.25`` (read only by ``'auto'``).
  ``method.{msam,rwp}.*``             2026-12-06  Today's defaults: no method of such a
                                                  run read them.
  ``input.accum_steps``               2026-12-07  ``1``: the whole batch at once.
  ``method.accum_scope``              2026-12-07  ``'accumulated'`` (read only with
                                                  ``accum_steps > 1``).
  ==================================  ==========  =====================================

  ``distributed`` (how ``main.py`` starts the processes, never read from a stored config)
  is left out; a field the config has is never changed.

  Args:
    config_dict: a config as read from ``config.json`` (nested dicts); not modified.

  Returns:
    A new nested dict: ``config_dict`` with the missing fields of :data:`ADDED_FIELDS`
    (and their sections) added.
  """
  upgraded = copy.deepcopy(config_dict)
  for field, value in ADDED_FIELDS.items():
    *sections, name = field.split('.')
    target = upgraded
    for section in sections:
      target = target.setdefault(section, {})
    target.setdefault(name, value)
  return upgraded

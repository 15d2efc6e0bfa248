"""Checks a training config before any data loading, compilation or write to disk.

Every field's rule is declared once, as a row of a table: the dotted field, a check of its
value, and the allowed values as the error states them. :func:`validate_config` walks the
rows in order and raises for the first value that fails, naming the field and the allowed
values, so a bad command line fails in a second instead of after a compile, and never
touches an existing workdir.

Only static checks live here: what the config alone decides. Checks that need the data
(more examples than a split holds, ``method.saf.table_topk`` against the number of
classes) are made where the data is loaded. A stored ``config.json`` of an earlier
version is upgraded (``saf_jax.config_upgrade``) before it is validated: no field has a
default here, and a missing one fails as ``got <missing>``.
"""

from typing import NamedTuple

import ml_collections

from saf_jax import accumulate, data, logit_table, methods, models, transforms
from saf_jax.config_rules import (
  MISSING,
  Rule,
  check,
  int_at_least,
  is_int,
  is_number,
  lookup,
  one_of,
)

OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('cosine', 'constant')
TABLE_DTYPES = tuple(logit_table.layout.DTYPES)  # The storage the table implements.
PERTURBATION_SCOPES = ('global', 'per_device')
PARAM_SHARDINGS = ('replicated',)
MODEL_DTYPES = ('float32', 'bfloat16')
PLACEMENTS = ('auto', 'device', 'host')  # saf_jax.placement.PLACEMENTS, without importing JAX.


class _Devices(NamedTuple):
  """What the cross-field rules check the config against (the rules' context).

  Attributes:
    num_devices: devices of all processes.
    num_processes: JAX processes feeding one global batch.
    batch_devices: devices the batch is split over: ``config.mesh.data``, or all.
  """

  num_devices: int
  num_processes: int
  batch_devices: int


def _positive(field: str) -> Rule:
  return Rule(field, lambda x: is_number(x) and x > 0, 'a number > 0')


def _nonnegative(field: str) -> Rule:
  return Rule(field, lambda x: is_number(x) and x >= 0, 'a number >= 0')


def _in_unit_interval(field: str) -> Rule:
  """``field`` in (0, 1]: a fraction of the parameters or of the batch."""
  return Rule(field, lambda x: is_number(x) and 0 < x <= 1, 'in (0, 1]')


def _below_one(field: str, allowed: str = 'in [0, 1)') -> Rule:
  return Rule(field, lambda x: is_number(x) and 0 <= x < 1, allowed)


def _per_device_batch(config: ml_collections.ConfigDict, devices: _Devices) -> int:
  """Examples of one step on one device: the global batch over the batch's devices."""
  return config.input.batch_size // devices.batch_devices


def _divisors(n: int, limit: int = 12) -> str:
  """The divisors of ``n``, the first ``limit`` of them, as a list in words."""
  found = [d for d in range(1, n + 1) if n % d == 0]
  return str(found[:limit])[:-1] + (', ...]' if len(found) > limit else ']')


def _batch_rules(field: str) -> tuple[Rule, ...]:
  """A global batch size: split evenly over the devices and over the processes."""
  return (
    Rule(field, int_at_least(1), 'an integer >= 1'),
    Rule(
      field,
      lambda x, config, devices: x % devices.batch_devices == 0,
      lambda config, devices: f'divisible by the number of devices ({devices.batch_devices})',
      cross_field=True,
    ),
    Rule(
      field,
      lambda x, config, devices: x % devices.num_processes == 0,
      lambda config, devices: f'divisible by the number of processes ({devices.num_processes})',
      cross_field=True,
    ),
  )


# The rules of every config, in the order they are checked with data.INPUT_RULES between
# _RULES and _RULES_AFTER_INPUT. The mesh comes first (the batch rules divide by its
# devices), the number of epochs before the warm-up's.
_RULES = (
  Rule(
    'mesh.data',
    lambda x, config, devices: devices.num_processes == 1 or x in (-1, devices.num_devices),
    lambda config, devices: (
      f'-1 or {devices.num_devices} (every device of the {devices.num_processes} processes)'
    ),
    cross_field=True,
  ),
  Rule(
    'mesh.data',
    lambda x, config, devices: is_int(x) and (x == -1 or 1 <= x <= devices.num_devices),
    lambda config, devices: f'-1 or an integer in [1, {devices.num_devices}]',
    cross_field=True,
  ),
  Rule('mesh.param_sharding', one_of(PARAM_SHARDINGS), f'one of {list(PARAM_SHARDINGS)}'),
  Rule('method.name', one_of(methods.NAMES), f'one of {list(methods.NAMES)}'),
  Rule('eval.every_epochs', int_at_least(1), 'an integer >= 1'),
  Rule('checkpoint.every_epochs', int_at_least(1), 'an integer >= 1'),
  Rule('checkpoint.max_to_keep', int_at_least(1), 'an integer >= 1'),
  _below_one('eval.ema_decay', 'a number in [0, 1) (0 = no model EMA)'),
  Rule('eval.train_accuracy', lambda x: isinstance(x, bool), 'True or False'),
  Rule(
    'eval.train_accuracy',
    lambda x, config, devices: (
      not x or lookup(config, 'input.dataset') not in data.STREAMED_DATASETS
    ),
    lambda config, devices: (
      f'False for the streamed dataset {config.input.dataset!r} (True needs a dataset held '
      'in memory)'
    ),
    cross_field=True,
  ),
  Rule('checkpoint.every_steps', int_at_least(0), 'an integer >= 0 (0 = only at epoch ends)'),
  Rule('steps_per_dispatch', int_at_least(1), 'an integer >= 1'),
  Rule(
    'checkpoint.every_steps',
    lambda x, config, devices: x % config.steps_per_dispatch == 0,
    lambda config, devices: (
      f'a multiple of steps_per_dispatch={config.steps_per_dispatch} (checkpoints are '
      'saved between dispatches), or 0'
    ),
    cross_field=True,
  ),
  Rule('mesh.device_memory_fraction', lambda x: is_number(x) and 0 < x <= 1, 'a number in (0, 1]'),
  Rule('analysis.sharpness_every_epochs', int_at_least(0), 'an integer >= 0 (0 = off)'),
  _positive('analysis.rho'),
  Rule('analysis.sharpness_num_batches', int_at_least(1), 'an integer >= 1'),
  Rule('analysis.subset_seed', is_int, 'an integer'),
  Rule('model.name', one_of(tuple(models.MODELS)), f'one of {sorted(models.MODELS)}'),
)

# Checked after the input's rules (data.INPUT_RULES), which follow _RULES.
_RULES_AFTER_INPUT = (
  Rule('seed', is_int, 'an integer'),
  Rule('log_every_steps', int_at_least(1), 'an integer >= 1'),
  Rule('model.dtype', one_of(MODEL_DTYPES), f'one of {list(MODEL_DTYPES)}'),
  _below_one('label_smoothing'),
  # Models without a width (ResNet-50, ViT) leave the field out.
  Rule('model.width', lambda x: x is MISSING or (is_int(x) and x >= 1), 'an integer >= 1'),
  Rule('num_epochs', int_at_least(1), 'an integer >= 1'),
  *_batch_rules('input.batch_size'),
  Rule('input.accum_steps', int_at_least(1), 'an integer >= 1 (1 = no accumulation)'),
  Rule(
    'input.accum_steps',
    lambda x, config, devices: _per_device_batch(config, devices) % x == 0,
    lambda config, devices: (
      f'a divisor of the per-device batch (input.batch_size {config.input.batch_size} / '
      f'{devices.batch_devices} devices = {_per_device_batch(config, devices)}): one of '
      f'{_divisors(_per_device_batch(config, devices))}'
    ),
    cross_field=True,
  ),
  *_batch_rules('input.eval_batch_size'),
  Rule('input.num_train_examples', lambda x: is_int(x) and (x == -1 or x >= 1), '-1 or >= 1'),
  Rule('input.num_test_examples', lambda x: is_int(x) and (x == -1 or x >= 1), '-1 or >= 1'),
  Rule('input.prefetch', int_at_least(1), 'an integer >= 1'),
  Rule('input.placement', one_of(PLACEMENTS), f'one of {list(PLACEMENTS)}'),
  Rule(
    'input.placement',
    lambda x, config, devices: x != 'device' or config.input.dataset not in data.STREAMED_DATASETS,
    lambda config, devices: (
      f"'auto' or 'host' for the streamed dataset {config.input.dataset!r} (only datasets "
      'held in memory fit the devices)'
    ),
    cross_field=True,
  ),
  Rule('optimizer.name', one_of(OPTIMIZERS), f'one of {list(OPTIMIZERS)}'),
  Rule('optimizer.schedule', one_of(SCHEDULES), f'one of {list(SCHEDULES)}'),
  _positive('optimizer.lr'),
  _nonnegative('optimizer.weight_decay'),
  _below_one('optimizer.momentum'),
  _below_one('optimizer.b1'),
  _below_one('optimizer.b2'),
  Rule(
    'optimizer.warmup_epochs',
    lambda x, config, devices: is_number(x) and 0 <= x < config.num_epochs,
    lambda config, devices: f'in [0, num_epochs={config.num_epochs})',
    cross_field=True,
  ),
)


def _trajectory_loss_rules(name: str) -> tuple[Rule, ...]:
  """The trajectory loss's lambda, tau and E_start (Eq. 9 for SAF, Eq. 13 for MESA)."""
  return (
    _nonnegative(f'method.{name}.lam'),
    _positive(f'method.{name}.tau'),
    Rule(f'method.{name}.E_start', int_at_least(0), 'an integer >= 0'),
  )


# The rules of the chosen trajectory method's hyperparameters.
_TRAJECTORY_RULES = {
  'saf': (
    *_trajectory_loss_rules('saf'),
    Rule('method.saf.E_tilde', int_at_least(1), 'an integer >= 1'),
    Rule('method.saf.table_dtype', one_of(TABLE_DTYPES), f'one of {list(TABLE_DTYPES)}'),
    # The upper bound, the number of classes, is checked by the LogitTable.
    Rule(
      'method.saf.table_topk',
      int_at_least(0),
      'an integer >= 0 (0 = full logits; k = the k largest logits per example)',
    ),
    Rule('method.saf.table_memmap', lambda x: isinstance(x, bool), 'True or False'),
    Rule('method.saf.table_placement', one_of(PLACEMENTS), f'one of {list(PLACEMENTS)}'),
    Rule(
      'method.saf.table_placement',
      lambda x, config, devices: x != 'device' or not config.method.saf.table_memmap,
      lambda config, devices: (
        "'auto' or 'host' with method.saf.table_memmap=True (a memory-mapped table is on the host)"
      ),
      cross_field=True,
    ),
  ),
  'mesa': (
    *_trajectory_loss_rules('mesa'),
    Rule(
      'method.mesa.ema_decay',
      lambda x: is_number(x) and 0 < x < 1,
      'in the open interval (0, 1)',
    ),
  ),
}

_SCOPE_RULE = Rule(
  'method.perturbation_scope', one_of(PERTURBATION_SCOPES), f'one of {list(PERTURBATION_SCOPES)}'
)

# The micro-batch scope of a SAM-family perturbation (read only when input.accum_steps > 1).
_ACCUM_SCOPE_RULES = (
  Rule(
    'method.accum_scope',
    one_of(accumulate.ACCUM_SCOPES),
    f'one of {list(accumulate.ACCUM_SCOPES)}',
  ),
  Rule(
    'method.accum_scope',
    lambda x, config, devices: (
      x != 'per_microbatch'
      or config.input.accum_steps == 1
      or methods.parse(config.method.name).perturbation not in accumulate.PER_MICROBATCH_REFUSED
    ),
    lambda config, devices: (
      f"'accumulated' for method {config.method.name} with input.accum_steps > 1 ("
      f'{accumulate.PER_MICROBATCH_REFUSED[methods.parse(config.method.name).perturbation]})'
    ),
    cross_field=True,
  ),
)

# The rules of the chosen SAM-family method's hyperparameters (its transform checks them
# again, for callers without a config).
_SAM_FAMILY_RULES = {
  'sam': (_nonnegative('method.sam.rho'),),
  'asam': (
    _nonnegative('method.asam.rho'),
    _nonnegative('method.asam.eta'),
    Rule(
      'method.asam.adaptive_params',
      one_of(transforms.ASAM_ADAPTIVE_PARAMS),
      f'one of {list(transforms.ASAM_ADAPTIVE_PARAMS)}',
    ),
  ),
  'gsam': (
    _nonnegative('method.gsam.rho_max'),
    _nonnegative('method.gsam.rho_min'),
    Rule(
      'method.gsam.rho_min',
      lambda x, config, devices: x <= config.method.gsam.rho_max,
      lambda config, devices: f'<= config.method.gsam.rho_max ({config.method.gsam.rho_max})',
      cross_field=True,
    ),
    _nonnegative('method.gsam.alpha'),
  ),
  'looksam': (
    _nonnegative('method.looksam.rho'),
    Rule('method.looksam.k', int_at_least(1), 'an integer >= 1'),
    _nonnegative('method.looksam.alpha'),
  ),
  'esam': (
    _nonnegative('method.esam.rho'),
    _in_unit_interval('method.esam.beta'),
    _in_unit_interval('method.esam.gamma'),
  ),
  'msam': (
    _nonnegative('method.msam.rho'),
    # MSAM perturbs along the base optimizer's momentum buffer (AdamW's first moment);
    # optax.sgd without momentum keeps none.
    Rule(
      'optimizer.momentum',
      lambda x, config, devices: config.optimizer.name != 'sgd' or x > 0,
      lambda config, devices: (
        '> 0 for an msam method with optimizer.name=sgd (MSAM perturbs along the momentum '
        'buffer, which SGD without momentum does not keep)'
      ),
      cross_field=True,
    ),
  ),
  'rwp': (
    _nonnegative('method.rwp.sigma'),
    Rule('method.rwp.lam', lambda x: is_number(x) and 0 <= x <= 1, 'a number in [0, 1]'),
  ),
}


def validate_config(
  config: ml_collections.ConfigDict,
  *,
  num_devices: int,
  num_processes: int = 1,
  check_input: bool = True,
) -> None:
  """Raises ``ValueError`` naming the first invalid field of ``config``.

  Args:
    config: the full training config, every field of ``configs/default.py``; a
      config.json of an earlier version is upgraded first (``config_upgrade``).
    num_devices: devices available (all processes'); ``config.mesh.data`` may use fewer
      on one process, and must use all of them with several.
    num_processes: JAX processes feeding one global batch (multi-host).
    check_input: whether to check the ``input`` fields read only by the input pipeline
      (``data.INPUT_RULES``: ``dataset``, ``augment``, ``crop_padding``,
      ``shuffle_buffer``; ``image_size`` always); False for ``benchmark --synthetic``.

  Raises:
    ValueError: ``config.<field> must be <allowed values>, got <value>.`` for the first
      field that is missing or out of range: an unknown method, model, dataset,
      optimizer, schedule, augmentation or table dtype; ``E_tilde < 1``; ``E_start < 0``;
      ``tau <= 0``; ``lam < 0``; ``ema_decay`` outside (0, 1); batch sizes < 1 or not
      divisible by the devices (the per-device perturbation scope splits the batch the
      same way) or by the processes; ``input.accum_steps`` < 1 or not dividing the
      per-device batch; an unknown ``method.accum_scope``, or ``'per_microbatch'`` with
      accumulation for LookSAM, MSAM or m-RWP; non-positive epochs, learning rate or periods; an
      unknown ``perturbation_scope``; for the SAM family ``rho``/``eta``/``alpha < 0``,
      ``k < 1``, ``beta``/``gamma`` outside (0, 1], ``rho_min > rho_max``, an unknown
      ASAM ``adaptive_params``, m-RWP's ``sigma < 0`` or ``lam`` outside [0, 1], or MSAM
      with SGD without momentum; analysis fields out of range
      (``sharpness_every_epochs < 0``, ``rho <= 0``, ``sharpness_num_batches < 1``; more
      batches than the training set holds is refused once it is loaded); checkpoint
      periods (``every_steps < 0``);
      ``eval.train_accuracy`` for a streamed dataset; SAF's ``table_topk < 0`` (its upper
      bound, the number of classes, is checked once the dataset is known); a mesh that
      does not match the devices; an unknown ``mesh.param_sharding``.
  """
  mesh_data = lookup(config, 'mesh.data')
  use_mesh = is_int(mesh_data) and 1 <= mesh_data <= num_devices
  devices = _Devices(num_devices, num_processes, mesh_data if use_mesh else num_devices)
  # Without the input pipeline (benchmark --synthetic), the image size is still read.
  input_rules = data.INPUT_RULES if check_input else (data.IMAGE_SIZE_RULE,)
  check(config, _RULES + input_rules + _RULES_AFTER_INPUT, devices)
  method = methods.parse(config.method.name)
  rules = _TRAJECTORY_RULES.get(method.trajectory, ()) + (_SCOPE_RULE, *_ACCUM_SCOPE_RULES)
  check(config, rules + _SAM_FAMILY_RULES.get(method.perturbation, ()), devices)

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

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import ml_collections

from saf_jax import data, methods, models, transforms

OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('cosine', 'constant')
TABLE_DTYPES = ('float32', 'bfloat16', 'int8')
PERTURBATION_SCOPES = ('global', 'per_device')
PARAM_SHARDINGS = ('replicated',)
MODEL_DTYPES = ('float32', 'bfloat16')


class _Missing:
  """The value of a field the config does not have."""

  def __repr__(self) -> str:
    return '<missing>'


_MISSING = _Missing()


class _Devices(NamedTuple):
  """What the cross-field rules check the config against.

  Attributes:
    num_devices: devices of all processes.
    num_processes: JAX processes feeding one global batch.
    batch_devices: devices the batch is split over: ``config.mesh.data``, or all.
  """

  num_devices: int
  num_processes: int
  batch_devices: int


class Rule(NamedTuple):
  """The rule of one config field.

  Attributes:
    field: the dotted path of the field under ``config``, e.g. ``'method.saf.tau'``.
    check: ``check(value)``, True for an allowed value; for a cross-field rule,
      ``check(value, config, devices)``.
    allowed: the allowed values, as the error message states them; for a cross-field
      rule, ``allowed(config, devices)``.
    cross_field: whether ``check`` and ``allowed`` also take the config and the devices.
  """

  field: str
  check: Callable[..., bool]
  allowed: str | Callable[..., str]
  cross_field: bool = False


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool)


def _int_at_least(minimum: int) -> Callable[[Any], bool]:
  return lambda x: _is_int(x) and x >= minimum


def _one_of(values: Sequence[Any]) -> Callable[[Any], bool]:
  return lambda x: x in values


def _positive(field: str) -> Rule:
  return Rule(field, lambda x: _is_number(x) and x > 0, 'a number > 0')


def _nonnegative(field: str) -> Rule:
  return Rule(field, lambda x: _is_number(x) and x >= 0, 'a number >= 0')


def _in_unit_interval(field: str) -> Rule:
  """``field`` in (0, 1]: a fraction of the parameters or of the batch."""
  return Rule(field, lambda x: _is_number(x) and 0 < x <= 1, 'in (0, 1]')


def _below_one(field: str, allowed: str = 'in [0, 1)') -> Rule:
  return Rule(field, lambda x: _is_number(x) and 0 <= x < 1, allowed)


def _lookup(config: ml_collections.ConfigDict, field: str) -> Any:
  value = config
  for key in field.split('.'):
    if not isinstance(value, ml_collections.ConfigDict) or key not in value:
      return _MISSING
    value = value[key]
  return value


def _sharpness_batches_fit(num_batches, config, devices) -> bool:
  """Whether the training loop's sharpness batches fit the configured training set."""
  del devices
  num_train = _lookup(config, 'input.num_train_examples')
  batch_size = _lookup(config, 'input.batch_size')
  measured = config.analysis.sharpness_every_epochs > 0
  if not (measured and _is_int(num_train) and num_train > 0 and _is_int(batch_size)):
    return True  # Without a count in the config, training checks it once the data is loaded.
  return batch_size < 1 or num_batches * batch_size <= num_train


def _batch_rules(field: str) -> tuple[Rule, ...]:
  """A global batch size: split evenly over the devices and over the processes."""
  return (
    Rule(field, _int_at_least(1), 'an integer >= 1'),
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


def _dataset_is_known(dataset) -> bool:
  return dataset in data.DATASETS or (
    isinstance(dataset, str) and dataset.startswith(data.FOLDER_PREFIX)
  )


# The rules of every config, in the order they are checked. The mesh comes first (the batch
# rules divide by its devices), the number of epochs before the warm-up's.
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
    lambda x, config, devices: _is_int(x) and (x == -1 or 1 <= x <= devices.num_devices),
    lambda config, devices: f'-1 or an integer in [1, {devices.num_devices}]',
    cross_field=True,
  ),
  Rule('mesh.param_sharding', _one_of(PARAM_SHARDINGS), f'one of {list(PARAM_SHARDINGS)}'),
  Rule('method.name', _one_of(methods.NAMES), f'one of {list(methods.NAMES)}'),
  Rule('eval.every_epochs', _int_at_least(1), 'an integer >= 1'),
  Rule('checkpoint.every_epochs', _int_at_least(1), 'an integer >= 1'),
  Rule('checkpoint.max_to_keep', _int_at_least(1), 'an integer >= 1'),
  _below_one('eval.ema_decay', 'a number in [0, 1) (0 = no model EMA)'),
  Rule('eval.train_accuracy', lambda x: isinstance(x, bool), 'True or False'),
  Rule(
    'eval.train_accuracy',
    lambda x, config, devices: (
      not x or _lookup(config, 'input.dataset') not in data.STREAMED_DATASETS
    ),
    lambda config, devices: (
      f'False for the streamed dataset {config.input.dataset!r} (True needs a dataset held '
      'in memory)'
    ),
    cross_field=True,
  ),
  Rule('checkpoint.every_steps', _int_at_least(0), 'an integer >= 0 (0 = only at epoch ends)'),
  Rule('analysis.sharpness_every_epochs', _int_at_least(0), 'an integer >= 0 (0 = off)'),
  _positive('analysis.rho'),
  Rule('analysis.sharpness_num_batches', _int_at_least(1), 'an integer >= 1'),
  Rule(
    'analysis.sharpness_num_batches',
    _sharpness_batches_fit,
    lambda config, devices: (
      'at most input.num_train_examples // input.batch_size = '
      f'{config.input.num_train_examples // config.input.batch_size}'
    ),
    cross_field=True,
  ),
  Rule('analysis.subset_seed', _is_int, 'an integer'),
  Rule('model.name', _one_of(tuple(models.MODELS)), f'one of {sorted(models.MODELS)}'),
  Rule('seed', _is_int, 'an integer'),
  Rule('log_every_steps', _int_at_least(1), 'an integer >= 1'),
  Rule('model.dtype', _one_of(MODEL_DTYPES), f'one of {list(MODEL_DTYPES)}'),
  _below_one('label_smoothing'),
  # Models without a width (ResNet-50, ViT) leave the field out.
  Rule('model.width', lambda x: x is _MISSING or (_is_int(x) and x >= 1), 'an integer >= 1'),
  Rule('num_epochs', _int_at_least(1), 'an integer >= 1'),
  *_batch_rules('input.batch_size'),
  *_batch_rules('input.eval_batch_size'),
  Rule('input.num_train_examples', lambda x: _is_int(x) and (x == -1 or x >= 1), '-1 or >= 1'),
  Rule('input.num_test_examples', lambda x: _is_int(x) and (x == -1 or x >= 1), '-1 or >= 1'),
  Rule('input.prefetch', _int_at_least(1), 'an integer >= 1'),
  Rule('optimizer.name', _one_of(OPTIMIZERS), f'one of {list(OPTIMIZERS)}'),
  Rule('optimizer.schedule', _one_of(SCHEDULES), f'one of {list(SCHEDULES)}'),
  _positive('optimizer.lr'),
  _nonnegative('optimizer.weight_decay'),
  _below_one('optimizer.momentum'),
  _below_one('optimizer.b1'),
  _below_one('optimizer.b2'),
  Rule(
    'optimizer.warmup_epochs',
    lambda x, config, devices: _is_number(x) and 0 <= x < config.num_epochs,
    lambda config, devices: f'in [0, num_epochs={config.num_epochs})',
    cross_field=True,
  ),
)

# The rules of the fields read only by the input pipeline (``check_input``), checked after
# ``_RULES``.
_INPUT_RULES = (
  Rule(
    'input.dataset',
    _dataset_is_known,
    f"one of {list(data.DATASETS)} or '{data.FOLDER_PREFIX}/path'",
  ),
  Rule(
    'input.image_size',
    lambda x: _is_int(x) and (x == -1 or x >= 1),
    '-1 (keep the images) or an integer >= 1 (pixels)',
  ),
  Rule(
    'input.augment',
    lambda x, config, devices: x in data.augmentations(config.input.dataset),
    lambda config, devices: (
      f'one of {list(data.augmentations(config.input.dataset))} for dataset '
      f'{config.input.dataset!r}'
    ),
    cross_field=True,
  ),
  Rule('input.crop_padding', _int_at_least(0), 'an integer >= 0 (pixels)'),
  Rule('input.shuffle_buffer', _int_at_least(1), 'an integer >= 1 (examples)'),
)


def _trajectory_loss_rules(name: str) -> tuple[Rule, ...]:
  """The trajectory loss's lambda, tau and E_start (Eq. 9 for SAF, Eq. 13 for MESA)."""
  return (
    _nonnegative(f'method.{name}.lam'),
    _positive(f'method.{name}.tau'),
    Rule(f'method.{name}.E_start', _int_at_least(0), 'an integer >= 0'),
  )


# The rules of the chosen trajectory method's hyperparameters.
_TRAJECTORY_RULES = {
  'saf': (
    *_trajectory_loss_rules('saf'),
    Rule('method.saf.E_tilde', _int_at_least(1), 'an integer >= 1'),
    Rule('method.saf.table_dtype', _one_of(TABLE_DTYPES), f'one of {list(TABLE_DTYPES)}'),
    # The upper bound, the number of classes, is checked by the LogitTable.
    Rule(
      'method.saf.table_topk',
      _int_at_least(0),
      'an integer >= 0 (0 = full logits; k = the k largest logits per example)',
    ),
    Rule('method.saf.table_memmap', lambda x: isinstance(x, bool), 'True or False'),
  ),
  'mesa': (
    *_trajectory_loss_rules('mesa'),
    Rule(
      'method.mesa.ema_decay',
      lambda x: _is_number(x) and 0 < x < 1,
      'in the open interval (0, 1)',
    ),
  ),
}

_SCOPE_RULE = Rule(
  'method.perturbation_scope', _one_of(PERTURBATION_SCOPES), f'one of {list(PERTURBATION_SCOPES)}'
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
      _one_of(transforms.ASAM_ADAPTIVE_PARAMS),
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
    Rule('method.looksam.k', _int_at_least(1), 'an integer >= 1'),
    _nonnegative('method.looksam.alpha'),
  ),
  'esam': (
    _nonnegative('method.esam.rho'),
    _in_unit_interval('method.esam.beta'),
    _in_unit_interval('method.esam.gamma'),
  ),
}


def _check(config: ml_collections.ConfigDict, devices: _Devices, rules: Sequence[Rule]) -> None:
  """Raises ``ValueError`` for the first of ``rules`` that ``config`` breaks."""
  for rule in rules:
    value = _lookup(config, rule.field)
    if rule.cross_field:
      ok = rule.check(value, config, devices)
    else:
      ok = rule.check(value)
    if not ok:
      allowed = rule.allowed(config, devices) if rule.cross_field else rule.allowed
      raise ValueError(f'config.{rule.field} must be {allowed}, got {value!r}.')


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
      (``dataset``, ``image_size``, ``augment``, ``crop_padding``, ``shuffle_buffer``);
      False for ``benchmark --synthetic``.

  Raises:
    ValueError: ``config.<field> must be <allowed values>, got <value>.`` for the first
      field that is missing or out of range: an unknown method, model, dataset,
      optimizer, schedule, augmentation or table dtype; ``E_tilde < 1``; ``E_start < 0``;
      ``tau <= 0``; ``lam < 0``; ``ema_decay`` outside (0, 1); batch sizes < 1 or not
      divisible by the devices (the per-device perturbation scope splits the batch the
      same way) or by the processes; non-positive epochs, learning rate or periods; an
      unknown ``perturbation_scope``; for the SAM family ``rho``/``eta``/``alpha < 0``,
      ``k < 1``, ``beta``/``gamma`` outside (0, 1], ``rho_min > rho_max`` or an unknown
      ASAM ``adaptive_params``; analysis fields out of range
      (``sharpness_every_epochs < 0``, ``rho <= 0``, more sharpness batches than
      ``input.num_train_examples`` holds); checkpoint periods (``every_steps < 0``);
      ``eval.train_accuracy`` for a streamed dataset; SAF's ``table_topk < 0`` (its upper
      bound, the number of classes, is checked once the dataset is known); a mesh that
      does not match the devices; an unknown ``mesh.param_sharding``.
  """
  mesh_data = _lookup(config, 'mesh.data')
  use_mesh = _is_int(mesh_data) and 1 <= mesh_data <= num_devices
  devices = _Devices(num_devices, num_processes, mesh_data if use_mesh else num_devices)
  _check(config, devices, _RULES + (_INPUT_RULES if check_input else ()))
  method = methods.parse(config.method.name)
  rules = _TRAJECTORY_RULES.get(method.trajectory, ()) + (_SCOPE_RULE,)
  _check(config, devices, rules + _SAM_FAMILY_RULES.get(method.perturbation, ()))

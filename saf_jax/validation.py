"""Checks a training config before any data loading, compilation or write to disk.

Every error names the config field and the allowed values, so a bad command line fails
in a second instead of after a compile, and never touches an existing workdir.
"""

import ml_collections

from saf_jax import data, methods, models, transforms

OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('cosine', 'constant')
TABLE_DTYPES = ('float32', 'bfloat16', 'int8')
PERTURBATION_SCOPES = ('global', 'per_device')
PARAM_SHARDINGS = ('replicated',)
MODEL_DTYPES = ('float32', 'bfloat16')


def _require(ok: bool, field: str, value, allowed: str) -> None:
  if not ok:
    raise ValueError(f'config.{field} must be {allowed}, got {value!r}.')


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool)


def validate_config(
  config: ml_collections.ConfigDict,
  *,
  num_devices: int,
  num_processes: int = 1,
  check_input: bool = True,
) -> None:
  """Raises ``ValueError`` naming the first invalid field of ``config``.

  Args:
    config: the full training config (see ``configs/default.py``).
    num_devices: devices available (all processes'); ``config.mesh.data`` may use fewer
      on one process, and must use all of them with several.
    num_processes: JAX processes feeding one global batch (multi-host).
    check_input: whether to check ``input.dataset`` and ``input.augment`` against the
      TFDS pipeline (imports TensorFlow); False for ``benchmark --synthetic``.

  Raises:
    ValueError: for an unknown method, model, dataset, optimizer, schedule, augmentation
      or table dtype; ``E_tilde < 1``; ``E_start < 0``; ``tau <= 0``; ``lam < 0``;
      ``ema_decay`` outside (0, 1); batch sizes < 1 or not divisible by the devices
      (the per-device perturbation scope splits the batch the same way); non-positive
      epochs, learning rate or periods; an unknown ``perturbation_scope``; for the SAM
      family ``rho``/``eta``/``alpha < 0``, ``k < 1``, ``beta``/``gamma`` outside (0, 1],
      ``rho_min > rho_max`` or an unknown ASAM ``adaptive_params``; analysis fields
      out of range (``sharpness_every_epochs < 0``, ``rho <= 0``, more sharpness batches
      than the training set holds); checkpoint periods (``every_steps < 0``); SAF's
      ``table_topk`` outside [0, classes) is checked once the dataset is known; a mesh
      that does not match the devices; an unknown ``mesh.param_sharding``.
  """
  mesh_data = config.mesh.data
  if num_processes > 1:
    _require(
      mesh_data in (-1, num_devices),
      'mesh.data',
      mesh_data,
      f'-1 or {num_devices} (every device of the {num_processes} processes)',
    )
  _require(
    _is_int(mesh_data) and (mesh_data == -1 or 1 <= mesh_data <= num_devices),
    'mesh.data',
    mesh_data,
    f'-1 or an integer in [1, {num_devices}]',
  )
  _require(
    config.mesh.param_sharding in PARAM_SHARDINGS,
    'mesh.param_sharding',
    config.mesh.param_sharding,
    f'one of {list(PARAM_SHARDINGS)}',
  )
  if mesh_data != -1:
    num_devices = mesh_data  # The batch is split over the mesh, not all devices.
  method = config.method.name
  _require(method in methods.NAMES, 'method.name', method, f'one of {list(methods.NAMES)}')
  _validate_periods(config)
  _validate_analysis(config)
  _require(
    config.model.name in models.MODELS,
    'model.name',
    config.model.name,
    f'one of {sorted(models.MODELS)}',
  )
  if check_input:
    dataset = config.input.dataset
    _require(
      dataset in data.DATASETS
      or (isinstance(dataset, str) and dataset.startswith(data.FOLDER_PREFIX)),
      'input.dataset',
      dataset,
      f"one of {list(data.DATASETS)} or '{data.FOLDER_PREFIX}/path'",
    )
    size = config.input.get('image_size', -1)
    _require(
      _is_int(size) and (size == -1 or size >= 1),
      'input.image_size',
      size,
      '-1 (keep the images) or an integer >= 1 (pixels)',
    )
    allowed = data.augmentations(dataset)
    _require(
      config.input.augment in allowed,
      'input.augment',
      config.input.augment,
      f'one of {list(allowed)} for dataset {dataset!r}',
    )
    padding = config.input.crop_padding
    _require(
      _is_int(padding) and padding >= 0,
      'input.crop_padding',
      padding,
      'an integer >= 0 (pixels)',
    )
    buffer = config.input.get('shuffle_buffer', 1)
    _require(
      _is_int(buffer) and buffer >= 1, 'input.shuffle_buffer', buffer, 'an integer >= 1 (examples)'
    )
  _require(_is_int(config.seed), 'seed', config.seed, 'an integer')
  _require(
    _is_int(config.log_every_steps) and config.log_every_steps >= 1,
    'log_every_steps',
    config.log_every_steps,
    'an integer >= 1',
  )
  _require(
    config.model.get('dtype', 'float32') in MODEL_DTYPES,
    'model.dtype',
    config.model.get('dtype'),
    f'one of {list(MODEL_DTYPES)}',
  )
  smoothing = config.get('label_smoothing', 0.0)
  _require(_is_number(smoothing) and 0 <= smoothing < 1, 'label_smoothing', smoothing, 'in [0, 1)')
  if 'width' in config.model:
    width = config.model.width
    _require(_is_int(width) and width >= 1, 'model.width', width, 'an integer >= 1')
  _require(
    _is_int(config.num_epochs) and config.num_epochs >= 1,
    'num_epochs',
    config.num_epochs,
    'an integer >= 1',
  )
  for field in ('batch_size', 'eval_batch_size'):
    value = config.input[field]
    _require(_is_int(value) and value >= 1, f'input.{field}', value, 'an integer >= 1')
    _require(
      value % num_devices == 0,
      f'input.{field}',
      value,
      f'divisible by the number of devices ({num_devices})',
    )
    _require(
      value % num_processes == 0,
      f'input.{field}',
      value,
      f'divisible by the number of processes ({num_processes})',
    )
  for field in ('num_train_examples', 'num_test_examples'):
    value = config.input[field]
    _require(_is_int(value) and (value == -1 or value >= 1), f'input.{field}', value, '-1 or >= 1')
  _require(
    _is_int(config.input.prefetch) and config.input.prefetch >= 1,
    'input.prefetch',
    config.input.prefetch,
    'an integer >= 1',
  )

  opt = config.optimizer
  _require(opt.name in OPTIMIZERS, 'optimizer.name', opt.name, f'one of {list(OPTIMIZERS)}')
  _require(
    opt.schedule in SCHEDULES, 'optimizer.schedule', opt.schedule, f'one of {list(SCHEDULES)}'
  )
  _require(_is_number(opt.lr) and opt.lr > 0, 'optimizer.lr', opt.lr, 'a number > 0')
  _require(
    _is_number(opt.weight_decay) and opt.weight_decay >= 0,
    'optimizer.weight_decay',
    opt.weight_decay,
    'a number >= 0',
  )
  _require(
    _is_number(opt.momentum) and 0 <= opt.momentum < 1,
    'optimizer.momentum',
    opt.momentum,
    'in [0, 1)',
  )
  for beta in ('b1', 'b2'):
    _require(
      _is_number(opt[beta]) and 0 <= opt[beta] < 1, f'optimizer.{beta}', opt[beta], 'in [0, 1)'
    )
  _require(
    _is_number(opt.warmup_epochs) and 0 <= opt.warmup_epochs < config.num_epochs,
    'optimizer.warmup_epochs',
    opt.warmup_epochs,
    f'in [0, num_epochs={config.num_epochs})',
  )

  parsed = methods.parse(method)
  trajectory, perturbation = parsed.trajectory, parsed.perturbation
  if trajectory is not None:
    hp = config.method[trajectory]
    prefix = f'method.{trajectory}'
    _require(_is_number(hp.lam) and hp.lam >= 0, f'{prefix}.lam', hp.lam, 'a number >= 0')
    _require(_is_number(hp.tau) and hp.tau > 0, f'{prefix}.tau', hp.tau, 'a number > 0')
    _require(
      _is_int(hp.E_start) and hp.E_start >= 0,
      f'{prefix}.E_start',
      hp.E_start,
      'an integer >= 0',
    )
  if trajectory == 'saf':
    saf = config.method.saf
    _require(
      _is_int(saf.E_tilde) and saf.E_tilde >= 1,
      'method.saf.E_tilde',
      saf.E_tilde,
      'an integer >= 1',
    )
    _require(
      saf.table_dtype in TABLE_DTYPES,
      'method.saf.table_dtype',
      saf.table_dtype,
      f'one of {list(TABLE_DTYPES)}',
    )
    _require(
      _is_int(saf.table_topk) and saf.table_topk >= 0,
      'method.saf.table_topk',
      saf.table_topk,
      'an integer >= 0 (0 = full logits; k = the k largest logits per example)',
    )
    _require(
      isinstance(saf.table_memmap, bool),
      'method.saf.table_memmap',
      saf.table_memmap,
      'True or False',
    )
  if trajectory == 'mesa':
    beta = config.method.mesa.ema_decay
    _require(
      _is_number(beta) and 0 < beta < 1,
      'method.mesa.ema_decay',
      beta,
      'in the open interval (0, 1)',
    )
  scope = config.method.perturbation_scope
  _require(
    scope in PERTURBATION_SCOPES,
    'method.perturbation_scope',
    scope,
    f'one of {list(PERTURBATION_SCOPES)}',
  )
  if perturbation is not None:
    _validate_sam_family(config.method[perturbation], f'method.{perturbation}', perturbation)


def _validate_sam_family(hp: ml_collections.ConfigDict, prefix: str, name: str) -> None:
  """The SAM-family method's hyperparameters (the transforms check them again)."""

  def nonnegative(field):
    _require(
      _is_number(hp[field]) and hp[field] >= 0, f'{prefix}.{field}', hp[field], 'a number >= 0'
    )

  def unit_interval(field):
    _require(
      _is_number(hp[field]) and 0 < hp[field] <= 1, f'{prefix}.{field}', hp[field], 'in (0, 1]'
    )

  if name == 'gsam':
    nonnegative('rho_max')
    nonnegative('rho_min')
    _require(
      hp.rho_min <= hp.rho_max,
      f'{prefix}.rho_min',
      hp.rho_min,
      f'<= config.{prefix}.rho_max ({hp.rho_max})',
    )
    nonnegative('alpha')
    return
  nonnegative('rho')
  if name == 'asam':
    nonnegative('eta')
    _require(
      hp.adaptive_params in transforms.ASAM_ADAPTIVE_PARAMS,
      f'{prefix}.adaptive_params',
      hp.adaptive_params,
      f'one of {list(transforms.ASAM_ADAPTIVE_PARAMS)}',
    )
  elif name == 'looksam':
    _require(_is_int(hp.k) and hp.k >= 1, f'{prefix}.k', hp.k, 'an integer >= 1')
    nonnegative('alpha')
  elif name == 'esam':
    unit_interval('beta')
    unit_interval('gamma')


def _validate_periods(config: ml_collections.ConfigDict) -> None:
  for field in ('eval.every_epochs', 'checkpoint.every_epochs', 'checkpoint.max_to_keep'):
    section, name = field.split('.')
    value = config[section][name]
    _require(_is_int(value) and value >= 1, field, value, 'an integer >= 1')
  ema_decay = config.eval.get('ema_decay', 0.0)
  _require(
    _is_number(ema_decay) and 0 <= ema_decay < 1,
    'eval.ema_decay',
    ema_decay,
    'a number in [0, 1) (0 = no model EMA)',
  )
  train_accuracy = config.eval.get('train_accuracy', False)
  _require(isinstance(train_accuracy, bool), 'eval.train_accuracy', train_accuracy, 'True or False')
  if train_accuracy and config.input.dataset == 'imagenet2012':  # The streamed dataset.
    raise ValueError(
      'config.eval.train_accuracy=True needs a dataset held in memory; '
      'imagenet2012 is streamed from its files (set it to False).'
    )
  every_steps = config.checkpoint.every_steps
  _require(
    _is_int(every_steps) and every_steps >= 0,
    'checkpoint.every_steps',
    every_steps,
    'an integer >= 0 (0 = only at epoch ends)',
  )


def _validate_analysis(config: ml_collections.ConfigDict) -> None:
  analysis = config.analysis
  every = analysis.sharpness_every_epochs
  _require(
    _is_int(every) and every >= 0,
    'analysis.sharpness_every_epochs',
    every,
    'an integer >= 0 (0 = off)',
  )
  _require(
    _is_number(analysis.rho) and analysis.rho > 0, 'analysis.rho', analysis.rho, 'a number > 0'
  )
  num_batches = analysis.sharpness_num_batches
  _require(
    _is_int(num_batches) and num_batches >= 1,
    'analysis.sharpness_num_batches',
    num_batches,
    'an integer >= 1',
  )
  num_train = config.input.num_train_examples
  batch_size = config.input.batch_size
  if every > 0 and _is_int(num_train) and num_train > 0 and _is_int(batch_size) and batch_size > 0:
    _require(
      num_batches * config.input.batch_size <= num_train,
      'analysis.sharpness_num_batches',
      num_batches,
      f'at most input.num_train_examples // input.batch_size = '
      f'{num_train // config.input.batch_size}',
    )
  _require(
    _is_int(analysis.subset_seed), 'analysis.subset_seed', analysis.subset_seed, 'an integer'
  )

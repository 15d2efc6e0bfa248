"""The training loop: data, state, SAF's table, evaluation, checkpoints and metrics.

Everything with side effects lives here; steps, losses, transforms and models are pure.
``train_and_evaluate`` implements Algorithm 1 of Du et al. 2022 for SAF and MESA, the
SAM-family baselines, and vanilla training, all with the same base optimizer, init, data
order and schedule, so runs of any two methods with one seed are directly comparable.
"""

import dataclasses
import functools
import itertools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from saf_jax import (
  checkpoint,
  logit_table,
  methods,
  metrics,
  models,
  sharding,
  train_state,
  train_steps,
)
from saf_jax.analysis import sharpness
from saf_jax.data import partition


def _base_optimizer(
  opt_config: ml_collections.ConfigDict, *, steps_per_epoch: int, num_epochs: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The base optimizer and its per-step learning-rate schedule (see create_optimizer)."""
  total_steps = steps_per_epoch * num_epochs
  warmup_steps = int(round(opt_config.warmup_epochs * steps_per_epoch))
  if opt_config.schedule == 'cosine':
    main = optax.cosine_decay_schedule(opt_config.lr, total_steps - warmup_steps)
  else:
    main = optax.constant_schedule(opt_config.lr)
  schedule = main
  if warmup_steps:
    warmup = optax.linear_schedule(0.0, opt_config.lr, warmup_steps)
    schedule = optax.join_schedules([warmup, main], [warmup_steps])
  mask = None
  if not opt_config.decay_norm_and_bias:
    mask = functools.partial(jax.tree.map, lambda p: p.ndim > 1)
  if opt_config.name == 'sgd':
    tx = optax.chain(
      optax.add_decayed_weights(opt_config.weight_decay, mask=mask),
      optax.sgd(schedule, momentum=opt_config.momentum or None),
    )
  else:
    tx = optax.adamw(
      schedule,
      b1=opt_config.b1,
      b2=opt_config.b2,
      weight_decay=opt_config.weight_decay,
      mask=mask,
    )
  return tx, schedule


def create_optimizer(
  config: ml_collections.ConfigDict,
  *,
  steps_per_epoch: int,
  batch_axis_name: str | None = None,
) -> optax.GradientTransformation:
  """The run's optimizer: the base optimizer, wrapped by the SAM-family method if any.

  The base optimizer follows PyTorch's ``torch.optim.SGD`` as used by the paper: weight
  decay is an L2 term added to the gradient before momentum (``add_decayed_weights``
  then ``sgd``), momentum without dampening. AdamW decays weights decoupled from the
  gradient. With ``decay_norm_and_bias=False`` 1-D parameters (biases, BatchNorm scale
  and bias) are not decayed, as timm's default for the paper's code. For a SAM-family
  method weight decay thus acts on the final gradient at :math:`\\theta` only, never on
  the perturbation (as in the ESAM and GSAM authors' PyTorch code; Foret et al.'s JAX
  code instead adds an L2 term to the loss, which then also enters the perturbation).

  Args:
    config: the run's config (``optimizer``, ``method``, ``num_epochs``, ``seed``).
    steps_per_epoch: optimizer steps in one epoch; the schedule spans ``num_epochs``.
    batch_axis_name: for the per-device perturbation scope, the mesh axis the SAM-family
      transform averages its final gradient over (see ``transforms.sam``).

  Returns:
    An optax transform; for a SAM-family method it takes ``grad_fn`` in ``update``.
  """
  base, schedule = _base_optimizer(
    config.optimizer, steps_per_epoch=steps_per_epoch, num_epochs=config.num_epochs
  )
  method = methods.parse(config.method.name)
  return method.optimizer(base, config, schedule=schedule, batch_axis_name=batch_axis_name)


def _with_targets(
  batches: Iterator[dict[str, np.ndarray]], table: logit_table.LogitTable, epoch: int
) -> Iterator[dict[str, np.ndarray]]:
  """Adds SAF's targets to each host batch as it is pulled by the prefetcher."""
  for batch in batches:
    batch['target_logits'], batch['target_mask'] = table.gather(batch['index'], epoch=epoch)
    yield batch


def evaluate(eval_fn, params, batch_stats, batches, data_sharding) -> dict[str, float]:
  """Top-1 accuracy and mean cross-entropy over every (unpadded) example of ``batches``.

  ``batches`` are this process's; with several processes they form global batches
  (``sharding.to_global``) and the totals are over all processes' examples.
  """
  totals = None
  for batch in batches:
    out = eval_fn(params, batch_stats, sharding.to_global(batch, data_sharding))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  return {
    'accuracy': float(totals['correct'] / totals['count']),
    'loss': float(totals['loss_sum'] / totals['count']),
  }


def _check_finite(step_metrics: list[dict[str, np.ndarray]], first_step: int) -> None:
  for i, m in enumerate(step_metrics):
    bad = [k for k, v in m.items() if not np.all(np.isfinite(v))]
    if bad:
      raise FloatingPointError(
        f'Non-finite {bad} at step {first_step + i}; training stopped. The last good '
        'checkpoint in the workdir is untouched.'
      )


def _measure(fn, state: train_state.TrainState, data_sharding, batch: dict[str, np.ndarray]):
  """``fn(params, batch_stats, batch)`` with this process's rows of ``batch`` on the mesh."""
  return fn(state.params, state.batch_stats, sharding.to_global(batch, data_sharding))


# Steps between a step's dispatch and the progress bar reading its loss.
_LAG = 4


@dataclasses.dataclass
class Experiment:
  """Everything static that one config derives: model, optimizer, shapes, compiled steps.

  Both ``train_and_evaluate`` and ``saf_jax.tools.benchmark`` run their steps through
  :meth:`run_steps`, so the benchmark times exactly the training loop's work (data,
  SAF's table reads and writes, the step).

  Attributes:
    config: the run's config.
    method: ``config.method.name``, parsed (``methods.Method``).
    info: the dataset's metadata (``num_train``, ``num_classes``, ``image_shape``, ...).
    model: the Flax module.
    tx: the base optimizer.
    steps_per_epoch: global batches per epoch: each of the ``P`` processes reads
      ``num_train // P`` examples (``partition.process_partition``) in local batches of
      ``batch_size / P``, dropping the remainder.
    mesh: the device mesh, one axis 'data'.
    abstract_state: ``jax.ShapeDtypeStruct`` tree of the ``TrainState``, with shardings.
  """

  config: ml_collections.ConfigDict
  method: methods.Method
  info: Any
  model: Any
  tx: optax.GradientTransformation
  steps_per_epoch: int
  mesh: Any
  abstract_state: Any
  _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def per_device(self) -> bool:
    """Whether the SAM-family perturbation is per device (``jax.shard_map``)."""
    per_device = self.config.method.perturbation_scope == 'per_device'
    return self.method.perturbation is not None and per_device

  @property
  def repl(self):
    return sharding.replicated(self.mesh)

  @property
  def data(self):
    return sharding.data_sharded(self.mesh)

  def trajectory_active(self, epoch: int) -> bool:
    """Algorithm 1, line 10: the trajectory loss is added in epochs ``> E_start``."""
    trajectory = self.method.trajectory
    return trajectory is not None and epoch > self.config.method[trajectory].E_start

  @property
  def state_shardings(self):
    """The train state's shardings (``config.mesh.param_sharding``; replicated)."""
    return jax.tree.map(lambda x: x.sharding, self.abstract_state)

  @property
  def local_batch_size(self) -> int:
    """Examples per step that this process reads: the global batch over processes."""
    return self.config.input.batch_size // jax.process_count()

  def init_state(self) -> train_state.TrainState:
    """The initial state, created already sharded on the mesh (never on one device first)."""
    return jax.jit(self._init_fn, out_shardings=self.state_shardings)(self._rng_init())

  def _rng_init(self) -> jax.Array:
    return jax.random.fold_in(jax.random.key(self.config.seed), 0)

  def _init_fn(self, rng):
    return train_state.create_train_state(
      self.model,
      self.tx,
      rng=rng,
      image_shape=self.info.image_shape,
      method=self.method,
      model_ema=self.model_ema_decay > 0,
    )

  @property
  def model_ema_decay(self) -> float:
    """``config.eval.ema_decay``: the evaluation-only model EMA's decay; 0 = off."""
    return self.config.eval.get('ema_decay', 0.0)

  def new_table(self, workdir: str | None = None) -> logit_table.LogitTable | None:
    """This process's empty SAF logit table (None for other methods).

    It holds the rows of this process's partition of the training set
    (``partition.process_partition``): exactly the examples this process reads every epoch.

    Args:
      workdir: where a memory-mapped table (``config.method.saf.table_memmap``) keeps its
        files, under ``saf_table/process_<p>``; unused otherwise.
    """
    if not self.method.saf:
      return None
    saf = self.config.method.saf
    first_id, num_ids = partition.process_partition(
      self.info.num_train, jax.process_index(), jax.process_count()
    )
    memmap_dir = None
    if saf.table_memmap:
      memmap_dir = os.path.join(workdir, 'saf_table', f'process_{jax.process_index()}')
    return logit_table.LogitTable(
      num_ids,
      self.info.num_classes,
      E_tilde=saf.E_tilde,
      dtype=saf.table_dtype,
      first_id=first_id,
      topk=saf.table_topk,
      tau=saf.tau,
      memmap_dir=memmap_dir,
    )

  def _batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    batch_size, data = self.config.input.batch_size, self.data
    vec = functools.partial(jax.ShapeDtypeStruct, (batch_size,), sharding=data)
    spec = {
      'image': jax.ShapeDtypeStruct(
        (batch_size, *self.info.image_shape), jnp.float32, sharding=data
      ),
      'label': vec(jnp.int32),
      'index': vec(jnp.int32),
    }
    if self.method.saf:
      spec['target_logits'] = jax.ShapeDtypeStruct(
        (batch_size, self.info.num_classes), jnp.float32, sharding=data
      )
      spec['target_mask'] = vec(jnp.float32)
    return spec

  def compiled_step(self, active: bool, sam_step: bool | None = None):
    """The train step for epochs with (``active``) or without the trajectory loss.

    Compiled ahead of time with explicit shardings (state by ``state_shardings``, batch
    split over 'data') and the old state donated. For LookSAM, ``sam_step`` picks the full SAM step
    (True) or the reuse step (False): two programs chosen on the host by step number
    (see ``transforms.looksam``).
    """
    key = (active, sam_step)
    if key in self._compiled:
      return self._compiled[key]
    hparams = {}
    if self.method.trajectory is not None:
      hp = self.config.method[self.method.trajectory]
      hparams = {'lam': hp.lam, 'tau': hp.tau}
      if self.method.mesa:
        hparams['ema_decay'] = hp.ema_decay
    step = train_steps.make_train_step(
      model=self.model,
      tx=self.tx,
      method=self.method,
      trajectory_active=active,
      batch_axis_name='data' if self.per_device else None,
      sam_step=sam_step,
      label_smoothing=self.config.get('label_smoothing', 0.0),
      model_ema_decay=self.model_ema_decay,
      **hparams,
    )
    if self.per_device:
      # Each device perturbs with its own shard's gradient (m-sharpness); the step
      # averages the final gradient, batch_stats and metrics over 'data'.
      step = jax.shard_map(
        step, mesh=self.mesh, in_specs=(P(), P('data')), out_specs=(P(), P(), P('data'))
      )
    jitted = jax.jit(
      step,
      in_shardings=(self.state_shardings, self.data),
      out_shardings=(self.state_shardings, self.repl, self.data),
      donate_argnums=0,
    )
    self._compiled[key] = jitted.lower(self.abstract_state, self._batch_spec()).compile()
    return self._compiled[key]

  def step_for(self, epoch: int) -> Callable[[int], Any]:
    """``step_number -> compiled step`` for ``epoch``; compiles what the epoch needs."""
    active = self.trajectory_active(epoch)
    if self.method.perturbation == 'looksam' and self.config.method.looksam.k > 1:
      k = self.config.method.looksam.k
      sam, reuse = self.compiled_step(active, True), self.compiled_step(active, False)
      return lambda step: sam if step % k == 0 else reuse
    step_fn = self.compiled_step(active)
    return lambda step: step_fn

  def run_steps(
    self,
    state: train_state.TrainState,
    host_batches: Iterator[dict[str, np.ndarray]],
    *,
    epoch: int,
    table: logit_table.LogitTable | None,
    num_steps: int | None = None,
    desc: str | None = None,
    stop: Callable[[int], bool] | None = None,
  ) -> tuple[train_state.TrainState, list[dict[str, np.ndarray]], float]:
    """Runs up to ``num_steps`` steps of epoch ``epoch`` over ``host_batches``.

    For SAF each batch's targets are gathered from ``table`` when the prefetcher pulls
    it (Algorithm 1, line 5) and the step's own logits (this process's rows) are written
    back asynchronously (line 4); the table is flushed before returning.

    ``stop(step)``, asked after each dispatched step with the number of steps taken,
    ends the run early when it returns True (a preemption request); the steps run so far
    are returned. ``host_batches`` are this process's local batches.

    Returns:
      ``(state, per-step metrics as numpy scalars, seconds)``, where the time runs from
      the first batch request until the last step's results are ready.
    """
    step_fns = self.step_for(epoch)
    first_step = int(jax.device_get(state.step))
    if num_steps is not None:
      host_batches = itertools.islice(host_batches, num_steps)
    if table is not None:
      host_batches = _with_targets(host_batches, table, epoch)
    batches = sharding.prefetch_to_device(
      host_batches, size=self.config.input.prefetch, sharding=self.data
    )
    step_metrics = []
    start = time.perf_counter()
    bar = None
    if desc is not None:
      bar = tqdm.tqdm(batches, total=num_steps or self.steps_per_epoch, desc=desc, leave=False)
      batches = bar
    for i, (host_batch, batch) in enumerate(batches):
      state, step_out, logits = step_fns(first_step + i)(state, batch)
      if table is not None:  # Algorithm 1, line 4.
        table.write_async(host_batch['index'], sharding.local_rows(logits), epoch=epoch)
      step_metrics.append(step_out)
      if bar is not None and (i + 1) % self.config.log_every_steps == 0 and i >= _LAG:
        # A loss from a few steps back is already computed: reading it does not stall
        # the device queue the way reading this step's loss would.
        bar.set_postfix(loss=f'{float(step_metrics[-1 - _LAG]["loss"]):.4f}')
      if stop is not None and stop(first_step + i + 1):
        break
    if bar is not None:
      bar.close()
    if table is not None:
      table.flush()
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    return state, jax.device_get(step_metrics), seconds


def build_experiment(
  config: ml_collections.ConfigDict, info: Any, *, model: Any = None
) -> Experiment:
  """Derives the model, optimizer, mesh and shapes of a validated ``config``.

  Args:
    config: a validated config.
    info: the dataset's ``DatasetInfo``.
    model: a Flax module to use instead of ``config.model`` (tests, custom models).

  Raises:
    ValueError: if the batch size exceeds the number of training examples (of one
      process's partition, with several processes).
  """
  batch_size = config.input.batch_size
  num_processes = jax.process_count()
  steps_per_epoch = (info.num_train // num_processes) // (batch_size // num_processes)
  if steps_per_epoch < 1:
    raise ValueError(
      f'config.input.batch_size must be <= the number of training examples '
      f'({info.num_train}), got {batch_size}.'
    )
  mesh = sharding.create_mesh(config.mesh.data)
  if model is None:
    model_kwargs = {k: v for k, v in config.model.items() if k != 'name'}
    # Mixed precision: the computation dtype; params, opt_state, EMA and losses stay float32.
    model_kwargs['dtype'] = jnp.dtype(model_kwargs.get('dtype', 'float32'))
    model = models.get_model(config.model.name, num_classes=info.num_classes, **model_kwargs)
  per_device = config.method.perturbation_scope == 'per_device'
  tx = create_optimizer(
    config, steps_per_epoch=steps_per_epoch, batch_axis_name='data' if per_device else None
  )
  exp = Experiment(
    config=config,
    method=methods.parse(config.method.name),
    info=info,
    model=model,
    tx=tx,
    steps_per_epoch=steps_per_epoch,
    mesh=mesh,
    abstract_state=None,
  )
  shapes = jax.eval_shape(exp._init_fn, exp._rng_init())
  exp.abstract_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    shapes,
    sharding.state_shardings(shapes, mesh, config.mesh.param_sharding),
  )
  return exp


# The accuracies of the console's epoch line: (record prefix, label).
_EPOCH_LINE_ACCURACIES = (
  ('test', 'test'),
  ('test_ema', 'teacher'),
  ('test_model_ema', 'EMA'),
  ('train_eval', 'train-eval'),
)


def epoch_line(record: dict[str, Any], num_epochs: int) -> str:
  """One epoch's console line, under 120 characters; ``metrics.jsonl`` has every metric.

  Args:
    record: an epoch's record as written to ``metrics.jsonl`` (``epoch``, ``train/loss``,
      ``train/accuracy``, ``train/images_per_sec`` and, in epochs that evaluate,
      ``<prefix>/accuracy`` for the test set, MESA's teacher, the model EMA, train-eval).
    num_epochs: the run's number of epochs.

  Returns:
    e.g. ``epoch 3/4  loss 2.062  top-1 33.2%  test 32.8%  2390 images/s``: the training
    loss and top-1 are the epoch's means over its steps (augmented batches).
  """
  parts = [
    f'epoch {record["epoch"]}/{num_epochs}',
    f'loss {record["train/loss"]:.4g}',
    f'top-1 {100 * record["train/accuracy"]:.1f}%',
  ]
  for prefix, label in _EPOCH_LINE_ACCURACIES:
    if f'{prefix}/accuracy' in record:
      parts.append(f'{label} {100 * record[f"{prefix}/accuracy"]:.1f}%')
  parts.append(f'{record["train/images_per_sec"]:.0f} images/s')
  return '  '.join(parts)


class _Preemption:
  """Turns SIGTERM into a request to save and stop after the current step.

  With one process the request is this process's signal. With several, every process
  must stop at the same step (saving is collective): JAX's preemption sync point, which
  ``jax.distributed`` arms for SIGTERM, decides the step for all of them.
  """

  def __init__(self):
    self.signal_received = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    del signum, frame
    self.signal_received = True

  def requested(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.signal_received
    try:
      self.signal_received = multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # The preemption service is off: only SIGKILL-safe checkpoints.
      self.signal_received = False
    return self.signal_received


@dataclasses.dataclass
class _Position:
  """Where training continues: ``batches_done`` batches of ``epoch`` are already trained.

  ``metrics`` and ``seconds`` are those batches' per-step train metrics and time, saved in
  a mid-epoch checkpoint so that the resumed epoch's record averages every step.
  """

  epoch: int = 1
  batches_done: int = 0
  metrics: list[dict[str, np.float32]] = dataclasses.field(default_factory=list)
  seconds: float = 0.0

  @classmethod
  def after(cls, meta: dict[str, Any], steps_per_epoch: int) -> '_Position':
    # Checkpoints of saf_jax before mid-epoch saves hold epoch ends only, without the field.
    if meta.get('batches_done', steps_per_epoch) >= steps_per_epoch:
      return cls(epoch=meta['epoch'] + 1)
    metrics = [{k: np.float32(v) for k, v in m.items()} for m in meta['epoch_metrics']]
    return cls(meta['epoch'], meta['batches_done'], metrics, meta['epoch_seconds'])


def _meta(state, position: _Position, exp: Experiment) -> dict[str, Any]:
  return {
    'epoch': position.epoch,
    'batches_done': position.batches_done,
    'step': int(jax.device_get(state.step)),
    'steps_per_epoch': exp.steps_per_epoch,
    'num_devices': exp.mesh.size,
    'num_processes': jax.process_count(),
    # float32 metrics convert to Python floats exactly and back with np.float32.
    'epoch_metrics': [{k: float(v) for k, v in m.items()} for m in position.metrics],
    'epoch_seconds': position.seconds,
  }


def _check_resume(exp: Experiment, meta: dict[str, Any], workdir: str) -> None:
  """Refuses to resume where the saved position or table does not carry over."""
  if exp.per_device and meta['num_devices'] != exp.mesh.size:
    # The per-device batch (SAM's m) and BatchNorm's shard statistics depend on it.
    raise ValueError(
      f'config.method.perturbation_scope is per_device, and the checkpoint in {workdir!r} '
      f'was trained on {meta["num_devices"]} devices but this run has {exp.mesh.size}: set '
      f'config.mesh.data={meta["num_devices"]} or use a new --workdir.'
    )
  saved_processes = meta.get('num_processes', 1)
  if saved_processes != jax.process_count() and (
    exp.method.saf or meta.get('batches_done', 0) < meta.get('steps_per_epoch', 0)
  ):
    # Both SAF's table rows and a mid-epoch data position belong to a process partition.
    raise ValueError(
      f'The checkpoint in {workdir!r} was saved by {saved_processes} processes, and its '
      f'{"SAF table" if exp.method.saf else "mid-epoch data position"} is '
      f'partitioned over them; resume it with {saved_processes} processes (this run has '
      f'{jax.process_count()}), or use a new --workdir.'
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config.method.name`` and evaluates it; resumes from ``workdir`` if possible.

  Checkpoints (``saf_jax.checkpoint``) are saved after every
  ``config.checkpoint.every_epochs`` epochs, every ``config.checkpoint.every_steps`` steps
  (0 = never mid-epoch), after the last epoch, and when SIGTERM arrives (then training
  stops after the current step, saves, and returns). A run restarted with the same
  command continues from the latest checkpoint, mid-epoch included, and ends with the same
  params and metrics as a run that never stopped.

  Args:
    config: see ``configs/default.py``.
    workdir: output directory: ``config.json``, ``metrics.jsonl``, ``checkpoints/``.

  Returns:
    The last epoch's metrics record (also the last line of ``metrics.jsonl``); empty if
    every epoch was already done, ``{'preempted': step}`` if stopped by SIGTERM.

  Raises:
    ValueError: an invalid config field, or a workdir holding an incompatible run; raised
      before any compilation and before anything is written.
    checkpoint.CheckpointError: the latest checkpoint's files are missing or damaged.
    DataNotFoundError: when the dataset is neither prepared nor obtainable.
    FloatingPointError: on a non-finite loss or gradient (names the step); the last
      checkpoint saved before it is kept as it was.
  """
  # Imported here so that the rest of this module (Experiment, run_steps) works without
  # TensorFlow, e.g. with another data loader or in `benchmark --synthetic`.
  from saf_jax import data, validation

  wall_start = time.perf_counter()
  validation.validate_config(
    config, num_devices=jax.device_count(), num_processes=jax.process_count()
  )
  checkpoint.check_workdir(config, workdir)
  datasets = data.create_datasets(config.input, seed=config.seed, process_count=jax.process_count())
  analysis = config.analysis
  if datasets.info.num_train < config.input.batch_size:
    raise ValueError(
      f'config.input.batch_size={config.input.batch_size} is larger than the '
      f'{datasets.info.num_train} training examples of {config.input.dataset}: use a batch '
      f'size of at most {datasets.info.num_train}.'
    )
  max_batches = datasets.info.num_train // config.input.batch_size
  if analysis.sharpness_every_epochs > 0 and analysis.sharpness_num_batches > max_batches:
    raise ValueError(
      f'config.analysis.sharpness_num_batches must be at most num_train // batch_size = '
      f'{max_batches}, got {analysis.sharpness_num_batches}.'
    )
  exp = build_experiment(config, datasets.info)
  topk = config.method.saf.table_topk
  if exp.method.saf and topk >= datasets.info.num_classes:
    raise ValueError(
      f'config.method.saf.table_topk must be 0 (full logits) or in [1, '
      f'{datasets.info.num_classes - 1}] for {datasets.info.num_classes} classes, got {topk}.'
    )
  method, spe = exp.method.name, exp.steps_per_epoch
  processes = {'process_index': jax.process_index(), 'process_count': jax.process_count()}
  logging.info('Mesh %s over %d devices.', dict(exp.mesh.shape), exp.mesh.size)

  batch_size = config.input.batch_size
  ckpt = checkpoint.Checkpointer(
    workdir,
    max_to_keep=config.checkpoint.max_to_keep,
    with_table=exp.method.saf,
    remove_unfinished=True,
  )
  position = _Position()
  newest = ckpt.latest_state_step()
  if newest is not None:  # Before any per-process lookup: every process refuses alike.
    _check_resume(exp, ckpt.meta(newest), workdir)
  latest = ckpt.latest_step()
  table = exp.new_table(workdir)  # A memory-mapped table's files are scratch, refilled below.
  if table is not None:
    logging.info(
      'SAF logit table of process %d: %d rows, %.2f MiB on the host.',
      jax.process_index(),
      table.num_examples,
      table.nbytes / 2**20,
    )
  if latest is not None:
    state, table_arrays, meta = ckpt.restore(
      latest, exp.abstract_state, table.state_dict() if table else None
    )
    if table is not None:
      table.load_state_dict(table_arrays)
    position = _Position.after(meta, spe)
    logging.info(
      'Resumed at step %d (epoch %d, batch %d).',
      meta['step'],
      meta['epoch'],
      meta.get('batches_done', spe),
    )
  else:
    state = exp.init_state()
  done_epochs = position.epoch - 1
  writers = []
  if jax.process_index() == 0:  # One writer of the shared workdir's files.
    checkpoint.write_config(config, workdir)
    writers = [
      metrics.JsonlWriter(workdir, keep_epochs_up_to=done_epochs),
      metrics.TensorBoardWriter(workdir, keep_steps_up_to=done_epochs * spe),
    ]
  if analysis.sharpness_every_epochs > 0:
    # Fig. 4b of Du et al. 2022: SAM's sharpness on fixed, unaugmented training batches.
    # Kept on the host and placed per measurement: no device memory held between epochs.
    local = slice(
      jax.process_index() * exp.local_batch_size, (jax.process_index() + 1) * exp.local_batch_size
    )
    sharpness_batches = [
      {k: b[k][local] for k in ('image', 'label')}
      for b in datasets.train_subset_batches(
        num_batches=analysis.sharpness_num_batches,
        batch_size=batch_size,
        seed=analysis.subset_seed,
      )
    ]
    sharpness_fn = sharpness.model_sam_sharpness_fn(exp.model, rho=analysis.rho)

  eval_fn = jax.jit(functools.partial(train_steps.eval_step, exp.model))
  every_steps = config.checkpoint.every_steps

  def save(position: _Position) -> None:
    save_start = time.perf_counter()
    step = int(jax.device_get(state.step))
    ckpt.save(step, state, table.state_dict() if table else None, _meta(state, position, exp))
    logging.info('Checkpoint at step %d: %.1f s.', step, time.perf_counter() - save_start)

  record: dict[str, Any] = {}
  with _Preemption() as preemption:
    for epoch in range(position.epoch, config.num_epochs + 1):
      if epoch != position.epoch:
        position = _Position(epoch)
      active = exp.trajectory_active(epoch)
      exp.step_for(epoch)  # Compile outside the timed loop.
      host_batches = datasets.train_epoch(
        epoch, batch_size=exp.local_batch_size, start_batch=position.batches_done, **processes
      )
      while position.batches_done < spe:
        step = int(jax.device_get(state.step))
        num_steps = spe - position.batches_done
        if every_steps:
          num_steps = min(num_steps, every_steps - step % every_steps)
        state, step_metrics, seconds = exp.run_steps(
          state,
          host_batches,
          epoch=epoch,
          table=table,
          num_steps=num_steps,
          desc=f'{method} epoch {epoch}/{config.num_epochs}',
          stop=preemption.requested,
        )
        _check_finite(step_metrics, first_step=step + 1)
        position.metrics += step_metrics
        position.batches_done += len(step_metrics)
        position.seconds += seconds
        if position.batches_done < spe and (
          preemption.signal_received
          or (every_steps and (step + len(step_metrics)) % every_steps == 0)
        ):
          save(position)
        if preemption.signal_received:
          break
      if preemption.signal_received and position.batches_done < spe:
        break

      step_metrics = position.metrics
      record = {'epoch': epoch, 'step': int(jax.device_get(state.step))}
      for key in step_metrics[0]:
        record[f'train/{key}'] = float(np.mean([m[key] for m in step_metrics]))
      record['train/trajectory_active'] = int(active)
      record['train/images_per_sec'] = len(step_metrics) * batch_size / position.seconds
      record['train/epoch_time_sec'] = position.seconds
      last = epoch == config.num_epochs
      if analysis.sharpness_every_epochs > 0 and (
        last or epoch % analysis.sharpness_every_epochs == 0
      ):
        sharpness_start = time.perf_counter()
        measured = sharpness.batch_mean(
          functools.partial(_measure, sharpness_fn, state, exp.data), sharpness_batches
        )
        record['train/sam_sharpness'] = measured['sharpness']
        record['sharpness_time_sec'] = time.perf_counter() - sharpness_start
      eval_start = time.perf_counter()
      if last or epoch % config.eval.every_epochs == 0:
        # (prefix, split, weights): the trained weights, MESA's teacher, the model EMA.
        evals = [('test', 'test', (state.params, state.batch_stats))]
        if exp.method.mesa:
          evals.append(('test_ema', 'test', (state.ema_params, state.ema_batch_stats)))
        if exp.model_ema_decay > 0:
          model_ema = (state.model_ema_params, state.model_ema_batch_stats)
          evals.append(('test_model_ema', 'test', model_ema))
        if config.eval.get('train_accuracy', False):
          evals.append(('train_eval', 'train', (state.params, state.batch_stats)))
        for prefix, split, (params, batch_stats) in evals:
          batches = datasets.test_batches(
            batch_size=config.input.eval_batch_size // jax.process_count(),
            split=split,
            **processes,
          )
          result = evaluate(eval_fn, params, batch_stats, batches, exp.data)
          record.update({f'{prefix}/{k}': v for k, v in result.items()})
      record['eval_time_sec'] = time.perf_counter() - eval_start
      # Metrics first: a resumed run drops records past its checkpoint, never misses one.
      for writer in writers:
        writer.write(record)
      stopping = preemption.signal_received  # Read once: it may turn True at any moment.
      if last or epoch % config.checkpoint.every_epochs == 0 or stopping:
        save(position)
      logging.info('%s', epoch_line(record, config.num_epochs))
      if stopping and not last:
        break
  ckpt.close()
  for writer in writers:
    writer.close()

  wall = time.perf_counter() - wall_start
  finished = position.epoch == config.num_epochs and position.batches_done == spe
  if preemption.signal_received and not finished:
    step = int(jax.device_get(state.step))
    print(
      f'method={method}: stopped by SIGTERM and saved at step {step} (epoch {position.epoch}, '
      f'batch {position.batches_done} of {spe}); rerun the same command to continue.',
      flush=True,
    )
    return {'preempted': step}
  if not record:
    print(f'method={method}: all {config.num_epochs} epochs were already done in {workdir}.')
    return record
  summary = (
    f'method={method} epochs={config.num_epochs} '
    f'test/accuracy={record.get("test/accuracy", float("nan")):.4f} '
  )
  for prefix in ('test_ema', 'test_model_ema', 'train_eval'):
    if f'{prefix}/accuracy' in record:
      summary += f'{prefix}/accuracy={record[f"{prefix}/accuracy"]:.4f} '
  summary += f'images/s={record["train/images_per_sec"]:.0f} wall={wall:.1f}s'
  print(summary, flush=True)
  return record

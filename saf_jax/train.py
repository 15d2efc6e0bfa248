"""The training loop: Algorithm 1 of Du et al. 2022 for every method, with its side effects.

``train_and_evaluate`` trains ``config.method.name`` (SAF, MESA, the SAM family or plain
SGD/AdamW, all with the same base optimizer, init, data order and schedule, so that runs of
any two methods with one seed are directly comparable), evaluates, writes metrics and
checkpoints, and resumes. Its parts: ``_prepare`` (checks, data, the ``Experiment``),
``_Run.restore``, ``_Run.train_epoch`` (``run_steps``), ``_Run.end_epoch`` (sharpness,
evaluation, metrics, checkpoint) and ``_report``. Steps, losses, transforms and models are
pure; the resume position and SIGTERM handling are in ``saf_jax.resume``.
"""

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from saf_jax import (
  checkpoint,
  device_input,
  dispatch,
  evaluation,
  experiment,
  guard,
  logit_table,
  loop,
  metrics,
  resume,
  train_state,
)

# The inner loop, where the benchmark and the tests call it too.
run_steps, epoch_source = loop.run_steps, loop.epoch_source

# How a call of train_and_evaluate ended (RunResult.status).
FINISHED, PREEMPTED, ALREADY_DONE = 'finished', 'preempted', 'already_done'


@dataclasses.dataclass(frozen=True)
class RunResult:
  """What ``train_and_evaluate`` returns, however the call ended.

  Attributes:
    status: ``FINISHED`` (the last epoch is done), ``PREEMPTED`` (stopped by SIGTERM and
      saved; rerun to continue) or ``ALREADY_DONE`` (the workdir held a finished run).
    step: the train state's step at return.
    epoch: the epoch training stopped in or finished (1-based; for ``ALREADY_DONE`` the
      epoch after the last one).
    batches_done: the global batches of ``epoch`` trained.
    record: the last epoch record this call wrote (the last line of ``metrics.jsonl``);
      empty if it wrote none.
    wall_seconds: the call's wall time, data loading and compilation included.
  """

  status: str
  step: int
  epoch: int
  batches_done: int
  record: dict[str, Any]
  wall_seconds: float


def _check_finite(step_metrics: list[dict[str, np.ndarray]], first_step: int) -> None:
  for i, m in enumerate(step_metrics):
    bad = [k for k, v in m.items() if not np.all(np.isfinite(v))]
    if bad:
      raise FloatingPointError(
        f'Non-finite {bad} at step {first_step + i}; training stopped. The last good '
        'checkpoint in the workdir is untouched.'
      )


def _nonfinite_leaves(state: train_state.TrainState, finite: Callable) -> list[str]:
  """The paths of ``state``'s float leaves that hold a NaN or an inf (``finite``: the
  compiled per-leaf check, replicated)."""
  leaves = jax.tree_util.tree_leaves_with_path(state)
  leaves = [(p, x) for p, x in leaves if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
  flags = jax.device_get(finite([x for _, x in leaves]))
  return [
    jax.tree_util.keystr(p, simple=True, separator='/')
    for (p, _), ok in zip(leaves, flags, strict=True)
    if not ok
  ]


def _prepare(config: ml_collections.ConfigDict, workdir: str, stack: contextlib.ExitStack):
  """Every check that can refuse the run, the data and the ``Experiment``; takes the
  workdir's lock (held until ``stack`` closes) and writes nothing else."""
  # Imported here so that the rest of this module (run_steps) works without TensorFlow,
  # e.g. with another data loader or in `benchmark --synthetic`.
  from saf_jax import data, validation

  validation.validate_config(
    config, num_devices=jax.device_count(), num_processes=jax.process_count()
  )
  guard.check_writable(workdir)
  stack.enter_context(guard.lock(workdir))
  guard.check_config(config, workdir)
  datasets = data.create_datasets(config.input, seed=config.seed, process_count=jax.process_count())
  guard.check_dataset(workdir, datasets.info)
  exp = experiment.create(config, datasets.info, recorded_table=checkpoint.table_placement(workdir))
  logging.info('Mesh %s over %d devices.', dict(exp.mesh.shape), exp.mesh.size)
  probe = evaluation.sharpness_probe(exp, datasets)
  exp.check_table()
  return exp, datasets, probe


@dataclasses.dataclass
class _Run:
  """One call's training: the experiment, its data, and what changes as training goes."""

  exp: experiment.Experiment
  datasets: Any
  workdir: str
  sharpness_probe: Callable | None
  ckpt: checkpoint.Checkpointer = None
  table: logit_table.LogitTable | dispatch.TableOnDevice | None = None
  train_set: Any = None  # The device_input.DeviceTrainSet, with the data on the devices.
  preemption: resume.Preemption = None
  state: train_state.TrainState | None = None
  position: resume.Position = dataclasses.field(default_factory=resume.Position)
  writers: list = dataclasses.field(default_factory=list)
  best: dict = dataclasses.field(default_factory=dict)  # metrics.add_best's running best.

  def __post_init__(self):
    self.evaluate = evaluation.evaluator(self.exp, self.datasets)
    self.preemption = resume.Preemption(steps_per_check=self.exp.steps_per_dispatch)
    self._finite = jax.jit(
      lambda leaves: [jax.numpy.all(jax.numpy.isfinite(x)) for x in leaves],
      out_shardings=self.exp.replicated_sharding,
    )
    if self.exp.data_on_device:
      self.train_set = device_input.place(self.datasets, self.exp.replicated_sharding)

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.exp.config

  @property
  def step(self) -> int:
    return int(jax.device_get(self.state.step))

  def restore(self) -> None:
    """Checks the resume, restores or creates the state, table and position; opens writers."""
    exp, workdir = self.exp, self.workdir
    self.ckpt = checkpoint.Checkpointer(
      workdir,
      max_to_keep=self.config.checkpoint.max_to_keep,
      with_table=exp.method.saf,
      table_on_device=exp.placement.table == 'device',
      remove_unfinished=True,
      num_train=exp.info.num_train,  # A host table saved by another process count: gathered.
    )
    newest = self.ckpt.latest_state_step()
    if newest is not None:  # Before any per-process lookup: every process refuses alike.
      resume.check_resume(
        self.ckpt.meta(newest),
        workdir,
        per_device=exp.per_device,
        num_devices=exp.mesh.size,
      )
    latest = self.ckpt.latest_step()
    if latest is not None and latest != newest:  # Resuming an older one: check it too.
      resume.check_resume(
        self.ckpt.meta(latest), workdir, per_device=exp.per_device, num_devices=exp.mesh.size
      )
    self.table = exp.new_table(workdir)  # A memory-mapped table's files are scratch, refilled.
    if self.table is not None:
      where = 'the devices, in all' if exp.placement.table == 'device' else 'this process'
      logging.info('SAF logit table on %s: %.2f MiB.', where, self.table.nbytes / 2**20)
    if latest is None:
      self.state = exp.init_state()
    else:
      table_arrays = None
      if isinstance(self.table, dispatch.TableOnDevice):
        table_arrays = self.table.abstract()
      elif self.table is not None:
        table_arrays = self.table.state_dict()
      self.state, table_arrays, meta = self.ckpt.restore(latest, exp.abstract_state, table_arrays)
      if self.table is not None:
        self.table.load_state_dict(table_arrays)
      self.position = resume.Position.after(meta, exp.steps_per_epoch)
      batches_done = meta.get('batches_done', exp.steps_per_epoch)
      logging.info(
        'Resumed at step %d (epoch %d, batch %d).', meta['step'], meta['epoch'], batches_done
      )
    done_epochs = self.position.epoch - 1
    self.best = metrics.best_of(metrics.read_records(workdir, up_to_epoch=done_epochs))
    if jax.process_index() == 0:  # One writer of the shared workdir's files.
      guard.write_config(self.config, workdir, exp.info)
      self.writers = [
        metrics.JsonlWriter(workdir, keep_epochs_up_to=done_epochs),
        metrics.TensorBoardWriter(workdir, keep_steps_up_to=done_epochs * exp.steps_per_epoch),
      ]

  def save(self) -> None:
    """Saves a checkpoint of the state, the table and the position, if the state is finite.

    Raises:
      FloatingPointError: if a leaf of the state (params, batch_stats, opt_state, an EMA)
        holds a NaN or an inf: nothing is saved, so rotation never deletes the newest
        finite checkpoint for a non-finite one.
    """
    start, step = time.perf_counter(), self.step
    bad = _nonfinite_leaves(self.state, self._finite)
    if bad:
      shown = ', '.join(bad[:3]) + (f' and {len(bad) - 3} more' if len(bad) > 3 else '')
      raise FloatingPointError(
        f'Non-finite state at step {step}; training stopped without saving it ({shown} hold '
        'a NaN or inf). The checkpoints already in the workdir are as they were.'
      )
    meta = self.position.to_meta(
      step=step, steps_per_epoch=self.exp.steps_per_epoch, num_devices=self.exp.mesh.size
    )
    if self.table is not None:
      meta['table_placement'] = self.exp.placement.table
    self.ckpt.save(step, self.state, self.table.state_dict() if self.table else None, meta)
    logging.info('Checkpoint at step %d: %.1f s.', step, time.perf_counter() - start)

  def train_epoch(self, epoch: int) -> bool:
    """Trains the rest of ``epoch``, saving every ``checkpoint.every_steps`` steps.

    Returns:
      Whether the epoch is complete (False: SIGTERM stopped it, and it was saved).
    """
    exp, spe = self.exp, self.exp.steps_per_epoch
    if self.position.epoch != epoch:
      self.position = resume.Position(epoch)
    position, every_steps = self.position, self.config.checkpoint.every_steps
    source = loop.epoch_source(
      exp, self.datasets, self.train_set, epoch, start_batch=position.batches_done
    )
    while position.batches_done < spe:
      step = self.step
      num_steps = spe - position.batches_done
      if every_steps:
        num_steps = min(num_steps, every_steps - step % every_steps)
      self.state, step_metrics, seconds = loop.run_steps(
        exp,
        self.state,
        source,
        epoch=epoch,
        table=self.table,
        num_steps=num_steps,
        desc=f'{exp.method.name} epoch {epoch}/{self.config.num_epochs}',
        stop=self.preemption.requested,
      )
      _check_finite(step_metrics, first_step=step + 1)
      position.metrics += step_metrics
      position.batches_done += len(step_metrics)
      position.seconds += seconds
      at_period = every_steps and (step + len(step_metrics)) % every_steps == 0
      if position.batches_done < spe and (self.preemption.signal_received or at_period):
        self.save()
      if self.preemption.signal_received:
        break
    return position.batches_done == spe

  def end_epoch(self, epoch: int) -> tuple[dict[str, Any], bool]:
    """The epoch's record (sharpness, evaluation), written; the checkpoint, saved.

    Returns:
      ``(record, stop)``: stop is True when SIGTERM arrived, and training ends here.
    """
    config, position = self.config, self.position
    record = {'epoch': epoch, 'step': self.step}
    for key in position.metrics[0]:
      record[f'train/{key}'] = float(np.mean([m[key] for m in position.metrics]))
    record['train/trajectory_active'] = int(self.exp.trajectory_active(epoch))
    num_images = len(position.metrics) * config.input.batch_size
    record['train/images_per_sec'] = num_images / position.seconds
    record['train/epoch_time_sec'] = position.seconds
    last = epoch == config.num_epochs
    every = config.analysis.sharpness_every_epochs
    if self.sharpness_probe is not None and (last or epoch % every == 0):
      record.update(self.sharpness_probe(self.state))
    eval_start = time.perf_counter()
    if last or epoch % config.eval.every_epochs == 0:
      record.update(self.evaluate(self.state))
      metrics.add_best(record, self.best)
    record['eval_time_sec'] = time.perf_counter() - eval_start
    # Metrics first: a resumed run drops records past its checkpoint, never misses one.
    for writer in self.writers:
      writer.write(record)
    stopping = self.preemption.signal_received  # Read once: it may turn True at any moment.
    if last or epoch % config.checkpoint.every_epochs == 0 or stopping:
      self.save()
    logging.info('%s', epoch_line(record, config.num_epochs))
    return record, stopping and not last

  def close(self) -> None:
    if self.ckpt is not None:
      self.ckpt.close()
    for writer in self.writers:
      writer.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
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
    A ``RunResult``: how the call ended, and the last epoch's metrics record.

  Raises:
    ValueError: an invalid config field; a workdir that is not writable, is in use by
      another run (``guard.lock``), holds an incompatible run or one on a dataset of
      another shape; raised before any compilation and before anything is written.
    checkpoint.CheckpointError: the latest checkpoint's files are missing or damaged, or
      a save failed (e.g. a full disk; its temporary files removed).
    DataNotFoundError: when the dataset is neither prepared nor obtainable.
    FloatingPointError: on a non-finite loss or gradient, or a non-finite leaf of the
      state to be saved (names the step); the last checkpoint saved before it, finite, is
      kept as it was.
  """
  with contextlib.ExitStack() as stack:
    return _train_and_evaluate(config, workdir, stack, time.perf_counter())


def _train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, stack: contextlib.ExitStack, wall_start: float
) -> RunResult:
  """``train_and_evaluate``'s body, with the workdir's lock held until ``stack`` closes."""
  exp, datasets, probe = _prepare(config, workdir, stack)
  run = _Run(exp, datasets, workdir, probe)
  stack.callback(run.close)  # On any exit: Orbax's manager and the writers, then the lock.
  run.restore()
  record: dict[str, Any] = {}
  with run.preemption:
    for epoch in range(run.position.epoch, config.num_epochs + 1):
      if not run.train_epoch(epoch):
        break
      record, stop = run.end_epoch(epoch)
      if stop:
        break
  position = run.position
  finished = position.epoch == config.num_epochs and position.batches_done == exp.steps_per_epoch
  if run.preemption.signal_received and not finished:
    status = PREEMPTED
  else:
    status = FINISHED if record else ALREADY_DONE
  result = RunResult(
    status=status,
    step=run.step,
    epoch=position.epoch,
    batches_done=position.batches_done,
    record=record,
    wall_seconds=time.perf_counter() - wall_start,
  )
  print(_report(result, exp, workdir), flush=True)
  return result


def _report(result: RunResult, exp: experiment.Experiment, workdir: str) -> str:
  """The run's last console line: its summary, or why it stopped."""
  method, num_epochs = exp.method.name, exp.config.num_epochs
  if result.status == PREEMPTED:
    return (
      f'method={method}: stopped by SIGTERM and saved at step {result.step} (epoch '
      f'{result.epoch}, batch {result.batches_done} of {exp.steps_per_epoch}); rerun the same '
      'command to continue.'
    )
  if result.status == ALREADY_DONE:
    return f'method={method}: all {num_epochs} epochs were already done in {workdir}.'
  record = result.record
  summary = f'method={method} epochs={num_epochs} '
  for prefix in ('test', 'test_ema', 'test_model_ema', 'train_eval'):
    if f'{prefix}/accuracy' in record or prefix == 'test':
      summary += f'{prefix}/accuracy={record.get(f"{prefix}/accuracy", float("nan")):.4f} '
    if f'{prefix}/best_accuracy' in record:  # The authors' protocol: the best epoch's.
      best, epoch = record[f'{prefix}/best_accuracy'], record[f'{prefix}/best_epoch']
      summary += f'{prefix}/best_accuracy={best:.4f} (epoch {epoch}) '
  return summary + f'images/s={record["train/images_per_sec"]:.0f} wall={result.wall_seconds:.1f}s'


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

"""Where a run continues: the position saved with each checkpoint, and SIGTERM handling.

A checkpoint's ``meta`` (``Position.to_meta``) says how far training got: the epoch, the
batches of it already trained, and their per-step metrics and time, so that a run resumed
mid-epoch writes the same epoch record as one that never stopped. ``check_resume`` refuses
a resume whose saved position does not carry over to this run's devices and processes;
``Preemption`` turns SIGTERM into "save after this step and stop".
"""

import dataclasses
import signal
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


class Preemption:
  """Turns SIGTERM into a request to save and stop after the current step.

  With one process the request is this process's signal. With several, every process
  must stop at the same step (saving is collective): JAX's preemption sync point, which
  ``jax.distributed`` arms for SIGTERM, decides the step for all of them. Use it as a
  context manager; the previous SIGTERM handler is restored on exit.
  """

  def __init__(self, steps_per_check: int = 1):
    """``steps_per_check``: the steps between two calls of :meth:`requested`
    (``config.steps_per_dispatch``): JAX's sync point counts calls, one per step id."""
    self.signal_received = False
    self.steps_per_check = steps_per_check
    self._previous = None

  def __enter__(self) -> 'Preemption':
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
    """Whether to stop after ``step`` (the number of steps taken); collective if multi-host."""
    if jax.process_count() == 1:
      return self.signal_received
    try:
      # Every process asks after the same steps, one multiple of steps_per_check apart:
      # the sync point must see consecutive ids, or it is never reached.
      check = step // self.steps_per_check
      self.signal_received = multihost_utils.reached_preemption_sync_point(check)
    except RuntimeError:  # The preemption service is off: only SIGKILL-safe checkpoints.
      self.signal_received = False
    return self.signal_received


@dataclasses.dataclass
class Position:
  """Where training continues: ``batches_done`` batches of ``epoch`` are already trained.

  Attributes:
    epoch: the epoch in progress (1-based).
    batches_done: its global batches already trained, in [0, steps_per_epoch].
    metrics: those batches' per-step train metrics (float32 scalars).
    seconds: their training time, in seconds.
  """

  epoch: int = 1
  batches_done: int = 0
  metrics: list[dict[str, np.float32]] = dataclasses.field(default_factory=list)
  seconds: float = 0.0

  @classmethod
  def after(cls, meta: dict[str, Any], steps_per_epoch: int) -> 'Position':
    """The position following a checkpoint whose meta is ``meta``."""
    # Checkpoints that predate mid-epoch saves hold epoch ends only, without the field.
    if meta.get('batches_done', steps_per_epoch) >= steps_per_epoch:
      return cls(epoch=meta['epoch'] + 1)
    metrics = [{k: np.float32(v) for k, v in m.items()} for m in meta['epoch_metrics']]
    return cls(meta['epoch'], meta['batches_done'], metrics, meta['epoch_seconds'])

  def to_meta(self, *, step: int, steps_per_epoch: int, num_devices: int) -> dict[str, Any]:
    """The JSON-serialisable meta saved with a checkpoint at ``step``."""
    return {
      'epoch': self.epoch,
      'batches_done': self.batches_done,
      'step': step,
      'steps_per_epoch': steps_per_epoch,
      'num_devices': num_devices,
      'num_processes': jax.process_count(),
      # float32 metrics convert to Python floats exactly and back with np.float32.
      'epoch_metrics': [{k: float(v) for k, v in m.items()} for m in self.metrics],
      'epoch_seconds': self.seconds,
    }


def saved_mid_epoch(meta: dict[str, Any]) -> bool:
  """Whether a checkpoint whose meta is ``meta`` was saved before its epoch's end."""
  # Checkpoints that predate mid-epoch saves hold epoch ends only, without the fields.
  return meta.get('batches_done', 0) < meta.get('steps_per_epoch', 0)


def check_resume(meta: dict[str, Any], workdir: str, *, per_device: bool, num_devices: int) -> None:
  """Refuses to resume where the saved position does not carry over.

  A checkpoint saved at an epoch's end resumes on any number of processes, SAF's table on
  the host too (``saf_jax.table_files`` gathers each process's new block of rows from the
  saving processes' files). A mid-epoch one resumes on the same number only: the batches
  already trained are those of the saving processes' partitions of the training set.

  Args:
    meta: the newest checkpoint's meta (``Position.to_meta``).
    workdir: the run's workdir, for the message.
    per_device: whether the SAM-family perturbation is per device.
    num_devices: this run's mesh size.

  Raises:
    ValueError: a per-device perturbation resumed on another number of devices, or a
      mid-epoch position resumed on another number of processes.
  """
  if per_device and meta['num_devices'] != num_devices:
    # The per-device batch (SAM's m) and BatchNorm's shard statistics depend on it.
    raise ValueError(
      f'config.method.perturbation_scope is per_device, and the checkpoint in {workdir!r} '
      f'was trained on {meta["num_devices"]} devices but this run has {num_devices}: set '
      f'config.mesh.data={meta["num_devices"]} or use a new --workdir.'
    )
  saved_processes = meta.get('num_processes', 1)
  if saved_processes != jax.process_count() and saved_mid_epoch(meta):
    processes = f'{saved_processes} process{"" if saved_processes == 1 else "es"}'
    raise ValueError(
      f'The checkpoint in {workdir!r} (step {meta.get("step")}) was saved in the middle of '
      f'epoch {meta.get("epoch")} (batch {meta.get("batches_done")} of '
      f'{meta.get("steps_per_epoch")}) by {processes}, and which examples the batches of an '
      f'epoch hold depends on the number of processes: resume it with {processes} (this '
      f'run has {jax.process_count()}), or use a new --workdir. A checkpoint saved at the '
      'end of an epoch resumes on any number of processes.'
    )

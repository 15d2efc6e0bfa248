"""All Orbax calls: checkpoints of the train state, SAF's table and the data position.

A workdir holds ``config.json`` (the run's config) and two kinds of checkpoint, both keyed
by the global step and each committed atomically (written to a temporary directory, then
renamed):

* ``checkpoints/<step>/``, written by all processes together through one Orbax
  ``CheckpointManager``: ``state`` (the whole ``TrainState``), ``meta`` (JSON: epoch,
  batches of it done, step, device and process counts, an unfinished epoch's per-step
  metrics, where SAF's table was) and, for a table on the devices, ``saf_table`` (every
  example's rows, saved sharded).
* ``checkpoints_table/process_<p>/<step>/``, SAF with its table on the host only, written
  by process ``p`` alone as ``.npy`` files: its partition's rows and written epochs.

A host table is saved before the state, so a step with a ``state`` has every process's
table too; :meth:`Checkpointer.latest_step` returns the newest complete step, and refuses
it if a process's table of it is missing or damaged (no older step: its resumption would
save over it). A device table is committed with the state, in the same checkpoint.

Each save ends with a manifest (``saf_jax.manifest``), checked before a restore reads
anything; then old checkpoints are rotated out. A step committed without the manifest its
meta promises is an unfinished save: the training run moves it to ``checkpoints_unfinished/``
(and starts afresh if none is left), readers skip it (:func:`complete_steps`). A refused
save (disk full) removes its files. What one process alone reads or writes (a host table, its
step) is followed by ``guard.raise_together``: if it fails, every process raises, and none
is left waiting in a collective.

There is no random-number state to save: data order and augmentation derive from (seed,
epoch, process) and each step's randomness from (seed, step), so resuming at any saved
step continues the run exactly as if it had not stopped.

Before anything is written, ``saf_jax.guard.check_config`` compares the workdir's stored
config with the new one and refuses a mismatch in any field that changes the training
trajectory, so another run's checkpoint is never resumed or overwritten by mistake.

What reads the files without an Orbax manager (the steps, ``saved_table``,
``table_placement``, ``CheckpointError``) is in ``saf_jax.checkpoint_files``, named here too.
"""

import os
import shutil
import time
from functools import partial
from typing import Any

import flax.struct
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from saf_jax import checkpoint_files, guard, manifest, table_files, train_state
from saf_jax.checkpoint_files import CheckpointError as CheckpointError
from saf_jax.checkpoint_files import complete_steps as complete_steps
from saf_jax.checkpoint_files import saved_steps as saved_steps
from saf_jax.checkpoint_files import saved_table as saved_table
from saf_jax.checkpoint_files import table_placement as table_placement

_PROMISE = checkpoint_files.PROMISE  # The file of a step that promises its manifest.
_step_dir, _unreadable = checkpoint_files.step_dir, checkpoint_files.unreadable


@flax.struct.dataclass
class _StateWithoutModelEma:
  """``TrainState`` as saved before the model EMA existed, and whenever it is off.

  Orbax records every field, None ones too, as a key of the saved tree. Saving a state
  without a model EMA in this shape keeps such checkpoints readable by, and identical to,
  those of earlier versions.
  """

  step: Any
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any = None
  ema_batch_stats: Any = None


_WITHOUT_MODEL_EMA = ('step', 'params', 'batch_stats', 'opt_state', 'ema_params', 'ema_batch_stats')


def _to_disk(state: Any) -> Any:
  """The tree saved for ``state``: a ``TrainState`` without the model EMA's keys when it has
  none; any other pytree as it is."""
  if (
    isinstance(state, train_state.TrainState)
    and state.model_ema_params is None
    and state.model_ema_batch_stats is None
  ):
    return _StateWithoutModelEma(**{f: getattr(state, f) for f in _WITHOUT_MODEL_EMA})
  return state


def _from_disk(restored: Any) -> Any:
  if isinstance(restored, _StateWithoutModelEma):
    return train_state.TrainState(**{f: getattr(restored, f) for f in _WITHOUT_MODEL_EMA})
  return restored


def saved_epochs(workdir: str) -> dict[int, int]:
  """``{epoch: step}`` of the checkpoints saved at the end of an epoch, read-only.

  Mid-epoch checkpoints (``config.checkpoint.every_steps``, SIGTERM) are left out, and so
  are unfinished saves (:func:`complete_steps`).
  """
  steps = complete_steps(workdir)
  if not steps:
    return {}
  manager = _manager(os.path.join(workdir, 'checkpoints'), None, read_only=True, create=False)
  try:
    epochs = {}
    for step in steps:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      if meta.get('batches_done', 1) >= meta.get('steps_per_epoch', 1):
        epochs[meta['epoch']] = step
    return epochs
  finally:
    manager.close()


# Seconds to wait after a failed read for Orbax's other reads to end (see restore).
_SETTLE_SECONDS = 1.0

# Words in Orbax/TensorStore errors about missing or damaged files (not a tree mismatch).
_DAMAGED = ('NOT_FOUND', 'DATA_LOSS', 'not found', 'No such file', 'corrupt', 'Unable to ')


def _looks_damaged(error: Exception) -> bool:
  return isinstance(error, OSError) or any(word in str(error) for word in _DAMAGED)


def _together(error: Exception | None, what: str, wrap=CheckpointError) -> None:
  """``guard.raise_together``: this process's ``error`` if it has one, on the others
  ``wrap(the error naming the failed process)``. Collective if multi-process."""
  try:
    guard.raise_together(error, what)
  except ValueError as e:
    if e is error:
      raise
    raise wrap(e) from e


def _manager(directory: str, max_to_keep: int | None, **options) -> ocp.CheckpointManager:
  options = {'create': True, **options}
  return ocp.CheckpointManager(
    os.path.abspath(directory),
    options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, **options),
  )


class Checkpointer:
  """The checkpoints of one workdir: the train state and a device SAF table (Orbax), or a host
  table's files of this process.

  Attributes:
    workdir: the run's directory.
  """

  def __init__(
    self,
    workdir: str,
    *,
    max_to_keep: int,
    with_table: bool = False,
    table_on_device: bool = False,
    remove_unfinished: bool = False,
    num_train: int | None = None,
  ):
    """Opens (creating if needed) the checkpoint directories of ``workdir``.

    Args:
      workdir: the run's directory.
      max_to_keep: complete checkpoints kept; older ones are deleted after each save.
      with_table: whether this run has a SAF table on the host (then each process keeps
        its own files).
      table_on_device: whether this run has a SAF table on the devices (then it is an
        Orbax item of each checkpoint).
      remove_unfinished: delete the temporary directories of saves cut short by a kill,
        move unfinished saves aside (for the training run itself; a reader such as
        ``analyze`` must not, since the run may be saving at that moment); if all are,
        the run starts afresh (``manifest.move_aside_unfinished``).
      num_train: the training examples; given, a host table saved by another number of
        processes is restored too (``table_files.TableFiles``).
    """
    self.workdir = workdir
    if remove_unfinished:
      root = os.path.join(workdir, 'checkpoints')
      manifest.move_aside_unfinished(root, _PROMISE, f'{root}_unfinished')
    self._max_to_keep = max_to_keep
    self._verified = set()  # Steps checked against their manifest.
    manifest.quiet_abandoned_writes()  # After a failed write: one error, not 40 tracebacks.
    self._state = _manager(
      os.path.join(workdir, 'checkpoints'),
      None,  # Rotation is ours, once the new checkpoint is complete (_rotate).
      cleanup_tmp_directories=remove_unfinished,
      # Save in this thread: a full disk raises here, once, not in Orbax's threads.
      enable_async_checkpointing=False,
    )
    self._table = None
    if with_table and not table_on_device:
      self._table = table_files.TableFiles(workdir, num_train=num_train)
    self._table_item = table_on_device

  def _steps(self) -> list[int]:
    """The complete steps (an unfinished save is skipped: see :func:`complete_steps`)."""
    steps = self._state.all_steps()
    return [s for s in steps if not manifest.unfinished(_step_dir(self.workdir, s), _PROMISE)]

  def latest_state_step(self) -> int | None:
    """The newest complete state checkpoint (shared by all processes), table or not."""
    return max(self._steps(), default=None)

  def latest_step(self) -> int | None:
    """The newest step whose state, and (SAF) every process's table, were committed.

    Raises:
      CheckpointError: on every process (collective if multi-process), if the newest state
        checkpoint has no complete SAF table for a process (its files missing or damaged:
        tables are saved before the state), naming the step and the file; there is no
        fallback to an older step, whose resumption would save over the newer one.
    """
    steps = self._steps()
    error = None
    if self._table is not None:
      try:
        self._check_table(max(steps, default=None))
      except CheckpointError as e:
        error = e
      _together(error, 'find its SAF table of the newest checkpoint')
    local = max(steps, default=-1)
    if jax.process_count() > 1:
      # Each process checked its table of its newest step (above); they must see the same.
      everyone = multihost_utils.process_allgather(np.asarray(local))
      local = int(np.min(everyone))
      if local >= 0 and not bool(
        np.all(multihost_utils.process_allgather(np.asarray(local in steps)))
      ):
        raise CheckpointError(
          f'The processes of this run hold no common complete checkpoint at step {local} '
          f'in {self.workdir!r}: they see different checkpoints (checkpoints need a '
          'filesystem shared by all processes).'
        )
    return None if local < 0 else local

  def _check_table(self, step: int | None) -> None:
    """Raises a CheckpointError if this process has no complete SAF table of ``step``."""
    if step is None or (problem := self._table.problem(step)) is None:
      return
    steps, p = self._steps(), jax.process_index()
    if not set(steps) & set(self._table.steps()):  # Never start afresh over their states.
      raise CheckpointError(
        f'The checkpoints at steps {sorted(steps)} in {self.workdir!r} have no SAF table under '
        f'checkpoints_table/process_{p} (saved by an older saf_jax, or the table files were '
        'removed); use a new --workdir.'
      )
    raise CheckpointError(
      f'The checkpoint of step {step} in {self.workdir!r} has no SAF table that process {p} '
      f'can restore: {problem}. Nothing was changed. Move checkpoints/{step} (and '
      f'checkpoints_table/*/{step}) aside to resume from the previous checkpoint, or use a '
      'new --workdir.'
    )

  def save(
    self,
    step: int,
    state: Any,
    table: dict[str, Any] | None,
    meta: dict[str, Any],
  ) -> None:
    """Saves at ``step``: a host table's files first, then the state (with a device table
    as its ``saf_table`` item), then the manifest; then deletes old checkpoints. Blocks
    until done.

    Args:
      step: the global step, the checkpoint's key (``state.step``).
      state: the ``TrainState``.
      table: SAF's ``LogitTable.state_dict()`` of this process, or a device table's
        global arrays (``dispatch.TableOnDevice.state_dict()``), or None.
      meta: JSON-serialisable position and bookkeeping (see ``train.train_and_evaluate``);
        saved with ``manifest: 1`` added.

    Raises:
      CheckpointError: if the filesystem refuses a write (full, read-only), once this
        save's files are removed (earlier checkpoints stay as they were); on every process
        if one cannot save its host table (collective if multi-process).
    """
    meta = {**meta, manifest.PROMISE_KEY: 1}  # Committed without a manifest: unfinished.
    directory = _step_dir(self.workdir, step)
    table_saved = entered = False
    try:
      if table is not None and self._table is not None:
        error = None
        try:
          self._table.save(step, table)
          table_saved = True
        except Exception as e:  # Raised on every process: none waits in Orbax's save.
          error = e
        _together(error, f'save its SAF table of step {step}')
      items = {'state': ocp.args.StandardSave(_to_disk(state)), 'meta': ocp.args.JsonSave(meta)}
      if table is not None and self._table_item:
        items['saf_table'] = ocp.args.StandardSave(table)
      entered = not os.path.lexists(directory)  # Orbax's commit may be left: removed below.
      if not self._state.save(step, args=ocp.args.Composite(**items)):
        entered = False  # Nothing written (the step, if there, is an earlier save's).
        raise CheckpointError(
          f'Orbax declined to save step {step} in {self.workdir!r}: it holds a checkpoint '
          f'at step {self._state.latest_step()} or later (a table directory under '
          'checkpoints_table/ was removed?); use a new --workdir.'
        )
      manifest.write_shared(directory)
    except Exception as e:
      if jax.process_index() == 0:  # Remove what this save wrote: Orbax's, then the table's.
        committed = entered and not manifest.exists(directory)
        manifest.remove_partial(os.path.join(self.workdir, 'checkpoints'), step, committed)
      if table_saved:
        shutil.rmtree(os.path.join(self._table.directory, str(step)), ignore_errors=True)
      self._state.reload()
      if (refused := manifest.refused_write(e, self.workdir)) is None:
        raise
      previous = max((s for s in self._steps() if s < step), default=None)
      then = 'afresh' if previous is None else f'from step {previous}, whose checkpoint is intact'
      raise CheckpointError(
        f'The checkpoint of step {step} could not be saved: {refused}. Its partial files '
        'were removed; make room (or make the workdir writable) and rerun the same command '
        f'to start {then}.'
      ) from e
    self._verified.add(step)
    self._rotate()

  def _rotate(self) -> None:
    """Deletes the checkpoints older than the newest ``max_to_keep`` complete ones."""
    oldest = self._steps()[-self._max_to_keep :][0]
    for step in [s for s in self._state.all_steps() if s < oldest]:
      self._state.delete(step)
    if self._table is not None:
      self._table.keep_only(self._state.all_steps())

  def meta(self, step: int) -> dict[str, Any]:
    """The ``meta`` item saved at ``step``, alone.

    Raises:
      CheckpointError: if it cannot be read, or the checkpoint's files do not match their
        manifest (all checked first; collective if multi-process).
    """
    self._verify(step)
    try:
      restored = self._state.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for missing or damaged files.
      raise _unreadable(self.workdir, step, e) from e
    return restored.meta

  def _verify(self, step: int) -> None:
    """Checks ``checkpoints/<step>`` against its manifest, once (collective)."""
    if step not in self._verified:
      try:
        manifest.verify_shared(_step_dir(self.workdir, step), promise=_PROMISE)
      except OSError as e:
        raise _unreadable(self.workdir, step, e) from e
      self._verified.add(step)

  def restore(
    self, step: int, abstract_state: Any, abstract_table: dict[str, Any] | None
  ) -> tuple[Any, dict[str, Any] | None, dict[str, Any]]:
    """Restores ``(state, table arrays or None, meta)`` saved at ``step``.

    Args:
      step: a saved step (see :meth:`latest_step`).
      abstract_state: a pytree of ``jax.ShapeDtypeStruct`` (with this run's shardings,
        which may differ from the saving run's: checkpoints hold whole arrays).
      abstract_table: this process's ``LogitTable.state_dict()`` for SAF with a host
        table; a device table's abstract arrays (with shardings); else None.

    Raises:
      ValueError: if the saved arrays do not match the abstract ones (another model or
        table layout).
      CheckpointError: if files of the checkpoint are missing or damaged (checked against
        the manifests before anything is read); on every process if one process's host
        table files are (collective if multi-process).
    """
    self._verify(step)
    table = None
    if abstract_table is not None and self._table is not None:
      table = self._restore_table(step, abstract_table)
    try:
      items = {
        'state': ocp.args.StandardRestore(_to_disk(abstract_state)),
        'meta': ocp.args.JsonRestore(),
      }
      if abstract_table is not None and self._table_item:
        # Rows are padded to a multiple of the devices: on another device count the padding
        # differs. Rows past the examples are never written or read, so pad or drop them.
        items['saf_table'] = ocp.args.StandardRestore(abstract_table, strict=False)
      restored = self._state.restore(step, args=ocp.args.Composite(**items))
      if abstract_table is not None and self._table_item:
        table = restored.saf_table
    except Exception as e:  # Orbax and TensorStore raise many types for damaged files.
      if isinstance(e, (ValueError, TypeError, KeyError)) and not _looks_damaged(e):
        raise  # A structure or shape mismatch: the caller names the config.
      # Orbax leaves the reads of the other arrays running when one fails; their threads
      # then report a closed event loop. Let them finish, so that our error prints last
      # and whole.
      time.sleep(_SETTLE_SECONDS)
      raise _unreadable(self.workdir, step, e) from e
    return _from_disk(restored.state), table, restored.meta

  def _restore_table(self, step: int, abstract: dict[str, Any]) -> dict[str, Any]:
    """This process's host table at ``step`` (``restore``), before the state: if a process
    cannot read its table, every process raises, and none waits in Orbax's restore."""
    table = error = None
    try:
      table = self._table.restore(step, abstract)
    except Exception as e:
      error = e
    mismatch = isinstance(error, (ValueError, TypeError, KeyError)) and not _looks_damaged(error)
    if error is not None and not mismatch:  # A mismatch: raised as it is; the caller says.
      error = _unreadable(self.workdir, step, cause := error)  # A file missing or damaged.
      error.__cause__ = cause
    _together(error, f'read its SAF table of step {step}', partial(_unreadable, self.workdir, step))
    return table

  def close(self) -> None:
    self._state.close()

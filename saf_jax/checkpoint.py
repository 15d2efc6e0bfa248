"""All Orbax calls: checkpoints of the train state, SAF's table and the data position.

A workdir holds ``config.json`` (the run's config) and two kinds of checkpoint, both keyed
by the global step and each committed atomically (written to a temporary directory, then
renamed):

* ``checkpoints/<step>/``, written by all processes together through one Orbax
  ``CheckpointManager``: ``state`` (the whole
  ``TrainState``: step, params, batch_stats, opt_state, MESA's EMA params and stats) and
  ``meta`` (JSON: epoch, batches of that epoch done, step, device and process counts, and
  the per-step train metrics of an unfinished epoch).
* ``checkpoints_table/process_<p>/<step>/``, SAF only, written by process ``p`` alone as
  ``.npy`` files: the rows of its partition of the logit table with their written epochs.

The table is saved before the state, so a step with a ``state`` has every process's table
too; :meth:`Checkpointer.latest_step` returns the newest step that is complete for every
process. There is no random-number state to save: data order and augmentation derive from
(seed, epoch, process) and each step's randomness from (seed, step), so resuming at any
saved step continues the run exactly as if it had not stopped.

Before anything is written, :func:`check_workdir` compares the workdir's stored config
with the new one and refuses a mismatch in any field that changes the training
trajectory, so another run's checkpoint is never resumed or overwritten by mistake.
"""

import json
import os
import shutil
import time
from typing import Any

import flax.struct
import jax
import ml_collections
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from saf_jax import config_upgrade, train_state

# Fields that may differ between a run and its resumption (they do not change training).
_RESUME_FREE = (
  'log_every_steps',
  'input.data_dir',
  'input.prefetch',
  'input.eval_batch_size',
  'input.num_test_examples',
  'eval.every_epochs',
  'eval.train_accuracy',
  'checkpoint',
  'mesh',
  'analysis',
  'distributed',
  'method.saf.table_memmap',
)


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


def _flatten(d: dict, prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in d.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{name}.'))
    else:
      flat[name] = value
  return flat


def _trajectory_fields(config_dict: dict) -> dict[str, Any]:
  flat = _flatten(config_upgrade.upgrade_config(config_dict))
  return {
    k: v for k, v in flat.items() if not any(k == f or k.startswith(f + '.') for f in _RESUME_FREE)
  }


def config_path(workdir: str) -> str:
  return os.path.join(workdir, 'config.json')


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir that holds a run with a different training config.

  Args:
    config: the new run's config.
    workdir: the directory the run will write to (may not exist yet).

  A ``config.json`` of an earlier version is upgraded first
  (``config_upgrade.upgrade_config``): a field it lacks has the value its run used.

  Raises:
    ValueError: if ``workdir/config.json`` exists and differs from ``config`` in a field
      that changes the training trajectory (dataset and its size, number of classes,
      model, optimizer, method, E_tilde, seed, epochs, batch size, ...), or if the workdir
      holds checkpoints but no ``config.json``. The message lists each differing field with
      both values. Nothing in the workdir is touched.
  """
  path = config_path(workdir)
  if not os.path.exists(path):
    if saved_steps(workdir):
      raise ValueError(
        f'Workdir {workdir!r} holds checkpoints but no config.json, so it cannot be '
        'checked that they belong to this config; restore config.json or use a new --workdir.'
      )
    return
  with open(path) as f:
    old = _trajectory_fields(json.load(f))
  new = _trajectory_fields(json.loads(config.to_json()))
  diffs = [
    f'  {k}: workdir has {old.get(k, "<missing>")!r}, config has {new.get(k, "<missing>")!r}'
    for k in sorted(set(old) | set(new))
    if old.get(k) != new.get(k)
  ]
  if diffs:
    raise ValueError(
      f'Workdir {workdir!r} holds another run whose config is incompatible with this one '
      f'(its checkpoints cannot be resumed by it); use a new --workdir. Differences:\n'
      + '\n'.join(diffs)
    )


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes ``workdir/config.json`` atomically."""
  path = config_path(workdir)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(config.to_json(indent=2, sort_keys=True))
  os.replace(tmp, path)


def saved_steps(workdir: str) -> list[int]:
  """Steps with a committed ``checkpoints/<step>`` (state and meta), ascending; no Orbax."""
  root = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(root):
    return []
  return sorted(int(name) for name in os.listdir(root) if name.isdigit())


def saved_epochs(workdir: str) -> dict[int, int]:
  """``{epoch: step}`` of the checkpoints saved at the end of an epoch, read-only.

  Mid-epoch checkpoints (``config.checkpoint.every_steps``, SIGTERM) are left out.
  """
  steps = saved_steps(workdir)
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


class CheckpointError(ValueError):
  """A checkpoint that exists but cannot be read (incomplete or corrupt files)."""


# Seconds to wait after a failed read for Orbax's other reads to end (see restore).
_SETTLE_SECONDS = 1.0

# Words in Orbax/TensorStore errors about missing or damaged files (not a tree mismatch).
_DAMAGED = ('NOT_FOUND', 'DATA_LOSS', 'not found', 'No such file', 'corrupt', 'Unable to ')


def _looks_damaged(error: Exception) -> bool:
  return isinstance(error, OSError) or any(word in str(error) for word in _DAMAGED)


def _manager(directory: str, max_to_keep: int | None, **options) -> ocp.CheckpointManager:
  options = {'create': True, **options}
  return ocp.CheckpointManager(
    os.path.abspath(directory),
    options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, **options),
  )


class Checkpointer:
  """The checkpoints of one workdir: the train state (Orbax), and this process's SAF table.

  Attributes:
    workdir: the run's directory.
  """

  def __init__(
    self,
    workdir: str,
    *,
    max_to_keep: int,
    with_table: bool = False,
    remove_unfinished: bool = False,
  ):
    """Opens (creating if needed) the checkpoint directories of ``workdir``.

    Args:
      workdir: the run's directory.
      max_to_keep: checkpoints kept; older ones are deleted after each save.
      with_table: whether this run has a SAF table (then each process keeps its own).
      remove_unfinished: delete the temporary directories of saves cut short by a kill
        (for the training run itself; a reader such as ``analyze`` must not, since the
        run may be saving at that moment).
    """
    self.workdir = workdir
    self._state = _manager(
      os.path.join(workdir, 'checkpoints'),
      max_to_keep,
      cleanup_tmp_directories=remove_unfinished,
    )
    self._table = _TableFiles(workdir) if with_table else None

  def latest_state_step(self) -> int | None:
    """The newest committed state checkpoint (shared by all processes), table or not."""
    return self._state.latest_step()

  def latest_step(self) -> int | None:
    """The newest step whose state, and (SAF) every process's table, were committed."""
    state_steps = set(self._state.all_steps())
    steps = state_steps
    if self._table is not None:
      steps = state_steps & set(self._table.steps())
      if state_steps and not steps:  # Never start afresh over another run's checkpoints.
        raise CheckpointError(
          f'The checkpoints at steps {sorted(state_steps)} in {self.workdir!r} have no SAF '
          f'table under checkpoints_table/process_{jax.process_index()} (saved by an older '
          'saf_jax, or the table files were removed); use a new --workdir.'
        )
    local = max(steps, default=-1)
    if jax.process_count() > 1:
      # A process killed between its table and the state has one table step more: agree.
      everyone = multihost_utils.process_allgather(np.asarray(local))
      local = int(np.min(everyone))
      if local >= 0 and not bool(
        np.all(multihost_utils.process_allgather(np.asarray(local in steps)))
      ):
        raise CheckpointError(
          f'The processes of this run hold no common complete checkpoint at step {local} '
          f'in {self.workdir!r}; a table directory under checkpoints_table/ is damaged.'
        )
    return None if local < 0 else local

  def save(
    self,
    step: int,
    state: Any,
    table: dict[str, np.ndarray] | None,
    meta: dict[str, Any],
  ) -> None:
    """Saves at ``step``: this process's table first, then the state; blocks until committed.

    Args:
      step: the global step, the checkpoint's key (``state.step``).
      state: the ``TrainState``.
      table: SAF's ``LogitTable.state_dict()`` of this process, or None.
      meta: JSON-serialisable position and bookkeeping (see ``train.train_and_evaluate``).
    """
    if table is not None:
      self._table.save(step, table)
    items = {'state': ocp.args.StandardSave(_to_disk(state)), 'meta': ocp.args.JsonSave(meta)}
    if not self._state.save(step, args=ocp.args.Composite(**items)):
      raise CheckpointError(
        f'Orbax declined to save step {step} in {self.workdir!r}: it holds a checkpoint at '
        f'step {self._state.latest_step()} or later (a table directory under '
        'checkpoints_table/ was removed?); use a new --workdir.'
      )
    self._state.wait_until_finished()
    if table is not None:
      self._table.keep_only(self._state.all_steps())

  def meta(self, step: int) -> dict[str, Any]:
    """The ``meta`` item saved at ``step``, alone.

    Raises:
      CheckpointError: if it cannot be read.
    """
    try:
      restored = self._state.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for missing or damaged files.
      raise self._unreadable(step, e) from e
    return restored.meta

  def restore(
    self, step: int, abstract_state: Any, abstract_table: dict[str, Any] | None
  ) -> tuple[Any, dict[str, np.ndarray] | None, dict[str, Any]]:
    """Restores ``(state, table arrays or None, meta)`` saved at ``step``.

    Args:
      step: a saved step (see :meth:`latest_step`).
      abstract_state: a pytree of ``jax.ShapeDtypeStruct`` (with this run's shardings,
        which may differ from the saving run's: checkpoints hold whole arrays).
      abstract_table: this process's ``LogitTable.state_dict()`` for SAF, else None.

    Raises:
      ValueError: if the saved arrays do not match the abstract ones (another model or
        table layout).
      CheckpointError: if files of the checkpoint are missing or damaged.
    """
    table = None
    try:
      if abstract_table is not None:
        table = self._table.restore(step, abstract_table)
      restored = self._state.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_to_disk(abstract_state)), meta=ocp.args.JsonRestore()
        ),
      )
    except Exception as e:  # Orbax and TensorStore raise many types for damaged files.
      if isinstance(e, (ValueError, TypeError, KeyError)) and not _looks_damaged(e):
        raise  # A structure or shape mismatch: the caller names the config.
      # Orbax leaves the reads of the other arrays running when one fails; their threads
      # then report a closed event loop. Let them finish, so that our error prints last
      # and whole.
      time.sleep(_SETTLE_SECONDS)
      raise self._unreadable(step, e) from e
    return _from_disk(restored.state), table, restored.meta

  def _unreadable(self, step: int, error: Exception) -> CheckpointError:
    first = '\n'.join(str(error).splitlines()[:2])
    return CheckpointError(
      f'The checkpoint of step {step} in {self.workdir!r} cannot be read '
      f'({type(error).__name__}: {first}). Its files are incomplete or damaged; nothing '
      f'was changed. Move checkpoints/{step} (and checkpoints_table/*/{step}) aside to '
      'resume from the previous checkpoint, or use a new --workdir.'
    )

  def close(self) -> None:
    self._state.close()


# Storage dtypes that .npy has no code for, saved as same-width unsigned integers.
_NPY_VIEWS = {np.dtype(ml_dtypes.bfloat16): np.dtype(np.uint16)}


class _TableFiles:
  """This process's SAF table checkpoints: ``checkpoints_table/process_<p>/<step>/*.npy``.

  Written by one process alone, without any collective (Orbax's managers coordinate all
  processes, and a per-process subset of them raced on its temporary directories in a
  2-process test). Each step is written to a temporary directory and renamed into place,
  so a step directory is always complete; arrays are read back memory-mapped, so a table
  larger than RAM can be restored into a memory-mapped table.
  """

  def __init__(self, workdir: str):
    self.directory = os.path.join(workdir, 'checkpoints_table', f'process_{jax.process_index()}')

  def steps(self) -> list[int]:
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(name) for name in os.listdir(self.directory) if name.isdigit())

  def save(self, step: int, arrays: dict[str, np.ndarray]) -> None:
    final = os.path.join(self.directory, str(step))
    tmp = f'{final}.tmp'
    os.makedirs(self.directory, exist_ok=True)
    stale = [os.path.join(self.directory, n) for n in os.listdir(self.directory)]
    stale = [path for path in stale if path.endswith('.tmp')]  # Left by a kill mid-save.
    if os.path.exists(final):  # Left by a run killed before its state checkpoint landed.
      stale.append(final)
    for path in stale:
      shutil.rmtree(path)
    os.makedirs(tmp)
    for name, array in arrays.items():
      array = np.asarray(array)
      with open(os.path.join(tmp, f'{name}.npy'), 'wb') as f:
        np.save(f, array.view(_NPY_VIEWS.get(array.dtype, array.dtype)))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, final)

  def restore(self, step: int, abstract: dict[str, Any]) -> dict[str, np.ndarray]:
    """Arrays like ``abstract``'s (same keys, shapes and dtypes), memory-mapped from disk.

    Raises:
      ValueError: if the saved keys, shapes or dtypes differ from ``abstract``'s.
      FileNotFoundError: if a file is missing.
    """
    directory = os.path.join(self.directory, str(step))
    saved = sorted(name[:-4] for name in os.listdir(directory) if name.endswith('.npy'))
    if saved != sorted(abstract):
      raise ValueError(
        f'The SAF table saved at step {step} has arrays {saved}; this run needs '
        f'{sorted(abstract)} (another config.method.saf.table_topk or table_dtype).'
      )
    arrays = {}
    for name, like in abstract.items():
      path = os.path.join(directory, f'{name}.npy')
      try:
        array = np.load(path, mmap_mode='r')
      except ValueError as e:  # A truncated file or header: damaged, not another layout.
        raise OSError(f'{path} is damaged: {e}') from e
      want = np.dtype(like.dtype)
      if array.dtype == _NPY_VIEWS.get(want, want):
        array = array.view(want)
      if array.shape != like.shape or array.dtype != want:
        raise ValueError(
          f'The SAF table array {name!r} saved at step {step} is {array.dtype} '
          f'{array.shape}; this run needs {want} {like.shape}.'
        )
      arrays[name] = array
    return arrays

  def keep_only(self, steps) -> None:
    """Deletes the table checkpoints whose state checkpoint Orbax has deleted."""
    for step in set(self.steps()) - set(steps):
      shutil.rmtree(os.path.join(self.directory, str(step)), ignore_errors=True)

"""All Orbax calls: epoch-boundary checkpoints of the train state and SAF's table.

A workdir holds ``config.json`` (the run's config) and ``checkpoints/<epoch>/`` with
three items: ``state`` (the whole ``TrainState``), ``table`` (SAF's ``values`` and
``written_epoch``; empty for other methods) and ``meta`` (epoch and step). Data order
and augmentation derive from (seed, epoch) and the step's randomness from the step, so
resuming at an epoch boundary continues the run as if it had not stopped.

Before anything is written, :func:`check_workdir` compares the workdir's stored config
with the new one and refuses a mismatch in any field that changes the training
trajectory, so another run's checkpoint is never resumed or overwritten by mistake.
"""

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

# Fields that may differ between a run and its resumption (they do not change training).
_RESUME_FREE = (
  'log_every_steps',
  'input.data_dir',
  'input.prefetch',
  'input.eval_batch_size',
  'input.num_test_examples',
  'eval',
  'checkpoint',
  'mesh',
  'analysis',
)


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
  flat = _flatten(config_dict)
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

  Raises:
    ValueError: if ``workdir/config.json`` exists and differs from ``config`` in a field
      that changes the training trajectory (dataset, model, optimizer, method, seed,
      epochs, batch size, ...). The message lists each differing field with both values.
      Nothing in the workdir is touched.
  """
  path = config_path(workdir)
  if not os.path.exists(path):
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


class Checkpointer:
  """One ``ocp.CheckpointManager`` for a workdir, keyed by epoch."""

  def __init__(self, workdir: str, *, max_to_keep: int):
    self._manager = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )

  def latest_epoch(self) -> int | None:
    """The last completed epoch saved, or None."""
    return self._manager.latest_step()

  def save(
    self, epoch: int, state: Any, table: dict[str, np.ndarray] | None, *, num_devices: int
  ) -> None:
    """Saves after ``epoch``; blocks until the checkpoint is committed.

    Args:
      epoch: the epoch just completed (the checkpoint's key).
      state: the ``TrainState``.
      table: SAF's ``LogitTable.state_dict()``; None for methods without a table (Orbax
        refuses an empty item, so there is then no ``table`` item).
      num_devices: devices on the run's 'data' mesh axis, kept in ``meta``.
    """
    meta = {'epoch': epoch, 'step': int(jax.device_get(state.step)), 'num_devices': num_devices}
    items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
    if table:
      items['table'] = ocp.args.StandardSave(table)
    self._manager.save(epoch, args=ocp.args.Composite(**items))
    self._manager.wait_until_finished()

  def meta(self, epoch: int) -> dict[str, Any]:
    """The ``meta`` item (epoch, step, num_devices) saved after ``epoch``, alone."""
    restored = self._manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored.meta

  def restore(
    self, epoch: int, abstract_state: Any, abstract_table: dict[str, Any] | None
  ) -> tuple[Any, dict[str, np.ndarray] | None, dict[str, Any]]:
    """Restores ``(state, table arrays or None, meta)`` saved after ``epoch``.

    Args:
      epoch: a saved epoch (see :meth:`latest_epoch`).
      abstract_state: a pytree of ``jax.ShapeDtypeStruct`` (with shardings) like the state.
      abstract_table: ``{'values': ..., 'written_epoch': ...}`` shapes for SAF, else None.
    """
    items = {
      'state': ocp.args.StandardRestore(abstract_state),
      'meta': ocp.args.JsonRestore(),
    }
    if abstract_table:
      items['table'] = ocp.args.StandardRestore(abstract_table)
    restored = self._manager.restore(epoch, args=ocp.args.Composite(**items))
    table = None
    if abstract_table:
      table = {k: np.asarray(v) for k, v in restored.table.items()}
    return restored.state, table, restored.meta

  def close(self) -> None:
    self._manager.close()

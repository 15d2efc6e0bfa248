"""A workdir's checkpoints read without an Orbax manager: the steps, SAF's table, the errors.

``saf_jax.checkpoint`` writes the checkpoints (its docstring describes them) and makes these
names its own (``checkpoint.saved_table``, ``checkpoint.CheckpointError``, ...). None of
them is collective: any process, or a tool such as ``table_report``, may call them alone.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from saf_jax import manifest, table_files

PROMISE = 'meta/metadata'  # The file of a step that promises its manifest (the meta).


class CheckpointError(ValueError):
  """A checkpoint that exists but cannot be read (incomplete or corrupt files)."""


def step_dir(workdir: str, step: int) -> str:
  return os.path.join(workdir, 'checkpoints', str(step))


def saved_steps(workdir: str) -> list[int]:
  """Steps with a committed ``checkpoints/<step>`` (state and meta), ascending; no Orbax.
  Unfinished saves included (committed, no manifest yet): see :func:`complete_steps`."""
  return manifest.steps(os.path.join(workdir, 'checkpoints'))


def complete_steps(workdir: str) -> list[int]:
  """The :func:`saved_steps` whose save finished, ascending, that runs resume from and tools
  read: not those committed without their manifest yet (being written, or killed first)."""
  return manifest.complete(os.path.join(workdir, 'checkpoints'), PROMISE)


def unreadable(workdir: str, step: int, error: Exception) -> CheckpointError:
  """The error of the checkpoint of ``step``, which ``error`` (its first 2 lines) kept from
  being read, with what to move aside."""
  first = '\n'.join(str(error).splitlines()[:2])
  return CheckpointError(
    f'The checkpoint of step {step} in {workdir!r} cannot be read '
    f'({type(error).__name__}: {first}). Its files are incomplete or damaged; nothing '
    f'was changed. Move checkpoints/{step} (and checkpoints_table/*/{step}) aside to '
    'resume from the previous checkpoint (or to start afresh without one), or use a new '
    '--workdir.'
  )


def table_placement(workdir: str) -> str | None:
  """Where the newest checkpoint of ``workdir`` keeps SAF's table: 'device', 'host' or None.

  Its ``meta`` says; 'host' for one saved before tables could be on the devices. Reads the
  meta file alone (and its manifest): no Orbax manager, so no collective; nothing changes.

  Raises:
    CheckpointError: if the newest checkpoint's meta cannot be read, or its files do not
      match its manifest.
  """
  steps = complete_steps(workdir)
  if not steps:
    return None
  try:
    meta = manifest.read_json(step_dir(workdir, steps[-1]), PROMISE)
    return meta.get('table_placement', 'host')
  except (OSError, ValueError, AttributeError) as e:
    raise unreadable(workdir, steps[-1], e) from e


def saved_table(workdir: str) -> tuple[str, dict[str, np.ndarray]]:
  """The newest saved SAF table of ``workdir``, as NumPy arrays, wherever it was kept.

  Process 0's files under ``checkpoints_table/`` (a host table: that process's rows), or
  the newest checkpoint's ``saf_table`` item (a device table: every example's rows); their
  files are checked against their manifest first.

  Returns:
    ``(where it was read from, {array name: array})``, the arrays of
    ``saf_jax.logit_table.layout`` (bfloat16 logits as bfloat16).

  Raises:
    CheckpointError: if the table's files are missing or damaged.
    ValueError: if the workdir holds no saved SAF table.
  """
  files = table_files.TableFiles(workdir, process_index=0)
  if files.steps():
    step = files.steps()[-1]
    try:
      files.verify(step)
      return os.path.join(files.directory, str(step)), files.load(step)
    except (OSError, ValueError) as e:  # A file missing, cut short or changed.
      raise unreadable(workdir, step, e) from e
  directory = os.path.join(workdir, 'checkpoints')
  if table_placement(workdir) == 'device':
    step = complete_steps(workdir)[-1]
    path = os.path.join(step_dir(workdir, step), 'saf_table')
    if not os.path.isdir(path):
      raise CheckpointError(
        f'The newest checkpoint in {directory!r} keeps its SAF table on the devices, but '
        f'{path!r} is missing.'
      )
    if manifest.exists(step_dir(workdir, step)):
      try:  # Every file's size; the table's CRC-32s.
        names = [n for n in manifest.read(step_dir(workdir, step)) if n.startswith('saf_table/')]
        manifest.verify(step_dir(workdir, step), names)
      except OSError as e:
        raise unreadable(workdir, step, e) from e
    with ocp.StandardCheckpointer() as reader:
      # The saving run's devices may be gone, and the table is for NumPy: read onto a CPU.
      one = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
      tree = reader.metadata(path).item_metadata.tree
      like = {k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one) for k, m in tree.items()}
      restored = reader.restore(path, like)
    return path, {name: np.asarray(jax.device_get(a)) for name, a in restored.items()}
  raise ValueError(
    f'{workdir!r} has no saved SAF table (under checkpoints_table/process_0, or in '
    'checkpoints/ as saf_table).'
  )

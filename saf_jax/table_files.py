"""SAF's host table in a checkpoint: each process's rows as ``.npy`` files of its own.

``saf_jax.checkpoint`` keeps a host ``LogitTable`` here, under
``checkpoints_table/process_<p>/<step>/``, next to Orbax's ``checkpoints/<step>/`` (a table
on the devices is an Orbax item instead).
"""

import json
import os
import shutil
from typing import Any

import jax
import ml_dtypes
import numpy as np

from saf_jax import manifest, resume
from saf_jax.data import partition
from saf_jax.logit_table import rows

# Storage dtypes that .npy has no code for, saved as same-width unsigned integers.
_NPY_VIEWS = {np.dtype(ml_dtypes.bfloat16): np.dtype(np.uint16)}
# The arrays of logits (float32, bfloat16 or uint8 codes; uint16 only as bfloat16's bits).
_LOGIT_ARRAYS = ('values', 'topk_values')


def _steps_in(directory: str) -> list[int]:
  """The committed steps under ``directory``, ascending (none if it is missing)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _read_rows(directory: str, step: int) -> int | str:
  """The rows (axis 1 of ``written_epoch.npy``) saved at ``step`` under ``directory``, or
  what is wrong: the step's directory or that file is missing, or the file is damaged."""
  path = os.path.join(directory, str(step), 'written_epoch.npy')
  if not os.path.isdir(os.path.dirname(path)):
    return f'{os.path.dirname(path)} is missing'
  try:
    shape = np.load(path, mmap_mode='r').shape
  except FileNotFoundError:
    return f'{path} is missing'
  except (OSError, ValueError) as e:
    return f'{path} is damaged ({type(e).__name__}: {e})'
  return int(shape[1]) if len(shape) == 2 else f'{path} is damaged (shape {shape})'


def _saved_rows(directory: str, step: int) -> int | None:
  """:func:`_read_rows`, or None if the file is missing or unreadable."""
  found = _read_rows(directory, step)
  return found if isinstance(found, int) else None


def _saved_meta(workdir: str, step: int) -> dict[str, Any] | None:
  """The meta of the state checkpoint of ``step`` (``resume.Position.to_meta``, read as
  ``saf_jax.checkpoint.table_placement`` does, without Orbax), or None if unreadable."""
  try:
    with open(os.path.join(workdir, 'checkpoints', str(step), 'meta', 'metadata')) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


class TableFiles:
  """This process's SAF table checkpoints: ``checkpoints_table/process_<p>/<step>/*.npy``.

  Written by one process alone, without any collective (Orbax's managers coordinate all
  processes, and a per-process subset of them raced on its temporary directories in a
  2-process test). Each step is written to a temporary directory and renamed into place,
  so a step directory is always complete; arrays are read back memory-mapped, so a table
  larger than RAM can be restored into a memory-mapped table.

  Given ``num_train``, a step saved by another number of processes is restored too (at an
  epoch's end; ``saf_jax.resume.check_resume`` refuses a mid-epoch one): the saving
  processes' blocks ``process_partition(num_train, q, Q)`` partition the ids, so this
  process's block is gathered from their files exactly, and its ids that no saving process
  held (the ``num_train % Q`` last) are never written (:meth:`restore`).

  Attributes:
    directory: this process's ``checkpoints_table/process_<p>``.
    process_index: ``p``.
    process_count: the run's processes, ``P``.
    num_train: the training examples, or None (this process's own files only).
    first_id, num_rows: this process's block of ids (None without ``num_train``).
  """

  def __init__(
    self,
    workdir: str,
    process_index: int | None = None,
    *,
    process_count: int | None = None,
    num_train: int | None = None,
  ):
    """Names the files; creates nothing.

    Args:
      workdir: the run's directory.
      process_index: ``p``; default ``jax.process_index()``.
      process_count: ``P``; default ``jax.process_count()``.
      num_train: the training examples: this process holds the rows of
        ``partition.process_partition(num_train, p, P)``, and steps saved by another
        number of processes count as its own (:meth:`steps`, :meth:`restore`). None: only
        the steps under its own directory.

    Raises:
      ValueError: from ``partition.process_partition`` (``p`` out of range, or fewer
        examples than processes).
    """
    process = jax.process_index() if process_index is None else process_index
    self._root = os.path.join(workdir, 'checkpoints_table')
    self.directory = self._process_dir(process)
    self.process_index = process
    self.process_count = jax.process_count() if process_count is None else process_count
    self.num_train = num_train
    self.first_id = self.num_rows = None
    if num_train is not None:
      block = partition.process_partition(num_train, process, self.process_count)
      self.first_id, self.num_rows = block

  def load(self, step: int) -> dict[str, np.ndarray]:
    """Every array saved at ``step``, as saved (bfloat16 logits as bfloat16), into memory."""
    directory = os.path.join(self.directory, str(step))
    arrays = {}
    for name in sorted(os.listdir(directory)):
      if name.endswith('.npy'):
        array = np.load(os.path.join(directory, name))
        key = name[: -len('.npy')]
        if key in _LOGIT_ARRAYS and array.dtype == np.uint16:  # Saved bfloat16 bits.
          array = array.view(ml_dtypes.bfloat16)
        arrays[key] = array
    return arrays

  def steps(self) -> list[int]:
    """The steps this process can restore, ascending: those under its own directory and,
    with ``num_train``, also those saved by another number of processes whose files are
    complete (:meth:`saved_blocks`); a step whose own directory holds another block and
    whose saving processes' files are incomplete is left out."""
    own = _steps_in(self.directory)
    if self.num_train is None:
      return own
    every = set(own).union(*(_steps_in(self._process_dir(q)) for q in self._process_indices()))
    return sorted(s for s in every if not self._gathers(s) or self._gatherable(s))

  def _gatherable(self, step: int) -> bool:
    """Whether ``step`` can be gathered: complete, and not saved mid-epoch (the data
    position belongs to the saving processes' partition: ``resume.check_resume``)."""
    meta = _saved_meta(os.path.dirname(self._root), step)
    mid_epoch = meta is not None and resume.saved_mid_epoch(meta)
    return not mid_epoch and self.saved_blocks(step) is not None

  def _process_dir(self, process: int) -> str:
    return os.path.join(self._root, f'process_{process}')

  def _process_indices(self) -> list[int]:
    """The ``q`` of every ``process_<q>`` directory, ascending."""
    if not os.path.isdir(self._root):
      return []
    names = [name for name in os.listdir(self._root) if name.startswith('process_')]
    return sorted(int(q) for name in names if (q := name[len('process_') :]).isdigit())

  def _gathers(self, step: int) -> bool:
    """Whether ``step`` is restored from the saving processes' files: with ``num_train``,
    when this process's own directory lacks it or holds another number of rows."""
    if self.num_train is None:
      return False
    if not os.path.isdir(os.path.join(self.directory, str(step))):
      return True
    num_rows = _saved_rows(self.directory, step)
    return num_rows is not None and num_rows != self.num_rows  # Unreadable: restore() says so.

  def problem(self, step: int) -> str | None:
    """Why this process cannot restore ``step`` (None: it can, as far as :meth:`steps`
    tells; :meth:`restore` checks the files against their manifest): its directory is
    missing, or it gathers the step and a saving process's file is missing or damaged
    (named), holds another partition, or the step was saved mid-epoch."""
    if not self._gathers(step):
      directory = os.path.join(self.directory, str(step))
      return None if os.path.isdir(directory) else f'{directory} is missing'
    meta = _saved_meta(os.path.dirname(self._root), step)
    if meta is not None and resume.saved_mid_epoch(meta):
      return (
        f'it was saved in the middle of an epoch by {meta.get("num_processes", 1)} '
        f'processes; this run has {self.process_count}'
      )
    found = self._blocks(step)
    return found if isinstance(found, str) else None

  def saved_blocks(self, step: int) -> list[tuple[int, int]] | None:
    """The id blocks of the ``Q`` processes that saved ``step``, or None if incomplete.

    ``Q`` is the ``num_processes`` of the step's state checkpoint's meta or, without one,
    the number of directories ``process_0``, ``process_1``, ... in a row that hold the
    step. Process ``q`` saved the rows of ``partition.process_partition(num_train, q, Q)``;
    the blocks are complete when ``process_<q>/<step>`` holds that many rows for every
    ``q < Q`` (directories of other processes are another run's, and ignored).

    Returns:
      ``[(first id, rows)]`` of ``process_<q>`` for ``q`` in ``[0, Q)``, or None (also
      without ``num_train``).
    """
    found = self._blocks(step) if self.num_train is not None else None
    return found if isinstance(found, list) else None

  def _blocks(self, step: int) -> list[tuple[int, int]] | str:
    """:meth:`saved_blocks` (``num_train`` given), or why they are incomplete: the file of
    a saving process is missing or damaged, or holds another number of rows."""
    meta = _saved_meta(os.path.dirname(self._root), step)
    count = meta.get('num_processes', 1) if meta is not None else 0
    if meta is None:
      while _saved_rows(self._process_dir(count), step) is not None:
        count += 1
    if count < 1:
      return f'{os.path.join(self._process_dir(0), str(step))} is missing'
    if count > self.num_train:
      return f'it was saved by {count} processes, more than its {self.num_train} examples'
    blocks = [partition.process_partition(self.num_train, q, count) for q in range(count)]
    for q, (_, num_rows) in enumerate(blocks):
      found = _read_rows(self._process_dir(q), step)
      if isinstance(found, str):
        return found
      if found != num_rows:
        return (
          f'{os.path.join(self._process_dir(q), str(step))} holds {found} rows, not the '
          f'{num_rows} of process {q} of {count} (another partition of {self.num_train} ids)'
        )
    return blocks

  def save(self, step: int, arrays: dict[str, np.ndarray]) -> None:
    """Writes ``arrays`` as ``<step>/<name>.npy`` and a ``saf_jax.manifest`` of them.

    Raises:
      OSError: if a file cannot be written (a full disk); the step's temporary directory
        is removed first.
    """
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
    try:
      for name, array in arrays.items():
        array = np.asarray(array)
        with open(os.path.join(tmp, f'{name}.npy'), 'wb') as f:
          np.save(f, array.view(_NPY_VIEWS.get(array.dtype, array.dtype)))
          f.flush()
          os.fsync(f.fileno())
      manifest.write(tmp)  # Sizes and CRC-32s, checked by restore().
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)  # E.g. a full disk: leave no partial save.
      raise
    os.rename(tmp, final)

  def verify(self, step: int) -> None:
    """Checks this process's files of ``step`` against their manifest; a step of an older
    version, without one, is accepted unless the state checkpoint's meta promises one.

    Raises:
      manifest.ManifestError: naming the file missing, cut short or changed.
    """
    directory = os.path.join(self.directory, str(step))
    meta = _saved_meta(os.path.dirname(self._root), step)
    if manifest.exists(directory) or (isinstance(meta, dict) and meta.get('manifest')):
      manifest.verify(directory)

  def restore(self, step: int, abstract: dict[str, Any]) -> dict[str, np.ndarray]:
    """Arrays like ``abstract``'s (same keys, shapes and dtypes), memory-mapped from disk.

    The step's files are checked against their manifest first (one written by this
    version's :meth:`save`; an older version's step, without one, is read unchecked).

    Raises:
      ValueError: if the saved keys, shapes or dtypes differ from ``abstract``'s.
      OSError: if a file is missing, cut short or changed (``manifest.ManifestError``,
        naming it), or the manifest is, though the state checkpoint's meta says the step
        has one.
    """
    if self._gathers(step):  # Saved by another number of processes.
      return self._restore_gathered(step, abstract)
    self.verify(step)
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

  def _restore_gathered(self, step: int, abstract: dict[str, Any]) -> dict[str, rows.RowBlocks]:
    """This process's rows at ``step``, from the files of the processes that saved it.

    Returns:
      ``rows.RowBlocks`` like ``abstract``'s arrays: views of the saving processes'
      memory-mapped arrays, and never-written rows for ids that none of them held.

    Raises:
      FileNotFoundError: if the saving processes' files are incomplete (:meth:`saved_blocks`).
      ValueError, OSError: as :meth:`restore`, for a saving process's files.
    """
    blocks = self.saved_blocks(step)
    if blocks is None:
      raise FileNotFoundError(
        f'The SAF table of step {step} under {self._root!r} is incomplete: the files of '
        'the processes that saved it are missing, or hold another partition of '
        f'{self.num_train} examples.'
      )
    workdir, end = os.path.dirname(self._root), self.first_id + self.num_rows
    saved = []
    for q, (first_id, num_rows) in enumerate(blocks):
      if first_id < end and first_id + num_rows > self.first_id:  # Holds some of our ids.
        block = {
          name: jax.ShapeDtypeStruct((a.shape[0], num_rows, *a.shape[2:]), a.dtype)
          for name, a in abstract.items()
        }
        saved.append((first_id, TableFiles(workdir, q).restore(step, block)))
    return {
      name: rows.select_rows(name, self.first_id, like, [(f, a[name]) for f, a in saved])
      for name, like in abstract.items()
    }

  def keep_only(self, steps) -> None:
    """Deletes the table checkpoints whose state checkpoint Orbax has deleted.

    Called after each save, with the state steps kept (the newest: the one just saved).
    Process 0 also cleans the directories of processes ``q >= P``, left by a run with more
    processes: there a step no longer kept goes, and so does the newest kept step (this
    run's ``P`` processes saved it, so a ``process_<q>`` copy is another run's).
    """
    for step in set(_steps_in(self.directory)) - set(steps):
      shutil.rmtree(os.path.join(self.directory, str(step)), ignore_errors=True)
    if self.process_index != 0 or not steps:
      return
    newest = max(steps)
    for q in self._process_indices():
      if q >= self.process_count:
        for step in _steps_in(self._process_dir(q)):
          if step not in steps or step == newest:
            shutil.rmtree(os.path.join(self._process_dir(q), str(step)), ignore_errors=True)

"""SAF's host table in a checkpoint: each process's rows as ``.npy`` files of its own.

``saf_jax.checkpoint`` keeps a host ``LogitTable`` here, under
``checkpoints_table/process_<p>/<step>/``, next to Orbax's ``checkpoints/<step>/`` (a table
on the devices is an Orbax item instead).
"""

import os
import shutil
from typing import Any

import jax
import ml_dtypes
import numpy as np

# Storage dtypes that .npy has no code for, saved as same-width unsigned integers.
_NPY_VIEWS = {np.dtype(ml_dtypes.bfloat16): np.dtype(np.uint16)}
# The arrays of logits (float32, bfloat16 or uint8 codes; uint16 only as bfloat16's bits).
_LOGIT_ARRAYS = ('values', 'topk_values')


class TableFiles:
  """This process's SAF table checkpoints: ``checkpoints_table/process_<p>/<step>/*.npy``.

  Written by one process alone, without any collective (Orbax's managers coordinate all
  processes, and a per-process subset of them raced on its temporary directories in a
  2-process test). Each step is written to a temporary directory and renamed into place,
  so a step directory is always complete; arrays are read back memory-mapped, so a table
  larger than RAM can be restored into a memory-mapped table.
  """

  def __init__(self, workdir: str, process_index: int | None = None):
    process = jax.process_index() if process_index is None else process_index
    self.directory = os.path.join(workdir, 'checkpoints_table', f'process_{process}')

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

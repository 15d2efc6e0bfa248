"""What guards a run's workdir before and while it trains there.

* :func:`check_writable`: the workdir can be written, checked before any data is loaded.
* :func:`lock`: one run at a time per workdir, for the life of the run.
* :func:`check_config`: the workdir's ``config.json`` (the config of the run that trains
  there; see ``saf_jax.checkpoint`` for the checkpoints) against the new config: a
  mismatch in any field that changes the training trajectory is refused, so another run's
  checkpoint is never resumed or overwritten by mistake.
* :func:`check_dataset`: the dataset actually served (its number of classes, training
  examples and image shape, recorded in ``config.json``) against the recorded one, since a
  folder dataset can change under an unchanged config.

Each refusal is a ``ValueError`` with one clear message, raised before anything in the
workdir changes.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from saf_jax import config_upgrade

# The key of config.json that records the dataset served (not a config field).
DATASET_KEY = 'dataset_served'
# The lock file of a workdir (flock'ed by the run's process 0; holds its host and pid).
LOCK_FILE = 'saf_jax.lock'


def raise_together(error: BaseException | None, what: str) -> None:
  """Raises on every process of the run if any of them failed, so that none is left waiting
  in a collective that a failed process never reaches. Collective if multi-process.

  Args:
    error: this process's failure, or None.
    what: what failed, for the processes that did not fail themselves ("save the SAF
      table", ...).

  Raises:
    The process's own ``error``; on a process without one while another has one, a
    ``ValueError`` saying which process failed to do ``what`` (its own error names why).
  """
  if jax.process_count() > 1:
    failed = multihost_utils.process_allgather(np.asarray(error is not None))
    if error is None and np.any(failed):
      first = int(np.argmax(np.asarray(failed).reshape(-1)))
      raise ValueError(
        f'Process {first} of this run failed to {what}; its own error message names why.'
      )
  if error is not None:
    raise error


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
  'method.saf.table_placement',  # The checkpoint's own placement is checked on resume.
  'input.placement',  # The same ids and pixels either way.
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
  flat = _flatten(config_upgrade.upgrade_config(config_dict))
  return {
    k: v for k, v in flat.items() if not any(k == f or k.startswith(f + '.') for f in _RESUME_FREE)
  }


def config_path(workdir: str) -> str:
  return os.path.join(workdir, 'config.json')


def check_config(config: ml_collections.ConfigDict, workdir: str) -> None:
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
    root = os.path.join(workdir, 'checkpoints')
    if os.path.isdir(root) and any(name.isdigit() for name in os.listdir(root)):
      raise ValueError(
        f'Workdir {workdir!r} holds checkpoints but no config.json, so it cannot be '
        'checked that they belong to this config; restore config.json or use a new --workdir.'
      )
    return
  old = _trajectory_fields(read_recorded(path)[0])
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


def read_recorded(path: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """``(config dict, recorded dataset or None)`` of a ``config.json`` at ``path``.

  The config dict is as stored (not upgraded); the dataset is what :func:`write_config`
  recorded under ``DATASET_KEY`` (None for a run of an earlier saf_jax).

  Raises:
    ValueError: naming ``path`` if it is not valid JSON (damaged).
  """
  with open(path) as f:
    try:
      config_dict = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(
        f"{path} is damaged ({e}); restore it from the run's command, or use a new --workdir."
      ) from e
  return config_dict, config_dict.pop(DATASET_KEY, None)


def _served(info: Any) -> dict[str, Any]:
  return {
    'num_classes': int(info.num_classes),
    'num_train': int(info.num_train),
    'image_shape': [int(d) for d in info.image_shape],
  }


def write_config(config: ml_collections.ConfigDict, workdir: str, info: Any | None = None) -> None:
  """Writes ``workdir/config.json`` atomically.

  Args:
    config: the run's config.
    workdir: the run's directory.
    info: the ``DatasetInfo`` of the data served; recorded under ``DATASET_KEY`` (its
      number of classes, training examples and image shape) for :func:`check_dataset`.
  """
  path = config_path(workdir)
  record = json.loads(config.to_json())
  if info is not None:
    record[DATASET_KEY] = _served(info)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


# What check_dataset compares, and how its message words each value.
_DATASET_FIELDS = {
  'num_classes': lambda v: f'{v} classes',
  'num_train': lambda v: f'{v} training examples',
  'image_shape': lambda v: f'images of shape {tuple(v)}',
}


def check_dataset(workdir: str, info: Any) -> None:
  """Refuses a workdir whose run was trained on a dataset of another shape.

  A folder dataset (``config.input.dataset = 'folder:...'``) that gains a class or loses
  images changes the model's head, the SAF table's rows or the data order under an
  unchanged config.

  Args:
    workdir: the run's directory.
    info: the ``DatasetInfo`` of the data this run serves.

  Raises:
    ValueError: if ``config.json`` recorded another number of classes, of training
      examples or another image shape, e.g. "workdir has 10 classes, this run has 11".
      Nothing in the workdir is touched. A ``config.json`` without the record (an earlier
      saf_jax) is not checked.
  """
  path = config_path(workdir)
  if not os.path.exists(path):
    return
  recorded = read_recorded(path)[1]
  if recorded is None:
    return
  served = _served(info)
  for key, words in _DATASET_FIELDS.items():
    if key in recorded and recorded[key] != served[key]:
      raise ValueError(
        f'Workdir {workdir!r} has {words(recorded[key])}, this run has {words(served[key])}: '
        f'its dataset ({info.name!r}) changed since the run started there, so its '
        'checkpoints do not fit; restore the dataset or use a new --workdir.'
      )


def check_writable(workdir: str) -> None:
  """Creates ``workdir`` if needed and checks that this process can write files in it.

  Called before any data is loaded, so that a read-only mount or a full disk is reported
  in one line at once rather than as a failed checkpoint after loading and compiling.

  Raises:
    ValueError: naming the workdir and the system's reason (e.g. "Read-only file
      system", "No space left on device", "Permission denied"). Nothing is left behind.
  """
  error = None
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix='.write_probe_') as f:
      f.write(b'saf_jax')
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    reason = e.strerror or str(e)
    error = ValueError(
      f'--workdir {workdir!r} is not writable ({reason}): a run writes its config, '
      'metrics and checkpoints there; use a writable --workdir.'
    )
    error.__cause__ = e
  raise_together(error, f'write in --workdir {workdir!r}')


def _holder(path: str) -> str:
  """Who holds the lock at ``path``, as its holder wrote it, or 'another run'."""
  try:
    with open(path) as f:
      info = json.load(f)
    return f'pid {info["pid"]} on host {info["host"]}, started {info["started"]}'
  except (OSError, ValueError, KeyError):  # Not written yet, or by another program.
    return 'a run whose host and pid are not recorded'


# flock's errors where the filesystem has no locks (some network and FUSE mounts).
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds an exclusive lock on ``workdir`` (which must exist) for the body's duration.

  Process 0 of the run takes an advisory ``flock`` on ``workdir/saf_jax.lock`` and writes its host,
  pid and start time into it; the other processes of a multi-host run wait for it (a
  collective) and refuse alike. The kernel releases a ``flock`` when its process dies, so
  a run killed with SIGKILL leaves no stale lock: the next run takes it and rewrites the
  file. Read-only tools (``analyze``) take no lock. On a filesystem without locks, a
  warning is logged and the run goes on unlocked.

  Raises:
    ValueError: if another run holds the lock: "Workdir ... is in use by another run (pid
      123 on host h, started ...)", or if the lock file cannot be opened; on every process
      alike. Nothing is changed.
  """
  path = os.path.join(workdir, LOCK_FILE)
  fd, held, error = None, True, None
  if jax.process_index() == 0:
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      held = False
    except OSError as e:
      if e.errno in _NO_LOCKS:
        logging.warning('%s cannot be locked (%s): two runs could share it.', workdir, e)
      else:
        error = ValueError(f'Workdir {workdir!r} cannot be locked ({path}: {e}).')
    if fd is not None and (error is not None or not held):
      os.close(fd)
      fd = None
  if jax.process_count() > 1:
    held = bool(np.all(multihost_utils.process_allgather(np.asarray(held))))
  raise_together(error, f'lock the workdir {workdir!r}')
  if not held:
    raise ValueError(
      f'Workdir {workdir!r} is in use by another run ({_holder(path)}); wait for it to end, '
      'or use another --workdir.'
    )
  if fd is not None:
    info = {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'started': datetime.datetime.now().isoformat(timespec='seconds'),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
  try:
    yield
  finally:
    if fd is not None:
      os.ftruncate(fd, 0)  # Released: an empty file names no holder.
      os.close(fd)

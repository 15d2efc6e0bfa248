"""Metric logging: ``workdir/metrics.jsonl`` (one JSON object per epoch) and TensorBoard.

``metrics.jsonl`` is the record the analysis tools read (``saf_jax.analysis.plots``); the
TensorBoard event files (written with tensorboardX into the workdir itself) let
``tensorboard --logdir runs/`` show every run under ``runs/`` side by side, one run per
workdir, with the epoch as the step.
"""

import json
import math
import os
from typing import Any

import tensorboardX

# The evaluations whose best epoch is tracked: the trained weights, MESA's teacher and the
# model EMA (config.eval.ema_decay), as the authors' scripts report the best epoch.
BEST_OF = ('test', 'test_ema', 'test_model_ema')


def read_records(workdir: str, *, up_to_epoch: int | None = None) -> list[dict[str, Any]]:
  """The epoch records of ``workdir/metrics.jsonl`` (``[]`` without one), in file order.

  A line cut short by a crash is skipped; with ``up_to_epoch``, later epochs are left out.
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  records = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        if up_to_epoch is None or record.get('epoch', 0) <= up_to_epoch:
          records.append(record)
  return records


def add_best(record: dict[str, Any], best: dict[str, tuple[float, int]]) -> None:
  """Adds ``<prefix>/best_accuracy`` and ``<prefix>/best_epoch`` to an evaluated record.

  For each prefix of ``BEST_OF`` that ``record`` has ``<prefix>/accuracy`` for, the highest
  top-1 over the epochs evaluated so far, this one included, and the first epoch that
  reached it. ``best`` (``{prefix: (top-1, epoch)}``) carries the earlier epochs and is
  updated in place; ``best_of(read_records(...))`` rebuilds it on resume.
  """
  for prefix in BEST_OF:
    accuracy = record.get(f'{prefix}/accuracy')
    if accuracy is None:  # Not evaluated this epoch.
      continue
    if math.isfinite(accuracy) and (prefix not in best or accuracy > best[prefix][0]):
      best[prefix] = (float(accuracy), int(record['epoch']))
    if prefix in best:
      record[f'{prefix}/best_accuracy'], record[f'{prefix}/best_epoch'] = best[prefix]


def best_of(records: list[dict[str, Any]]) -> dict[str, tuple[float, int]]:
  """``add_best``'s running best after ``records`` (in epoch order)."""
  best: dict[str, tuple[float, int]] = {}
  for record in records:
    add_best(dict(record), best)
  return best


class JsonlWriter:
  """Appends metric records to ``workdir/metrics.jsonl``.

  Attributes:
    path: the file written.
  """

  def __init__(self, workdir: str, *, keep_epochs_up_to: int):
    """Opens the file, keeping only records of epochs ``<= keep_epochs_up_to``.

    A resumed run rewrites epochs after its checkpoint; earlier records are kept.
    """
    self.path = os.path.join(workdir, 'metrics.jsonl')
    kept = read_records(workdir, up_to_epoch=keep_epochs_up_to)
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(json.dumps(record) + '\n' for record in kept)
    os.replace(tmp, self.path)

  def write(self, record: dict[str, Any]) -> None:
    """Appends ``record`` (scalars) as one line; floats are written as Python floats."""
    clean = {k: (float(v) if not isinstance(v, int | str) else v) for k, v in record.items()}
    clean = {
      k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in clean.items()
    }
    with open(self.path, 'a') as f:
      f.write(json.dumps(clean) + '\n')

  def close(self) -> None:
    """Nothing to release: each record is appended and closed at once."""


class TensorBoardWriter:
  """Writes each record's numeric values as TensorBoard scalars at the global step.

  As the Flax examples do: the x axis is ``record['step']`` (optimizer steps so far) and
  the epoch is a scalar of its own, ``epoch``.

  Attributes:
    logdir: the directory holding the event files (the workdir).
  """

  def __init__(self, workdir: str, *, keep_steps_up_to: int):
    """Opens an event file in ``workdir``.

    Args:
      workdir: the run's directory.
      keep_steps_up_to: the last global step whose scalars are kept (the end of the last
        epoch a resumed run keeps); TensorBoard discards the events of later steps (a
        resumed run rewrites them), via tensorboardX's ``purge_step``.
    """
    self.logdir = workdir
    self._writer = tensorboardX.SummaryWriter(logdir=workdir, purge_step=keep_steps_up_to + 1)

  def write(self, record: dict[str, Any]) -> None:
    """Adds every finite int or float of ``record`` except ``step`` as a scalar; flushes."""
    step = record['step']
    for key, value in record.items():
      if key == 'step' or isinstance(value, str | bool) or value is None:
        continue
      if math.isfinite(float(value)):
        self._writer.add_scalar(key, float(value), global_step=step)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()

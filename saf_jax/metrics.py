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
    kept = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:  # A line cut short by a crash.
            continue
          if record.get('epoch', 0) <= keep_epochs_up_to:
            kept.append(json.dumps(record) + '\n')
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(kept)
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

"""Metric logging: one JSON object per line in ``workdir/metrics.jsonl``."""

import json
import math
import os
from typing import Any


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

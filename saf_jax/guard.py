"""What guards a run's workdir: its recorded config, checked against each new run of it.

A workdir holds ``config.json``, the config of the run that trains there (see
``saf_jax.checkpoint`` for the checkpoints). Before anything is written,
:func:`check_config` compares the stored config with the new one and refuses a mismatch in
any field that changes the training trajectory, so another run's checkpoint is never
resumed or overwritten by mistake.
"""

import json
import os
from typing import Any

import ml_collections

from saf_jax import config_upgrade

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

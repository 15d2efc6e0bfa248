r"""Several methods over several seeds on one config: mean and std of accuracy and time.

  python -m saf_jax.compare --config configs/default.py --methods sgd,sam,saf,mesa \
      --seeds 0,1,2 --workdir runs/compare

Each (method, seed) is one ``main.py`` run in its own process, into
``<workdir>/<method>_seed<seed>``, exactly as a user would start it (add config
overrides with ``--override=--config.optimizer.lr=0.1``, repeatable). A finished run is
not repeated: its record (``compare.json`` in its workdir: final metrics and the wall
time of its process) is reused, so an interrupted comparison resumes. Prints one JSON
object per method, then a Markdown table: final test top-1 (and EMA top-1 for MESA) as
mean ± sample std over seeds, median epoch images/s and process wall time.
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string(
  'config',
  None,
  'Config file, with optional arguments (configs/default.py:smoke); method= is added.',
)
flags.DEFINE_list('methods', ['sgd', 'sam', 'saf', 'mesa'], 'Methods to compare.')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds; each sets config.seed.')
flags.DEFINE_string('workdir', None, 'Parent directory of the runs.')
flags.DEFINE_multi_string('override', [], 'Extra main.py flag, e.g. --config.num_epochs=4.')
flags.mark_flags_as_required(['config', 'workdir'])

_MAIN = pathlib.Path(__file__).resolve().parents[1] / 'main.py'
_RECORD = 'compare.json'


def run_one(config: str, method: str, seed: int, workdir: str, overrides: list[str]) -> dict:
  """Trains one (method, seed) in a subprocess unless already done; returns its record.

  Raises:
    RuntimeError: if the run fails (its stderr's tail is in the message).
  """
  record_path = os.path.join(workdir, _RECORD)
  if os.path.exists(record_path):
    with open(record_path) as f:
      return json.load(f)
  cmd = [
    sys.executable,
    str(_MAIN),
    f'--config={config}{"," if ":" in config else ":"}method={method}',
    f'--workdir={workdir}',
    f'--config.seed={seed}',
    *overrides,
  ]
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{proc.stderr[-3000:]}')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    epochs = [json.loads(line) for line in f]
  final = epochs[-1]
  record = {
    'method': method,
    'seed': seed,
    'test_accuracy': final['test/accuracy'],
    'test_ema_accuracy': final.get('test_ema/accuracy'),
    'median_epoch_images_per_sec': statistics.median(e['train/images_per_sec'] for e in epochs),
    'wall_sec': wall,
    'epochs': final['epoch'],
  }
  with open(record_path, 'w') as f:
    json.dump(record, f, indent=1)
  return record


def summarize(records: list[dict]) -> dict:
  """Mean and sample std over seeds of one method's records."""

  def stats(key):
    values = [r[key] for r in records if r.get(key) is not None]
    if not values:
      return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {'mean': statistics.mean(values), 'std': std}

  return {
    'method': records[0]['method'],
    'seeds': [r['seed'] for r in records],
    'test_accuracy': stats('test_accuracy'),
    'test_ema_accuracy': stats('test_ema_accuracy'),
    'median_epoch_images_per_sec': stats('median_epoch_images_per_sec'),
    'wall_sec': stats('wall_sec'),
  }


def main(argv):
  del argv
  seeds = [int(s) for s in FLAGS.seeds]
  rows = []
  for method in FLAGS.methods:
    records = []
    for seed in seeds:
      workdir = os.path.join(FLAGS.workdir, f'{method}_seed{seed}')
      record = run_one(FLAGS.config, method, seed, workdir, FLAGS.override)
      print(json.dumps(record), flush=True)
      records.append(record)
    rows.append(summarize(records))
  print()
  for row in rows:
    print(json.dumps(row), flush=True)

  def fmt(s, scale=1.0, digits=4):
    return '-' if s is None else f'{s["mean"] * scale:.{digits}f} ± {s["std"] * scale:.{digits}f}'

  print(f'\n{FLAGS.config} seeds={seeds} {" ".join(FLAGS.override)}')
  print('| method | test top-1 | EMA top-1 | median epoch images/s | wall (s) |')
  print('|---|---|---|---|---|')
  for row in rows:
    print(
      f'| {row["method"]} | {fmt(row["test_accuracy"])} | {fmt(row["test_ema_accuracy"])} '
      f'| {fmt(row["median_epoch_images_per_sec"], digits=0)} | {fmt(row["wall_sec"], digits=1)} |'
    )


if __name__ == '__main__':
  app.run(main)

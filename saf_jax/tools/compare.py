r"""Several methods over several seeds on one config: accuracy, sharpness and time, with intervals.

  python -m saf_jax.tools.compare --config configs/default.py --methods sgd,sam,saf,mesa \
      --seeds 0,1,2 --workdir runs/compare

The methods are any of ``saf_jax.methods.NAMES`` (e.g. ``--methods sgd,sam,msam,rwp`` for
SAM against its one-gradient and random-perturbation baselines), checked before any run
starts. Each (method, seed) is one ``main.py`` run in its own process, into
``<workdir>/<method>_seed<seed>``, exactly as a user would start it (add config
overrides with ``--override=--config.optimizer.lr=0.1``, repeatable). A finished run is
not repeated: its record (``compare.json`` in its workdir: final metrics and the wall
time of its process) is reused, so an interrupted comparison resumes.

Per method it prints one JSON object, then a Markdown table (mean ± sample std over seeds):

* ``test top-1``: the trained weights at the final epoch (saf_jax's headline figure), and
  at their best evaluated epoch;
* ``best EMA top-1``: the best evaluated epoch of the model EMA (``config.eval.ema_decay``),
  the figure the authors' scripts report (timm's ``--model-ema``, best epoch). Never the
  same number as the first; both are labelled;
* ``MESA teacher``: MESA's own EMA teacher at the final epoch;
* final ``train top-1`` (eval mode, unaugmented, ``config.eval.train_accuracy``), final SAM
  sharpness, median epoch images/s and the process's wall time;

then, for every method against the first (``sgd`` by default), the difference of the
final test top-1 means with its 95% Welch interval. ``<workdir>/compare.md`` holds the same
tables and ``<workdir>/compare.png`` the per-epoch SAM sharpness and test top-1 of each
method, mean over seeds (Fig. 4b of Du et al. 2022).
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np
from absl import app, flags
from scipy import stats

from saf_jax import metrics

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defines the CLI's flags; called only when this module runs as a program."""
  flags.DEFINE_string(
    'config',
    None,
    'Config file, with optional arguments (configs/default.py:smoke); method= is added.',
  )
  flags.DEFINE_list(
    'methods',
    ['sgd', 'sam', 'saf', 'mesa'],
    'Methods to compare: any of saf_jax.methods.NAMES (e.g. msam, rwp, saf+msam).',
  )
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds; each sets config.seed.')
  flags.DEFINE_string('workdir', None, 'Parent directory of the runs.')
  flags.DEFINE_multi_string('override', [], 'Extra main.py flag, e.g. --config.num_epochs=4.')
  flags.mark_flags_as_required(['config', 'workdir'])


_MAIN = pathlib.Path(__file__).resolve().parents[2] / 'main.py'  # The repository's.
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
  record = {'method': method, 'seed': seed, **record_of(epochs), 'wall_sec': wall}
  with open(record_path, 'w') as f:
    json.dump(record, f, indent=1)
  return record


def record_of(epochs: list[dict]) -> dict:
  """One run's figures from its ``metrics.jsonl`` records (final epoch last).

  Returns:
    ``test_accuracy`` (final, trained weights), ``test_best_accuracy`` and
    ``test_best_epoch``, ``model_ema_accuracy`` (final), ``model_ema_best_accuracy`` and
    ``model_ema_best_epoch`` (the authors' protocol), ``test_ema_accuracy`` (MESA's teacher,
    final), ``train_eval_accuracy`` and ``sam_sharpness`` (final), the median epoch
    ``images/s`` and the number of ``epochs``; None where the run did not log it.
  """
  final = epochs[-1]
  best = metrics.best_of(epochs)  # The first epoch that reached the highest top-1.
  test_best, test_best_epoch = best.get('test', (None, None))
  ema_best, ema_best_epoch = best.get('test_model_ema', (None, None))
  return {
    'test_accuracy': final['test/accuracy'],
    'test_best_accuracy': test_best,
    'test_best_epoch': test_best_epoch,
    'model_ema_accuracy': final.get('test_model_ema/accuracy'),
    'model_ema_best_accuracy': ema_best,
    'model_ema_best_epoch': ema_best_epoch,
    'test_ema_accuracy': final.get('test_ema/accuracy'),
    'train_eval_accuracy': final.get('train_eval/accuracy'),
    'sam_sharpness': final.get('train/sam_sharpness'),
    'median_epoch_images_per_sec': statistics.median(e['train/images_per_sec'] for e in epochs),
    'epochs': final['epoch'],
  }


def welch(a: list[float], b: list[float], confidence: float = 0.95) -> dict:
  """Difference of means ``mean(a) - mean(b)`` with its Welch t interval.

  Args:
    a, b: samples (e.g. one method's and SGD's final test top-1 over seeds), >= 2 each.
    confidence: of the two-sided interval.

  Returns:
    ``{'diff', 'low', 'high', 'df'}``; with both samples constant the interval is the
    point ``diff`` and ``df`` is None.

  Raises:
    ValueError: if a sample has fewer than 2 values.
  """
  if len(a) < 2 or len(b) < 2:
    raise ValueError(f'welch needs >= 2 values per sample, got {len(a)} and {len(b)}.')
  va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
  diff = statistics.mean(a) - statistics.mean(b)
  if va + vb == 0:
    return {'diff': diff, 'low': diff, 'high': diff, 'df': None}
  df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
  half = stats.t.ppf(0.5 + confidence / 2, df) * np.sqrt(va + vb)
  return {'diff': diff, 'low': diff - half, 'high': diff + half, 'df': df}


def summarize(records: list[dict]) -> dict:
  """Mean and sample std over seeds of one method's records."""

  def stats_of(key):
    values = [r[key] for r in records if r.get(key) is not None]
    if not values:
      return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {'mean': statistics.mean(values), 'std': std}

  keys = (
    'test_accuracy',
    'test_best_accuracy',
    'model_ema_best_accuracy',
    'test_ema_accuracy',
    'train_eval_accuracy',
    'sam_sharpness',
    'median_epoch_images_per_sec',
    'wall_sec',
  )
  return {
    'method': records[0]['method'],
    'seeds': [r['seed'] for r in records],
    **{key: stats_of(key) for key in keys},
  }


def _fmt(s: dict | None, scale: float = 1.0, digits: int = 4) -> str:
  return '-' if s is None else f'{s["mean"] * scale:.{digits}f} ± {s["std"] * scale:.{digits}f}'


def tables(rows: list[dict], records: dict[str, list[dict]]) -> str:
  """The Markdown tables: one row per method, then each method against the first."""
  lines = [
    "| method | test top-1 (final) | test top-1 (best epoch) | best EMA top-1 (authors' "
    'protocol) | MESA teacher (final) | train top-1 (final) | SAM sharpness (final) '
    '| median epoch images/s | wall (s) |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for row in rows:
    lines.append(
      f'| {row["method"]} | {_fmt(row["test_accuracy"])} '
      f'| {_fmt(row["test_best_accuracy"])} | {_fmt(row["model_ema_best_accuracy"])} '
      f'| {_fmt(row["test_ema_accuracy"])} '
      f'| {_fmt(row["train_eval_accuracy"])} | {_fmt(row["sam_sharpness"])} '
      f'| {_fmt(row["median_epoch_images_per_sec"], digits=0)} '
      f'| {_fmt(row["wall_sec"], digits=1)} |'
    )
  base = rows[0]['method']
  if len(records[base]) >= 2 and len(rows) > 1:
    lines += [
      '',
      '| difference of final test top-1 means | points | 95% interval (Welch) |',
      '|---|---|---|',
    ]
    for row in rows[1:]:
      method = row['method']
      if len(records[method]) < 2:
        continue
      w = welch(
        [r['test_accuracy'] for r in records[method]],
        [r['test_accuracy'] for r in records[base]],
      )
      lines.append(
        f'| {method} − {base} | {100 * w["diff"]:+.2f} '
        f'| [{100 * w["low"]:+.2f}, {100 * w["high"]:+.2f}] |'
      )
  return '\n'.join(lines)


def main(argv):
  del argv
  from saf_jax import methods  # JAX and optax: a name is refused before any run starts.

  for method in FLAGS.methods:
    try:
      methods.parse(method)
    except ValueError as e:
      raise app.UsageError(f'--methods={method!r}: {e}') from None
  seeds = [int(s) for s in FLAGS.seeds]
  rows, records = [], {}
  for method in FLAGS.methods:
    records[method] = []
    for seed in seeds:
      workdir = os.path.join(FLAGS.workdir, f'{method}_seed{seed}')
      record = run_one(FLAGS.config, method, seed, workdir, FLAGS.override)
      print(json.dumps(record), flush=True)
      records[method].append(record)
    rows.append(summarize(records[method]))
  print()
  for row in rows:
    print(json.dumps(row), flush=True)
  text = f'{FLAGS.config} seeds={seeds} {" ".join(FLAGS.override)}\n\n{tables(rows, records)}\n'
  print(f'\n{text}', flush=True)
  with open(os.path.join(FLAGS.workdir, 'compare.md'), 'w') as f:
    f.write(text)
  from saf_jax.analysis import plots  # matplotlib, only once every run is done.

  plots.plot_comparison(
    {
      method: [plots.read_metrics(os.path.join(FLAGS.workdir, f'{method}_seed{s}')) for s in seeds]
      for method in FLAGS.methods
    },
    os.path.join(FLAGS.workdir, 'compare.png'),
  )


if __name__ == '__main__':
  _define_flags()
  app.run(main)

r"""Training throughput of each method on the same model, batch size and data.

  python -m saf_jax.tools.benchmark --config configs/default.py
  python -m saf_jax.tools.benchmark --config configs/default.py --methods sgd,sam --synthetic

For every method the config is the same except ``method.name``; the step timed is the
one with the trajectory loss *active* (epochs > E_start), the expensive phase. Each
method is compiled and warmed up first (compilation excluded), then the methods are
interleaved over ``--rounds`` rounds of ``--steps`` steps each, so drifts of the machine
hit all of them alike. Each timed run goes through ``train.run_steps``, the
training loop itself: input pipeline, device prefetch, SAF's table gather and
asynchronous write-back, and the step.

With ``--synthetic`` the batches are random images of the dataset's shape (no
TensorFlow import, no input pipeline: the step, the prefetch and SAF's table alone),
for machines without the data or to isolate the step's cost. LookSAM's rounds hold
whole multiples of its ``k`` steps only if ``--steps`` is a multiple of ``k``.

Prints one JSON object per method (``method``, ``images_per_sec`` as the median over
rounds, ``ratio_to_sgd``, ``rounds``), then a readable table.

With ``--input_only`` no model runs: each round times ``--steps`` batches of a fresh
training epoch from the input pipeline alone (decoding and augmentation on the host,
including the pipeline's start-up), to size the host for a dataset such as ImageNet::

  python -m saf_jax.tools.benchmark --config configs/imagenet.py --input_only \
      --config.input.batch_size=256 --steps 20
"""

import itertools
import json
import os
import statistics
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defines the CLI's flags; called only when this module runs as a program."""
  config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=False)
  flags.DEFINE_list(
    'methods',
    ['sgd', 'saf', 'mesa', 'sam', 'asam', 'gsam', 'looksam', 'esam'],
    'Methods to compare (any of saf_jax.methods.NAMES).',
  )
  flags.DEFINE_bool('synthetic', False, 'Random images of the dataset shape; no input pipeline.')
  flags.DEFINE_bool('input_only', False, 'Time the input pipeline alone (host images/s).')
  flags.DEFINE_integer('rounds', 5, 'Interleaved timing rounds per method.')
  flags.DEFINE_integer('steps', 50, 'Train steps per method and round.')
  flags.DEFINE_integer('warmup_steps', 10, 'Untimed steps per method after compilation.')
  flags.mark_flags_as_required(['config'])


def run_benchmark(
  config, methods, *, rounds: int, steps: int, warmup_steps: int, synthetic: bool = False
):
  """Returns ``{method: [images/s of each round]}``; see the module docstring.

  Raises:
    ValueError: for an unknown method or an invalid config (before any compilation).
  """
  import jax

  from saf_jax import experiment, validation

  if rounds < 1 or steps < 1 or warmup_steps < 0:
    raise ValueError('--rounds and --steps must be >= 1 and --warmup_steps >= 0.')
  configs = {}
  for method in methods:
    cfg = config.copy_and_resolve_references()
    cfg.method.name = method
    validation.validate_config(cfg, num_devices=jax.device_count(), check_input=not synthetic)
    configs[method] = cfg
  if synthetic:
    from saf_jax.data import synthetic as synthetic_data

    datasets = synthetic_data.create(config.input, seed=config.seed)
  else:
    from saf_jax import data

    datasets = data.create_datasets(config.input, seed=config.seed)
  batch_size = config.input.batch_size
  runs = {}
  for method, cfg in configs.items():
    exp = experiment.create(cfg, datasets.info)
    # An epoch with the trajectory loss active. SAF's targets there are all masked (the
    # table is empty), which costs the same as valid ones: the KL runs on every row.
    epoch = max(cfg.method.saf.E_start, cfg.method.saf.E_tilde, cfg.method.mesa.E_start) + 1
    if exp.method.trajectory is not None:
      assert exp.trajectory_active(epoch)
    runs[method] = {'exp': exp, 'state': exp.init_state(), 'table': exp.new_table()}
    runs[method]['epoch'] = epoch
    if warmup_steps:
      _timed(runs[method], datasets, steps=warmup_steps)
  results = {m: [] for m in methods}
  for _ in range(rounds):
    for method in methods:
      n, seconds = _timed(runs[method], datasets, steps=steps)
      results[method].append(n * batch_size / seconds)
  return results


def input_throughput(config, *, rounds: int, steps: int) -> list[tuple[int, float]]:
  """Times the training input pipeline alone; see the module docstring.

  Round ``r`` reads the first ``steps`` batches of epoch ``r + 1`` of
  ``config.input.batch_size`` examples, from creating the iterator to the last batch.

  Returns:
    ``[(images, seconds)]``, one pair per round.

  Raises:
    ValueError: for bad ``rounds`` / ``steps``, or a config the pipeline refuses.
  """
  from saf_jax import data

  if rounds < 1 or steps < 1:
    raise ValueError('--rounds and --steps must be >= 1.')
  datasets = data.create_datasets(config.input, seed=config.seed)
  batch_size = config.input.batch_size
  if steps * batch_size > datasets.info.num_train:
    raise ValueError(
      f'--steps={steps} batches of {batch_size} exceed the {datasets.info.num_train} '
      'training examples.'
    )
  results = []
  for r in range(rounds):
    start = time.perf_counter()
    images = 0
    batches = datasets.train_epoch(r + 1, batch_size=batch_size)
    for batch in itertools.islice(batches, steps):
      images += len(batch['index'])
    results.append((images, time.perf_counter() - start))
  return results


def _timed(run, datasets, *, steps):
  from saf_jax import train

  exp = run['exp']
  batches = datasets.train_epoch(run['epoch'], batch_size=exp.config.input.batch_size)
  run['state'], metrics, seconds = train.run_steps(
    exp, run['state'], batches, epoch=run['epoch'], table=run['table'], num_steps=steps
  )
  return len(metrics), seconds


def main(argv):
  del argv
  if not FLAGS.synthetic:
    from saf_jax.data import tf_runtime  # TensorFlow, quietly and off the GPUs.

    tf_runtime.quiet_console()
  start = time.perf_counter()
  if FLAGS.input_only:
    timings = input_throughput(FLAGS.config, rounds=FLAGS.rounds, steps=FLAGS.steps)
    per_round = [images / seconds for images, seconds in timings]
    row = {
      'input_pipeline_images_per_sec': round(statistics.median(per_round), 1),
      'rounds': [round(v, 1) for v in per_round],
      'images_per_round': [images for images, _ in timings],
    }
    print(json.dumps(row), flush=True)
    cfg = FLAGS.config
    print(
      f'\ninput pipeline: dataset={cfg.input.dataset} augment={cfg.input.augment} '
      f'batch={cfg.input.batch_size} rounds={FLAGS.rounds} steps/round={FLAGS.steps} '
      f'host CPUs={os.cpu_count()} wall={time.perf_counter() - start:.0f}s: '
      f'{row["input_pipeline_images_per_sec"]:.1f} images/s'
    )
    return
  import jax

  results = run_benchmark(
    FLAGS.config,
    FLAGS.methods,
    rounds=FLAGS.rounds,
    steps=FLAGS.steps,
    warmup_steps=FLAGS.warmup_steps,
    synthetic=FLAGS.synthetic,
  )
  medians = {m: statistics.median(v) for m, v in results.items()}
  reference = medians.get('sgd')
  rows = []
  for method, ips in medians.items():
    row = {
      'method': method,
      'images_per_sec': round(ips, 1),
      'ratio_to_sgd': round(ips / reference, 3) if reference else None,
      'rounds': [round(v, 1) for v in results[method]],
    }
    rows.append(row)
    print(json.dumps(row), flush=True)
  cfg = FLAGS.config
  print(
    f'\nmodel={cfg.model.name} batch={cfg.input.batch_size} dataset={cfg.input.dataset}'
    f'{" (synthetic)" if FLAGS.synthetic else ""} '
    f'devices={jax.device_count()} ({jax.devices()[0].platform}) '
    f'rounds={FLAGS.rounds} steps/round={FLAGS.steps} wall={time.perf_counter() - start:.0f}s'
  )
  print(f'{"method":<8} {"images/s":>10} {"x SGD":>7}')
  for row in rows:
    ratio = f'{row["ratio_to_sgd"]:.3f}' if row['ratio_to_sgd'] is not None else '-'
    print(f'{row["method"]:<8} {row["images_per_sec"]:>10.1f} {ratio:>7}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)

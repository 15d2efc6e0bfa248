r"""Training throughput of each method and placement on the same model, batch size and data.

  python -m saf_jax.tools.benchmark --config configs/default.py
  python -m saf_jax.tools.benchmark --config configs/default.py --methods sgd,saf,mesa \
      --placements host,device --config.steps_per_dispatch=4
  python -m saf_jax.tools.benchmark --config configs/default.py --methods sgd,sam --synthetic

For every method and placement the config is the same except ``method.name`` and where
the data and SAF's table live: placement ``'host'`` sets ``config.input.placement`` and
``config.method.saf.table_placement`` to ``'host'`` (the tf.data pipeline and the NumPy
table), ``'device'`` sets both to ``'device'`` (``saf_jax.placement``). The step timed is
the one with the trajectory loss *active* (epochs > E_start), the expensive phase. Each
run is compiled and warmed up first (compilation excluded), then the runs are interleaved
over ``--rounds`` rounds of ``--steps`` steps each, so drifts of the machine hit all of
them alike. Each timed run is the training loop's own (``saf_jax.loop``): the epoch's
batches from its start (the host pipeline's start-up, or the device plan's placement), the
prefetch, SAF's table, the steps, ``config.steps_per_dispatch`` per call.

With ``--synthetic`` the batches are random images of the dataset's shape (no
TensorFlow import, no input pipeline: the step, the prefetch and SAF's table alone), for
machines without the data or to isolate the step's cost; host placement only. LookSAM's
rounds hold whole multiples of its ``k`` steps only if ``--steps`` is a multiple of ``k``.

Prints one JSON object per method and placement (``method``, ``placement``,
``images_per_sec`` as the median over rounds, ``ratio_to_sgd``: to SGD of the same
placement, ``rounds``), then a readable table with the machine.

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
    ['sgd', 'saf', 'mesa', 'sam', 'asam', 'gsam', 'looksam', 'esam', 'msam', 'rwp'],
    'Methods to compare (any of saf_jax.methods.NAMES).',
  )
  flags.DEFINE_list(
    'placements',
    None,
    "Where the data and SAF's table live: host, device (default both; host with --synthetic).",
  )
  flags.DEFINE_bool('synthetic', False, 'Random images of the dataset shape; no input pipeline.')
  flags.DEFINE_bool('input_only', False, 'Time the input pipeline alone (host images/s).')
  flags.DEFINE_integer('rounds', 5, 'Interleaved timing rounds per method.')
  flags.DEFINE_integer('steps', 50, 'Train steps per method and round.')
  flags.DEFINE_integer('warmup_steps', 10, 'Untimed steps per method after compilation.')
  flags.mark_flags_as_required(['config'])


PLACEMENTS = ('host', 'device')


def run_benchmark(
  config,
  methods,
  *,
  rounds: int,
  steps: int,
  warmup_steps: int,
  synthetic: bool = False,
  placements=('host',),
):
  """Returns ``{(method, placement): [images/s of each round]}``; see the module docstring.

  Raises:
    ValueError: for an unknown method or placement, device placement with ``synthetic``,
      steps that are not multiples of ``config.steps_per_dispatch``, or an invalid config
      (before any compilation).
  """
  import jax

  from saf_jax import experiment, validation

  if rounds < 1 or steps < 1 or warmup_steps < 0:
    raise ValueError('--rounds and --steps must be >= 1 and --warmup_steps >= 0.')
  bad = [p for p in placements if p not in PLACEMENTS]
  if bad or not placements:
    raise ValueError(f'--placements must be some of {list(PLACEMENTS)}, got {list(placements)}.')
  if synthetic and 'device' in placements:
    raise ValueError('--synthetic has no data to place on the devices: use --placements=host.')
  k = config.steps_per_dispatch
  if steps % k or warmup_steps % k:
    raise ValueError(
      f'--steps={steps} and --warmup_steps={warmup_steps} must be multiples of '
      f'config.steps_per_dispatch={k}.'
    )
  configs = {}
  for method in methods:
    for where in placements:
      cfg = config.copy_and_resolve_references()
      cfg.method.name = method
      cfg.input.placement = cfg.method.saf.table_placement = where
      validation.validate_config(cfg, num_devices=jax.device_count(), check_input=not synthetic)
      configs[method, where] = cfg
  if synthetic:
    from saf_jax.data import synthetic as synthetic_data

    datasets = synthetic_data.create(config.input, seed=config.seed)
  else:
    from saf_jax import data

    datasets = data.create_datasets(config.input, seed=config.seed)
  steps_per_epoch = datasets.info.num_train // config.input.batch_size
  if max(steps, warmup_steps) > steps_per_epoch:
    raise ValueError(
      f'--steps={steps} and --warmup_steps={warmup_steps} must be at most the '
      f'{steps_per_epoch} steps of an epoch.'
    )
  runs, train_sets = {}, {}
  for key, cfg in configs.items():
    exp = experiment.create(cfg, datasets.info)
    runs[key] = _new_run(exp, datasets, train_sets)
    if warmup_steps:
      _timed(runs[key], datasets, steps=warmup_steps)
  results = {key: [] for key in configs}
  for _ in range(rounds):
    for key in configs:
      n, seconds = _timed(runs[key], datasets, steps=steps)
      results[key].append(n * config.input.batch_size / seconds)
  return results


def _new_run(exp, datasets, train_sets: dict) -> dict:
  """A run's state, table and epoch; the training set placed once for every run."""
  from saf_jax import device_input

  cfg = exp.config
  # An epoch with the trajectory loss active. SAF's targets there are all masked (the
  # table is empty), which costs the same as valid ones: the KL runs on every row.
  epoch = max(cfg.method.saf.E_start, cfg.method.saf.E_tilde, cfg.method.mesa.E_start) + 1
  if exp.method.trajectory is not None:
    assert exp.trajectory_active(epoch)
  if exp.data_on_device and 'train_set' not in train_sets:
    train_sets['train_set'] = device_input.place(datasets, exp.replicated_sharding)
  return {
    'exp': exp,
    'state': exp.init_state(),
    'table': exp.new_table(),
    'train_set': train_sets.get('train_set') if exp.data_on_device else None,
    'epoch': epoch,
  }


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
  """Trains ``steps`` steps from the start of the run's epoch; ``(steps, seconds)``.

  The seconds are the epoch's start (the host pipeline's iterator, or the device plan's
  computation and placement) plus ``run_steps``'s own time, which excludes compilation.
  """
  from saf_jax import loop

  start = time.perf_counter()
  source = loop.epoch_source(run['exp'], datasets, run['train_set'], run['epoch'])
  start_seconds = time.perf_counter() - start
  run['state'], metrics, seconds = loop.run_steps(
    run['exp'], run['state'], source, epoch=run['epoch'], table=run['table'], num_steps=steps
  )
  return len(metrics), start_seconds + seconds


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
    placements=FLAGS.placements or (['host'] if FLAGS.synthetic else list(PLACEMENTS)),
  )
  rows = summarise(results)
  for row in rows:
    print(json.dumps(row), flush=True)
  cfg = FLAGS.config
  print(
    f'\nmodel={cfg.model.name} batch={cfg.input.batch_size} dataset={cfg.input.dataset}'
    f'{" (synthetic)" if FLAGS.synthetic else ""} '
    f'steps_per_dispatch={cfg.steps_per_dispatch} '
    f'devices={jax.device_count()} ({jax.devices()[0].device_kind}) host CPUs={os.cpu_count()} '
    f'rounds={FLAGS.rounds} steps/round={FLAGS.steps} wall={time.perf_counter() - start:.0f}s'
  )
  print(f'{"method":<10} {"placement":<9} {"images/s":>10} {"x SGD":>7}')
  for row in rows:
    ratio = f'{row["ratio_to_sgd"]:.3f}' if row['ratio_to_sgd'] is not None else '-'
    print(f'{row["method"]:<10} {row["placement"]:<9} {row["images_per_sec"]:>10.1f} {ratio:>7}')


def summarise(results: dict) -> list[dict]:
  """One row per (method, placement) of ``run_benchmark``'s results: median images/s over
  the rounds, and its ratio to SGD's median in the same placement (None without SGD)."""
  medians = {key: statistics.median(v) for key, v in results.items()}
  rows = []
  for (method, where), ips in medians.items():
    reference = medians.get(('sgd', where))
    rows.append(
      {
        'method': method,
        'placement': where,
        'images_per_sec': round(ips, 1),
        'ratio_to_sgd': round(ips / reference, 3) if reference else None,
        'rounds': [round(v, 1) for v in results[method, where]],
      }
    )
  return rows


if __name__ == '__main__':
  _define_flags()
  app.run(main)

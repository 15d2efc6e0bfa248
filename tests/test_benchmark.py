"""saf_jax.tools.benchmark's timed loop on synthetic batches, and saf_jax.data.synthetic."""

import itertools

import ml_collections
import numpy as np
import pytest

from configs import default
from saf_jax.data import synthetic
from saf_jax.tools import benchmark

pytestmark = pytest.mark.usefixtures('fast_compile')


def test_run_benchmark_times_each_method_every_round():
  config = default.get_config('smoke')
  results = benchmark.run_benchmark(
    config, ['sgd', 'saf', 'mesa+sam'], rounds=2, steps=2, warmup_steps=1, synthetic=True
  )
  assert list(results) == [('sgd', 'host'), ('saf', 'host'), ('mesa+sam', 'host')]
  for key, per_round in results.items():
    assert len(per_round) == 2 and all(np.isfinite(v) and v > 0 for v in per_round), key


def test_run_benchmark_times_both_placements_on_real_data(fashion_mnist_data_dir):
  config = default.get_config('smoke')
  config.input.data_dir = fashion_mnist_data_dir
  config.steps_per_dispatch = 2
  results = benchmark.run_benchmark(
    config, ['sgd', 'saf'], rounds=2, steps=4, warmup_steps=2, placements=('host', 'device')
  )
  assert list(results) == [('sgd', 'host'), ('sgd', 'device'), ('saf', 'host'), ('saf', 'device')]
  rows = benchmark.summarise(results)
  assert [(r['method'], r['placement']) for r in rows] == list(results)
  for row in rows:
    assert row['images_per_sec'] == pytest.approx(
      np.median(results[row['method'], row['placement']]), abs=0.1
    )
    sgd = np.median(results['sgd', row['placement']])
    assert row['ratio_to_sgd'] == pytest.approx(
      np.median(results[row['method'], row['placement']]) / sgd, abs=1e-3
    )


def test_summarise_compares_each_placement_with_its_own_sgd():
  rows = benchmark.summarise(
    {
      ('sgd', 'host'): [100.0, 300.0, 200.0],
      ('saf', 'host'): [100.0],
      ('sgd', 'device'): [400.0],
      ('saf', 'device'): [300.0],
      ('mesa', 'device'): [200.0],
    }
  )
  ratios = {(r['method'], r['placement']): r['ratio_to_sgd'] for r in rows}
  assert ratios == {
    ('sgd', 'host'): 1.0,
    ('saf', 'host'): 0.5,
    ('sgd', 'device'): 1.0,
    ('saf', 'device'): 0.75,
    ('mesa', 'device'): 0.5,
  }
  assert benchmark.summarise({('saf', 'host'): [1.0]})[0]['ratio_to_sgd'] is None


def test_run_benchmark_refuses_bad_input_before_compiling():
  config = default.get_config('smoke')
  with pytest.raises(ValueError, match=r"config.method.name must be one of \['sgd'"):
    benchmark.run_benchmark(config, ['sgd', 'nope'], rounds=1, steps=1, warmup_steps=0)
  with pytest.raises(ValueError, match='--rounds and --steps must be >= 1'):
    benchmark.run_benchmark(config, ['sgd'], rounds=0, steps=1, warmup_steps=0)
  with pytest.raises(ValueError, match=r"--placements must be some of \['host', 'device'\]"):
    benchmark.run_benchmark(config, ['sgd'], rounds=1, steps=1, warmup_steps=0, placements=['gpu'])
  with pytest.raises(ValueError, match='--synthetic has no data to place'):
    benchmark.run_benchmark(
      config, ['sgd'], rounds=1, steps=1, warmup_steps=0, synthetic=True, placements=['device']
    )
  config.steps_per_dispatch = 2
  with pytest.raises(ValueError, match='must be multiples of config.steps_per_dispatch=2'):
    benchmark.run_benchmark(config, ['sgd'], rounds=1, steps=3, warmup_steps=0)


def test_synthetic_batches_have_the_datasets_shape_and_distinct_ids():
  datasets = synthetic.create(
    ml_collections.ConfigDict({'dataset': 'cifar100', 'image_size': -1}), seed=0
  )
  assert (datasets.info.num_train, datasets.info.num_classes) == (50000, 100)
  batches = list(itertools.islice(datasets.train_epoch(3, batch_size=64), 4))
  assert all(
    b['image'].shape == (64, 32, 32, 3) and b['image'].dtype == np.float32 for b in batches
  )
  ids = np.concatenate([b['index'] for b in batches])
  assert len(np.unique(ids)) == 256 and ids.min() >= 0 and ids.max() < 50000
  assert all(b['label'].max() < 100 for b in batches)
  with pytest.raises(ValueError, match=r"--synthetic knows config.input.dataset in \['cifar10'"):
    synthetic.create(ml_collections.ConfigDict({'dataset': 'svhn', 'image_size': -1}), seed=0)

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
  assert list(results) == ['sgd', 'saf', 'mesa+sam']
  for method, per_round in results.items():
    assert len(per_round) == 2 and all(np.isfinite(v) and v > 0 for v in per_round), method


def test_run_benchmark_refuses_bad_input_before_compiling():
  config = default.get_config('smoke')
  with pytest.raises(ValueError, match=r"config.method.name must be one of \['sgd'"):
    benchmark.run_benchmark(config, ['sgd', 'nope'], rounds=1, steps=1, warmup_steps=0)
  with pytest.raises(ValueError, match='--rounds and --steps must be >= 1'):
    benchmark.run_benchmark(config, ['sgd'], rounds=0, steps=1, warmup_steps=0)


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

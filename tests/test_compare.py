"""The comparison driver: records are reused, and the summary is mean ± sample std."""

import json

import pytest

from saf_jax import compare


def _record(seed, acc, wall, ema=None):
  return {
    'method': 'mesa',
    'seed': seed,
    'test_accuracy': acc,
    'test_ema_accuracy': ema,
    'median_epoch_images_per_sec': 1000.0 + seed,
    'wall_sec': wall,
    'epochs': 8,
  }


def test_summary_is_mean_and_sample_std_over_seeds():
  rows = [_record(0, 0.90, 300.0, 0.89), _record(1, 0.92, 310.0, 0.91), _record(2, 0.91, 320.0)]
  summary = compare.summarize(rows)
  assert summary['seeds'] == [0, 1, 2]
  assert summary['test_accuracy']['mean'] == pytest.approx(0.91)
  assert summary['test_accuracy']['std'] == pytest.approx(0.01)  # ddof = 1.
  assert summary['wall_sec']['std'] == pytest.approx(10.0)
  # Seeds without an EMA accuracy are left out of its statistics, not counted as 0.
  assert summary['test_ema_accuracy']['mean'] == pytest.approx(0.90)
  assert compare.summarize([_record(0, 0.9, 1.0)])['test_accuracy']['std'] == 0.0


def test_a_finished_run_is_not_repeated(tmp_path):
  workdir = tmp_path / 'sgd_seed0'
  workdir.mkdir()
  (workdir / 'compare.json').write_text(json.dumps(_record(0, 0.5, 1.0)))
  # A missing config would fail if main.py were started.
  assert compare.run_one('no/such/config.py', 'sgd', 0, str(workdir), [])['test_accuracy'] == 0.5


def test_a_failed_run_raises_with_its_stderr(tmp_path):
  with pytest.raises(RuntimeError, match='failed'):
    compare.run_one('no/such/config.py', 'sgd', 0, str(tmp_path / 'x'), [])

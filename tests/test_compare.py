"""The comparison driver: records are reused, and the summary is mean ± sample std."""

import json

import numpy as np
import pytest
from scipy import stats

from saf_jax.analysis import plots
from saf_jax.tools import compare


def _record(seed, acc, wall, ema=None):
  return {
    'method': 'mesa',
    'seed': seed,
    'test_accuracy': acc,
    'test_ema_accuracy': ema,
    'model_ema_best_accuracy': None,
    'train_eval_accuracy': 0.99,
    'sam_sharpness': 0.1 * seed,
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


def test_record_has_final_and_best_ema_figures_labelled_apart():
  epochs = [
    {'epoch': 1, 'train/images_per_sec': 10.0},
    {
      'epoch': 2,
      'train/images_per_sec': 30.0,
      'test/accuracy': 0.6,
      'test_model_ema/accuracy': 0.7,
      'train/sam_sharpness': 0.5,
    },
    {'epoch': 3, 'train/images_per_sec': 20.0, 'train/sam_sharpness': 0.4},
    {
      'epoch': 4,
      'train/images_per_sec': 40.0,
      'test/accuracy': 0.65,
      'test_model_ema/accuracy': 0.68,
      'train_eval/accuracy': 0.98,
      'train/sam_sharpness': 0.3,
    },
  ]
  record = compare.record_of(epochs)
  assert record['test_accuracy'] == 0.65 and record['model_ema_accuracy'] == 0.68
  assert (record['model_ema_best_accuracy'], record['model_ema_best_epoch']) == (0.7, 2)
  assert (record['test_best_accuracy'], record['test_best_epoch']) == (0.65, 4)
  assert record['train_eval_accuracy'] == 0.98 and record['sam_sharpness'] == 0.3
  assert record['test_ema_accuracy'] is None  # Not MESA.
  assert record['median_epoch_images_per_sec'] == 25.0 and record['epochs'] == 4


def test_welch_interval_matches_scipy_t_test():
  a, b = [0.61, 0.63, 0.60], [0.58, 0.585, 0.57]
  w = compare.welch(a, b)
  t, p = stats.ttest_ind(a, b, equal_var=False)
  half = (w['high'] - w['low']) / 2
  assert w['diff'] == pytest.approx(np.mean(a) - np.mean(b))
  assert (w['low'] + w['high']) / 2 == pytest.approx(w['diff'])
  # The interval's half-width is t_{0.975, df} standard errors, the same df as scipy's test.
  se = w['diff'] / t
  assert half / se == pytest.approx(stats.t.ppf(0.975, w['df']))
  assert stats.t.sf(abs(t), w['df']) * 2 == pytest.approx(p)
  assert (w['low'] > 0) == (p < 0.05)
  same = compare.welch([0.5, 0.5], [0.4, 0.4])
  assert same['low'] == same['high'] == pytest.approx(0.1)
  with pytest.raises(ValueError, match='>= 2 values'):
    compare.welch([0.5], [0.4, 0.4])


def test_tables_give_each_difference_to_the_first_method():
  base = [_record(s, acc, 1.0) | {'method': 'sgd'} for s, acc in enumerate((0.50, 0.52, 0.51))]
  saf = [_record(s, acc, 1.0) | {'method': 'saf'} for s, acc in enumerate((0.53, 0.55, 0.54))]
  text = compare.tables(
    [compare.summarize(base), compare.summarize(saf)], {'sgd': base, 'saf': saf}
  )
  assert '| saf | 0.5400 ± 0.0100 |' in text
  half = stats.t.ppf(0.975, 4) * np.sqrt(2 * 0.01**2 / 3) * 100
  assert f'| saf − sgd | +3.00 | [{3 - half:+.2f}, {3 + half:+.2f}] |' in text


def test_plot_comparison_averages_seeds_at_common_epochs(tmp_path):
  runs = [
    [{'epoch': 1, 'test/accuracy': 0.2}, {'epoch': 2, 'test/accuracy': 0.4}],
    [{'epoch': 2, 'test/accuracy': 0.6}, {'epoch': 3, 'test/accuracy': 0.9}],
  ]
  epochs, mean, std = plots.mean_over_seeds(runs, 'test/accuracy')
  assert epochs == [2]
  np.testing.assert_allclose(mean, [0.5])
  np.testing.assert_allclose(std, [np.std([0.4, 0.6], ddof=1)])
  path = tmp_path / 'compare.png'
  plots.plot_comparison({'sgd': runs, 'saf': runs[:1]}, str(path))
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

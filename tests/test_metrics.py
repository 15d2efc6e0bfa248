"""The metric records: the best epoch's top-1 next to the final one, and metrics.jsonl."""

import json
import os

from saf_jax import metrics


def test_best_accuracy_is_the_first_epoch_that_reached_the_highest_top1():
  best = {}
  epochs = [
    {'epoch': 1, 'test/accuracy': 0.5, 'test_ema/accuracy': 0.4},
    {'epoch': 2, 'test/accuracy': 0.7},  # The teacher is not evaluated every epoch here.
    {'epoch': 3, 'test/accuracy': 0.7, 'test_ema/accuracy': 0.6},  # A tie keeps epoch 2.
    {'epoch': 4, 'test/accuracy': 0.6, 'test_ema/accuracy': float('nan')},
    {'epoch': 5},  # Not evaluated: nothing added.
  ]
  for record in epochs:
    metrics.add_best(record, best)
  assert [(r.get('test/best_accuracy'), r.get('test/best_epoch')) for r in epochs] == [
    (0.5, 1),
    (0.7, 2),
    (0.7, 2),
    (0.7, 2),
    (None, None),
  ]
  assert [r.get('test_ema/best_epoch') for r in epochs] == [1, None, 3, 3, None]
  assert 'test_model_ema/best_accuracy' not in epochs[0]
  assert best == {'test': (0.7, 2), 'test_ema': (0.6, 3)}


def test_a_resumed_run_rebuilds_the_best_from_its_records(tmp_path):
  records = [{'epoch': e, 'test/accuracy': a} for e, a in ((1, 0.3), (2, 0.8), (3, 0.5))]
  with open(os.path.join(tmp_path, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
    f.write('{"epoch": 4, "test/acc')  # A line cut short by a kill.
  kept = metrics.read_records(str(tmp_path), up_to_epoch=2)
  assert kept == records[:2]
  assert metrics.best_of(kept) == {'test': (0.8, 2)}
  assert metrics.best_of(metrics.read_records(str(tmp_path))) == {'test': (0.8, 2)}
  assert metrics.read_records(str(tmp_path / 'nothing')) == []
  writer = metrics.JsonlWriter(str(tmp_path), keep_epochs_up_to=1)
  writer.write({'epoch': 2, 'test/accuracy': 0.25})
  assert metrics.read_records(str(tmp_path)) == [records[0], {'epoch': 2, 'test/accuracy': 0.25}]

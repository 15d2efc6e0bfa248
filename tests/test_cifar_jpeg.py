"""Real CIFAR-10 from the JPEG archive: archives, the decode cache, balanced subsets, budget=cpu."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from configs import cifar
from saf_jax import data
from saf_jax.data import folder as image_folder

from .conftest import REPO_ROOT

pytestmark = pytest.mark.usefixtures('fast_compile')

CLASSES = ('cat', 'ant', 'bee')  # Written unsorted: labels follow sorted names.


def _png(pixels):
  return tf.io.encode_png(tf.constant(pixels, tf.uint8)).numpy()


def _write_folder(root, per_class=(5, 2)):
  """Class c's image j is filled with 20 * (label of c) + j."""
  for split, count in zip(('train', 'test'), per_class, strict=True):
    for name in CLASSES:
      label = sorted(CLASSES).index(name)
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for j in range(count):
        with open(os.path.join(root, split, name, f'img{j}.png'), 'wb') as f:
          f.write(_png(np.full((6, 6, 3), 20 * label + j, np.uint8)))
  return str(root)


def _tar(folder, path, prefix='data'):
  with tarfile.open(path, 'w:gz') as archive:
    archive.add(folder, arcname=prefix)
  return str(path)


def _load(root, cache_dir, train=-1, test=-1):
  return image_folder.load(
    root, image_size=-1, num_train_examples=train, num_test_examples=test, cache_dir=cache_dir
  )


def test_an_archive_gives_the_folder_s_examples_and_is_decoded_once(tmp_path, monkeypatch):
  folder = _write_folder(tmp_path / 'folder')
  archive = _tar(folder, tmp_path / 'data.tar.gz')
  from_folder = _load(folder, str(tmp_path / 'unused'))
  from_archive = _load(archive, str(tmp_path / 'cache'))
  assert from_archive[2] == from_folder[2] == ['ant', 'bee', 'cat']
  for split in (0, 1):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(from_archive[split][key], from_folder[split][key])
  # Ids follow (sorted class, sorted file): train example 5k + j is class k's img{j}.
  np.testing.assert_array_equal(
    from_archive[0]['image'][:, 0, 0, 0], np.repeat([0, 20, 40], 5) + np.tile(range(5), 3)
  )
  (cached,) = os.listdir(tmp_path / 'cache')
  assert cached.startswith('data.tar.gz.') and cached.endswith('.size-1.v1.npz')

  # A second load reads the cache: decoding would fail now.
  def no_decode(*args):
    raise AssertionError('decoded again')

  monkeypatch.setattr(image_folder, '_decode', no_decode)
  again = _load(archive, str(tmp_path / 'cache'), train=6)
  np.testing.assert_array_equal(again[0]['label'], [0, 0, 1, 1, 2, 2])
  # A changed archive has another content hash, so it is decoded again.
  with open(os.path.join(folder, 'train', 'ant', 'img9.png'), 'wb') as f:
    f.write(_png(np.zeros((6, 6, 3), np.uint8)))
  _tar(folder, tmp_path / 'data.tar.gz')
  with pytest.raises(AssertionError, match='decoded again'):
    _load(archive, str(tmp_path / 'cache'))


def test_subsets_are_class_balanced_and_keep_the_first_files_of_each_class(tmp_path):
  folder = _write_folder(tmp_path / 'folder')
  train, test, _ = _load(folder, '', train=7, test=3)
  # 7 over 3 classes: 3, 2, 2 (the remainder goes to the first classes), first files kept.
  np.testing.assert_array_equal(train['label'], [0, 0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(train['image'][:, 0, 0, 0], [0, 1, 2, 20, 21, 40, 41])
  np.testing.assert_array_equal(test['label'], [0, 1, 2])
  labels = np.repeat(np.arange(10), [5] * 9 + [2])
  assert len(image_folder.balanced_subset(labels, 20, 10, 'num_train_examples')) == 20
  with pytest.raises(
    ValueError,
    match=r'num_train_examples=30 takes 3 examples of class 9 .* has only 2; use at most 29',
  ):
    image_folder.balanced_subset(labels, 30, 10, 'num_train_examples')
  # 29 works: 3 of each of the classes 0-8 and the 2 of class 9.
  assert len(image_folder.balanced_subset(labels, 29, 10, 'num_train_examples')) == 29
  with pytest.raises(ValueError, match='num_test_examples=99 but the split has only 47'):
    image_folder.balanced_subset(labels, 99, 10, 'num_test_examples')


def test_bad_archives_are_refused_with_the_path(tmp_path):
  with pytest.raises(ValueError, match=r'no/such.tar.gz does not exist'):
    _load(str(tmp_path / 'no/such.tar.gz'), str(tmp_path))
  bad = tmp_path / 'bad.tar.gz'
  bad.write_bytes(b'not an archive')
  with pytest.raises(ValueError, match='Cannot read the archive .*bad.tar.gz'):
    _load(str(bad), str(tmp_path))
  folder = _write_folder(tmp_path / 'folder')
  with tarfile.open(tmp_path / 'no_test.tar', 'w') as archive:
    archive.add(os.path.join(folder, 'train'), arcname='x/train')
  with pytest.raises(ValueError, match=r'no_test.tar:test is not a directory'):
    _load(str(tmp_path / 'no_test.tar'), str(tmp_path))


def test_train_split_evaluation_covers_every_example_once_unaugmented(tmp_path):
  config = cifar.get_config('budget=cpu')
  config.input.dataset = f'folder:{_write_folder(tmp_path / "folder")}'
  config.input.num_train_examples = config.input.num_test_examples = -1
  config.input.data_dir = str(tmp_path)
  datasets = data.create_datasets(config.input, seed=0)
  batches = list(datasets.test_batches(batch_size=4, split='train'))
  assert len(batches) == 4  # 15 examples, the last batch padded.
  mask = np.concatenate([b['mask'] for b in batches]).astype(bool)
  np.testing.assert_array_equal(np.concatenate([b['index'] for b in batches])[mask], range(15))
  images = np.concatenate([b['image'] for b in batches])[mask]
  pixels = images[:, 0, 0, 0] * datasets._std.numpy()[0] + datasets._mean.numpy()[0]
  np.testing.assert_allclose(
    pixels * 255, np.repeat([0, 20, 40], 5) + np.tile(range(5), 3), atol=1e-3
  )


def test_budget_config_scales_the_paper_s_epochs_and_ema_horizons():
  config = cifar.get_config('budget=cpu,method=mesa')
  epochs = config.num_epochs
  steps = epochs * config.input.num_train_examples // config.input.batch_size
  assert config.input.dataset == f'folder:{cifar.CIFAR10_JPEG}'
  assert config.input.num_train_examples % 10 == 0  # Balanced, and batch 128 drops nothing.
  assert config.input.num_train_examples % config.input.batch_size == 0
  # E_start, E_tilde: the paper's 5 and 3 of 200 epochs, as the same fraction of this run.
  assert config.method.saf.E_start == round(5 * epochs / 200) == config.method.mesa.E_start
  assert config.method.saf.E_tilde == max(1, round(3 * epochs / 200))
  # EMA horizons 1 / (1 - beta): the same fraction of all steps as 0.9995 / 0.9998 over 78,200.
  for decay, paper in ((config.method.mesa.ema_decay, 0.9995), (config.eval.ema_decay, 0.9998)):
    assert 1 / (1 - decay) == pytest.approx(steps / 78_200 / (1 - paper), rel=0.01)
  # Table 4's values.
  assert (config.optimizer.lr, config.optimizer.weight_decay, config.input.batch_size) == (
    0.05,
    5e-4,
    128,
  )
  assert (config.method.saf.lam, config.method.mesa.lam, config.method.sam.rho) == (0.3, 0.8, 0.05)
  assert config.eval.train_accuracy
  with pytest.raises(ValueError, match='data=jpeg reads CIFAR-10 only'):
    cifar.get_config('dataset=cifar100,data=jpeg')
  assert cifar.get_config('data=jpeg').input.dataset == f'folder:{cifar.CIFAR10_JPEG}'
  assert cifar.get_config('').input.dataset == 'cifar10'


@pytest.mark.skipif(not os.path.exists(cifar.CIFAR10_JPEG), reason='no ../shared/data archive')
def test_main_trains_on_a_real_slice_of_the_cifar10_archive(tmp_path):
  """300 train and 100 test JPEGs of the real archive, end to end through main.py."""
  counts = {}
  with (
    tarfile.open(cifar.CIFAR10_JPEG) as src,
    tarfile.open(tmp_path / 'slice.tar.gz', 'w:gz') as dst,
  ):
    for member in src:
      parts = member.name.split('/')
      if member.isfile() and len(parts) == 4:
        key = (parts[1], parts[2])
        counts[key] = counts.get(key, 0) + 1
        if counts[key] <= (30 if parts[1] == 'train' else 10):
          data = src.extractfile(member).read()
          dst.addfile(member, io.BytesIO(data))
  workdir = tmp_path / 'run'
  cmd = [
    sys.executable,
    os.path.join(REPO_ROOT, 'main.py'),
    '--config=configs/cifar.py:budget=cpu,method=saf',
    f'--workdir={workdir}',
    f'--config.input.dataset=folder:{tmp_path / "slice.tar.gz"}',
    f'--config.input.data_dir={tmp_path / "data_dir"}',
    '--config.input.num_train_examples=256',  # Class-balanced: 26 or 25 of each class.
    '--config.input.num_test_examples=-1',
    '--config.input.batch_size=64',
    '--config.model.width=8',
    '--config.num_epochs=3',
    '--config.eval.every_epochs=1',
    '--config.analysis.sharpness_every_epochs=1',
    '--config.analysis.sharpness_num_batches=2',
  ]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['epoch'] for r in records] == [1, 2, 3]
  final = records[-1]
  # E_start = 2 and E_tilde = 1 (the budget's 64 epochs): epoch 3 reads epoch 2's logits.
  assert [r['train/trajectory_active'] for r in records] == [0, 0, 1]
  assert final['train/table_valid_fraction'] == 1.0 and final['train/trajectory_loss'] > 0
  for key in ('test/accuracy', 'test_model_ema/accuracy', 'train_eval/accuracy'):
    assert 0.0 <= final[key] <= 1.0
  # The 100 test and 256 train examples are each counted once, in whole hundredths/256ths.
  assert round(final['test/accuracy'] * 100, 6).is_integer()
  assert round(final['train_eval/accuracy'] * 256, 6).is_integer()
  assert final['train/sam_sharpness'] > 0
  assert 'train_eval/accuracy=' in proc.stdout
  (cached,) = os.listdir(tmp_path / 'data_dir' / image_folder.CACHE_DIR)
  assert cached.startswith('slice.tar.gz.')


def test_a_folder_smaller_than_one_batch_names_the_batch_and_the_examples(tmp_path):
  from saf_jax import train

  config = cifar.get_config('budget=cpu')
  config.input.dataset = f'folder:{_write_folder(tmp_path / "folder")}'
  config.input.num_train_examples = config.input.num_test_examples = -1
  with pytest.raises(ValueError, match=r'batch_size=128 is larger than the 15 training examples'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'config.json')


def _tiny_run(tmp_path, **eval_fields):
  config = cifar.get_config('budget=cpu,method=saf')
  config.input.dataset = f'folder:{_write_folder(tmp_path / "folder", per_class=(8, 2))}'
  config.input.num_train_examples = config.input.num_test_examples = -1
  config.input.batch_size = config.input.eval_batch_size = 8
  config.model.width = 4
  config.num_epochs = 3
  config.analysis.sharpness_every_epochs = 0
  config.eval.every_epochs = config.checkpoint.every_epochs = 1
  for key, value in eval_fields.items():
    config.eval[key] = value
  return config


def test_the_model_ema_resumes_exactly_and_off_it_leaves_the_checkpoint_format_alone(tmp_path):
  from saf_jax import checkpoint, train

  config = _tiny_run(tmp_path, ema_decay=0.5)
  first = train.train_and_evaluate(config, str(tmp_path / 'a'))
  straight = first.record
  assert (first.status, first.epoch, first.step) == (train.FINISHED, 3, straight['step'])
  assert first.batches_done * 3 == first.step
  again = train.train_and_evaluate(config, str(tmp_path / 'a'))  # Nothing left to train.
  assert (again.status, again.step, again.record) == (train.ALREADY_DONE, first.step, {})
  # Resume from epoch 2: drop epoch 3's checkpoint (its metrics line is rewritten).
  train.train_and_evaluate(config, str(tmp_path / 'b'))
  steps = checkpoint.saved_steps(str(tmp_path / 'b'))
  shutil.rmtree(tmp_path / 'b' / 'checkpoints' / str(steps[-1]))
  resumed = train.train_and_evaluate(config, str(tmp_path / 'b')).record
  assert resumed['test_model_ema/loss'] == straight['test_model_ema/loss']
  assert resumed['test_model_ema/accuracy'] == straight['test_model_ema/accuracy']

  # With the model EMA, the saved state has its keys; without it, the tree of earlier
  # versions (no model_ema keys), so their checkpoints still restore.
  def metadata(workdir):
    step = checkpoint.saved_steps(workdir)[-1]
    return (tmp_path / workdir / 'checkpoints' / str(step) / 'state' / '_METADATA').read_text()

  assert 'model_ema_params' in metadata(str(tmp_path / 'b'))
  off = _tiny_run(tmp_path, ema_decay=0.0)
  off.num_epochs = 1
  record = train.train_and_evaluate(off, str(tmp_path / 'c')).record
  assert 'test_model_ema/accuracy' not in record
  assert 'model_ema' not in metadata(str(tmp_path / 'c'))
  assert 'ema_params' in metadata(str(tmp_path / 'c'))  # The old tree's keys.


def test_a_preempted_call_returns_where_it_stopped_and_a_rerun_finishes(tmp_path, monkeypatch):
  from saf_jax import resume, train

  config = _tiny_run(tmp_path)
  workdir = str(tmp_path / 'run')

  def requested(self, step):  # SIGTERM arrives during the first step.
    self.signal_received = True
    return True

  with monkeypatch.context() as patch:
    patch.setattr(resume.Preemption, 'requested', requested)
    stopped = train.train_and_evaluate(config, workdir)
  assert (stopped.status, stopped.step, stopped.epoch) == (train.PREEMPTED, 1, 1)
  assert (stopped.batches_done, stopped.record) == (1, {})  # Mid-epoch: no record yet.
  done = train.train_and_evaluate(config, workdir)
  assert (done.status, done.epoch, done.record['epoch']) == (train.FINISHED, 3, 3)
  assert done.step == 3 * done.batches_done

"""Custom image folders, ``config.input.dataset = 'folder:/path'``, on a folder the test writes."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from configs import default
from saf_jax import data, train
from saf_jax.data import folder as image_folder

pytestmark = pytest.mark.usefixtures('fast_compile')

CLASSES = ('cat', 'ant', 'bee')  # Written unsorted: labels follow sorted names.


def _write(path, pixels):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  encode = tf.io.encode_png if path.endswith('.png') else tf.io.encode_jpeg
  tf.io.write_file(path, encode(tf.constant(pixels, tf.uint8)))


def _folder(root, *, per_class=(4, 2), size=12, test_classes=CLASSES):
  """Class c's image j is filled with 20 * (label of c) + j; sizes vary unless fixed."""
  for split, count in zip(('train', 'test'), per_class, strict=True):
    for name in CLASSES if split == 'train' else test_classes:
      label = sorted(CLASSES).index(name)
      for j in range(count):
        side = size + (j % 2) * 4
        pixels = np.full((side, side, 3), 20 * label + j, np.uint8)
        _write(os.path.join(root, split, name, f'img{j}.png'), pixels)
  return str(root)


def _input(root, **fields):
  config = default.get_config('method=saf,smoke')
  config.input.dataset = f'folder:{root}'
  config.input.num_train_examples = -1
  config.input.num_test_examples = -1
  for key, value in fields.items():
    config.input[key] = value
  return config


def test_labels_follow_sorted_class_names_and_ids_are_stable(tmp_path):
  root = _folder(tmp_path / 'data')
  config = _input(root, image_size=8)
  datasets = data.create_datasets(config.input, seed=0)
  assert image_folder.folder_classes(root) == ['ant', 'bee', 'cat']
  info = datasets.info
  assert (info.num_train, info.num_test, info.num_classes) == (12, 6, 3)
  assert info.image_shape == (8, 8, 3)
  # Ids follow (sorted class, sorted file): example 4 * k + j is class k's img{j}.
  images = datasets._train_images.numpy()
  labels = datasets._train_labels.numpy()
  np.testing.assert_array_equal(labels, np.repeat([0, 1, 2], 4))
  for i in range(12):  # Constant images stay constant through the resize.
    assert np.all(images[i] == 20 * (i // 4) + i % 4)
  batch = next(datasets.train_epoch(1, batch_size=12))
  assert sorted(batch['index']) == list(range(12))


def test_images_of_several_sizes_need_image_size(tmp_path):
  root = _folder(tmp_path / 'data')
  with pytest.raises(ValueError, match='set config.input.image_size to resize every image'):
    data.create_datasets(_input(root).input, seed=0)


@pytest.mark.parametrize('damage', ['empty_class', 'unreadable', 'test_only_class', 'no_test'])
def test_bad_folders_are_refused_with_the_path(tmp_path, damage):
  root = _folder(tmp_path / 'data', size=8)
  if damage == 'empty_class':
    os.makedirs(os.path.join(root, 'test', 'dog'))
    match = r'Class folder .*test/dog holds no image'
  elif damage == 'unreadable':
    with open(os.path.join(root, 'train', 'bee', 'img9.png'), 'w') as f:
      f.write('not a png')
    match = r'Cannot read the image .*train/bee/img9.png'
  elif damage == 'test_only_class':
    _write(os.path.join(root, 'test', 'dog', 'a.jpg'), np.zeros((8, 8, 3), np.uint8))
    match = r"has classes that train does not: \['dog'\]"
  else:
    os.rename(os.path.join(root, 'test'), os.path.join(root, 'val'))
    match = r'needs .*/test/<class>/\*.jpg\|png .* is not a directory'
  with pytest.raises(ValueError, match=match):
    data.create_datasets(_input(root, image_size=8).input, seed=0)


def test_saf_trains_on_a_folder(tmp_path):
  root = _folder(tmp_path / 'data', per_class=(8, 4), size=16)
  config = _input(root, batch_size=8, eval_batch_size=8, image_size=16)
  config.num_epochs = 3
  config.method.saf.E_tilde = 1
  config.analysis.sharpness_every_epochs = 0
  workdir = str(tmp_path / 'run')
  record = train.train_and_evaluate(config, workdir).record
  assert record['epoch'] == 3 and record['train/table_valid_fraction'] == 1.0
  assert 0.0 <= record['test/accuracy'] <= 1.0
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['input']['dataset'] == f'folder:{root}'


@pytest.mark.parametrize('method', ['saf', 'mesa'])
def test_a_folder_that_gains_a_class_is_refused_by_its_workdir(tmp_path, method):
  root = _folder(tmp_path / 'data', per_class=(8, 4), size=16)
  config = _input(root, batch_size=8, eval_batch_size=8, image_size=16)
  config.method.name = method
  config.num_epochs = 1
  config.analysis.sharpness_every_epochs = 0
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  for split in ('train', 'test'):
    for j in range(8):
      _write(os.path.join(root, split, 'dog', f'img{j}.png'), np.zeros((16, 16, 3), np.uint8))
  before = {
    os.path.join(d, n): os.path.getsize(os.path.join(d, n))
    for d, _, names in os.walk(workdir)
    for n in names
  }
  with pytest.raises(ValueError, match=r'has 3 classes, this run has 4 classes: its dataset'):
    train.train_and_evaluate(config, workdir)
  after = {
    os.path.join(d, n): os.path.getsize(os.path.join(d, n))
    for d, _, names in os.walk(workdir)
    for n in names
  }
  assert after == before

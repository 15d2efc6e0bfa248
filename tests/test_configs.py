"""Paper configs: the values of Tables 4-5, and one real training step of each smoke variant.

The smoke runs use ``tfds.testing.mock_data`` (random images of the dataset's shape): only
these tests use mock data; real runs read the real datasets.
"""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import cifar, imagenet
from saf_jax import methods, train, validation

pytestmark = pytest.mark.usefixtures('fast_compile')

# tfds.testing loads its modules lazily, and pytest rewrites the one named test_utils.py on
# import. Done inside a test, deep in a JAX call stack, that compile hit CPython 3.11's
# "AST constructor recursion depth mismatch" SystemError once in CI; load it here instead.
_MOCK_DATA = tfds.testing.mock_data


@pytest.mark.parametrize('dataset', cifar.DATASETS)
@pytest.mark.parametrize('model', cifar.MODELS)
@pytest.mark.parametrize('method', ['sgd', 'sam', 'saf', 'mesa'])
def test_cifar_configs_carry_table_4(dataset, model, method):
  config = cifar.get_config(f'dataset={dataset},model={model},method={method}')
  validation.validate_config(config, num_devices=1, check_input=False)
  assert config.input.dataset == dataset and config.model.name == model
  assert config.method.name == method
  assert (config.num_epochs, config.input.batch_size, config.optimizer.lr) == (200, 128, 0.05)
  assert config.optimizer.schedule == 'cosine' and config.input.augment == 'crop_flip'
  assert config.optimizer.weight_decay == {'wrn28_10': 1e-3}.get(model, 5e-4)
  assert config.method.sam.rho == {'wrn28_10': 0.1, 'pyramidnet110': 0.2}.get(model, 0.05)
  saf, mesa = config.method.saf, config.method.mesa
  assert (saf.lam, saf.tau, saf.E_tilde, saf.E_start) == (0.3, 5.0, 3, 5)
  assert (mesa.lam, mesa.tau, mesa.E_start, mesa.ema_decay) == (0.8, 5.0, 5, 0.9995)
  assert (model, method) in cifar.PAPER_TABLE_3
  assert method in methods.NAMES  # A method the training loop knows.


def test_cifar_config_arguments_are_checked():
  with pytest.raises(ValueError, match=r"dataset must be one of \['cifar10', 'cifar100'\]"):
    cifar.get_config('dataset=svhn')
  with pytest.raises(ValueError, match=r"model must be one of \['resnet18', 'wrn28_10'"):
    cifar.get_config('model=vgg16')
  with pytest.raises(ValueError, match='allowed: dataset=<name>, model=<name>'):
    cifar.get_config('epochs=3')


@pytest.mark.parametrize('model', imagenet.MODELS)
@pytest.mark.parametrize('method', ['sgd', 'sam', 'saf', 'mesa'])
def test_imagenet_configs_carry_table_5(model, method):
  config = imagenet.get_config(f'model={model},method={method}')
  validation.validate_config(config, num_devices=8, check_input=True)
  vit = model == 'vit_s32'
  assert config.input.dataset == 'imagenet2012' and config.model.name == model
  assert config.input.augment == 'inception_crop' and config.input.image_size == 224
  assert config.input.batch_size == 4096 and config.optimizer.schedule == 'cosine'
  assert config.num_epochs == (300 if vit else 90) and config.label_smoothing == 0.1
  optimizer = config.optimizer
  if vit:
    assert (optimizer.name, optimizer.lr, optimizer.weight_decay) == ('adamw', 3e-3, 0.3)
    assert (optimizer.b1, optimizer.b2) == (0.9, 0.999)
  else:
    wd = 1e-4 if model == 'resnet50' and method in ('saf', 'mesa') else 3e-5
    assert (optimizer.name, optimizer.lr, optimizer.weight_decay) == ('sgd', 1.4, wd)
    assert optimizer.momentum == 0.9
  saf, mesa = config.method.saf, config.method.mesa
  e_start = 150 if vit else 10
  assert (saf.lam, saf.tau, saf.E_tilde, saf.E_start) == (0.3, 5.0, 3, e_start)
  assert (mesa.lam, mesa.tau, mesa.E_start, mesa.ema_decay) == (0.3, 5.0, e_start, 0.9998)
  assert config.method.sam.rho == 0.05
  assert (model, 'sgd') in imagenet.PAPER_TABLE_1 and (model, 'sam') in imagenet.PAPER_TABLE_1


def test_imagenet_config_arguments_are_checked():
  with pytest.raises(ValueError, match=r"model must be one of \['resnet50', 'resnet101'"):
    imagenet.get_config('model=resnet18')
  with pytest.raises(ValueError, match='allowed: model=<name>, method=<name>, smoke'):
    imagenet.get_config('dataset=cifar10')


@pytest.mark.parametrize(
  'config_module, arg, dataset',
  [
    (cifar, 'dataset=cifar10,model=resnet18,method=saf', 'cifar10'),
    (cifar, 'dataset=cifar100,model=wrn28_10,method=mesa', 'cifar100'),
    (cifar, 'dataset=cifar10,model=pyramidnet110,method=sam', 'cifar10'),
    (imagenet, 'model=resnet50,method=saf', 'imagenet2012'),
    (imagenet, 'model=resnet101,method=sam', 'imagenet2012'),
    (imagenet, 'model=resnet152,method=sgd', 'imagenet2012'),
    (imagenet, 'model=vit_s32,method=mesa', 'imagenet2012'),
  ],
)
def test_smoke_config_trains_one_step(config_module, arg, dataset, tmp_path):
  config = config_module.get_config(f'{arg},smoke')
  workdir = str(tmp_path / 'run')
  with _MOCK_DATA(num_examples=4):
    record = train.train_and_evaluate(config, workdir).record
  method = config.method.name
  assert record['step'] == 1
  assert record['train/trajectory_active'] == int(method in ('saf', 'mesa'))
  assert ('test_ema/accuracy' in record) == (method == 'mesa')
  # The step's own loss is finite. The test loss after one step on 4 examples may not be:
  # BatchNorm over 4 rows at 1x1 pixels in the last stage gives huge gradients.
  assert np.isfinite(record['train/loss'])
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  assert (saved['model']['name'], saved['input']['dataset']) == (config.model.name, dataset)

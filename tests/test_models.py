"""Tests for the model registry, the CNN and the CIFAR ResNets."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saf_jax import models
from saf_jax.models import cnn, resnet

pytestmark = pytest.mark.usefixtures('fast_compile')


def _param_shapes(model, input_shape):
  """Parameter tree of ``model`` as ShapeDtypeStructs, without running the init."""
  images = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)


def _cnn_param_count(width, channels, num_classes):
  """Hand count of ``cnn.CNN``: four bias-free 3x3 convs, four BNs, a two-layer MLP head."""
  w, c, k = width, channels, num_classes
  convs = 9 * c * w + 9 * w * w + 9 * w * (2 * w) + 9 * (2 * w) * (2 * w)
  bns = 2 * (w + w + 2 * w + 2 * w)  # scale and bias
  head = (2 * w * 4 * w + 4 * w) + (4 * w * k + k)
  return convs + bns + head


def test_registry_names():
  assert sorted(models.MODELS) == ['cnn', 'resnet18']


def test_resnet18_param_count():
  model = models.get_model('resnet18', num_classes=10)
  variables = _param_shapes(model, (1, 32, 32, 3))
  # The PyTorch CIFAR ResNet-18 count; running statistics are not parameters.
  assert models.count_params(variables['params']) == 11_173_962


@pytest.mark.parametrize(
  'width, input_shape, num_classes',
  [(None, (1, 28, 28, 1), 10), (8, (1, 28, 28, 1), 10), (5, (1, 32, 32, 3), 7)],
)
def test_cnn_param_count(width, input_shape, num_classes):
  kwargs = {} if width is None else {'width': width}
  model = models.get_model('cnn', num_classes=num_classes, **kwargs)
  variables = _param_shapes(model, input_shape)
  expected = _cnn_param_count(model.width, input_shape[-1], num_classes)
  assert models.count_params(variables['params']) == expected


@pytest.mark.parametrize('height, width', [(4, 6), (5, 7)])
def test_cnn_max_pool_matches_numpy(height, width):
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, height, width, 3)))
  cropped = x[:, : height // 2 * 2, : width // 2 * 2]
  expected = cropped.reshape(2, height // 2, 2, width // 2, 2, 3).max(axis=(2, 4))
  np.testing.assert_array_equal(cnn._max_pool_2x2(jnp.asarray(x)), expected)


def test_cnn_default_param_count_matches_docstring():
  variables = _param_shapes(models.get_model('cnn', num_classes=10), (1, 28, 28, 1))
  count = models.count_params(variables['params'])
  assert f'{count:,} parameters' in cnn.__doc__


@pytest.mark.parametrize('name', sorted(models.MODELS))
@pytest.mark.parametrize('input_shape', [(2, 28, 28, 1), (2, 32, 32, 3)])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_output_shape_and_dtypes(name, input_shape, dtype):
  model = models.get_model(name, num_classes=7, dtype=dtype)
  variables = _param_shapes(model, input_shape)
  images = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  logits, updates = jax.eval_shape(
    lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']), variables, images
  )
  assert logits.shape == (2, 7)
  assert logits.dtype == jnp.float32
  param_dtypes = {leaf.dtype for leaf in jax.tree.leaves(variables['params'])}
  assert param_dtypes == {jnp.dtype(jnp.float32)}
  assert jax.tree.structure(updates['batch_stats']) == jax.tree.structure(variables['batch_stats'])


# Small instances of each architecture: same code paths, fast to compile.
_SMALL_MODELS = {
  'cnn': (lambda: cnn.CNN(num_classes=3, width=4), 'conv0_0', 'bn0_0'),
  'resnet': (lambda: resnet._ResNetTiny(num_classes=3), 'stem_conv', 'stem_bn'),
}


@pytest.mark.parametrize('arch', sorted(_SMALL_MODELS))
def test_batch_stats_update_only_in_train(arch):
  make_model, conv_name, bn_name = _SMALL_MODELS[arch]
  model = make_model()
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3)) + 3.0
  variables = model.init(jax.random.key(0), images, train=False)

  # Eval reads running statistics and runs with nothing mutable.
  eval_logits = model.apply(variables, images, train=False, mutable=False)
  assert eval_logits.shape == (2, 3)
  assert np.all(np.isfinite(eval_logits))

  # Training must be allowed to write batch_stats.
  with pytest.raises(flax.errors.ModifyScopeVariableError):
    model.apply(variables, images, train=True, mutable=False)

  logits, updates = model.apply(
    variables,
    images,
    train=True,
    mutable=['batch_stats', 'intermediates'],
    capture_intermediates=lambda module, _: module.name == conv_name,
  )
  assert logits.dtype == jnp.float32
  (pre_bn,) = updates['intermediates'][conv_name]['__call__']  # [B, H, W, C]
  new_stats = updates['batch_stats'][bn_name]
  # Flax momentum 0.9 == PyTorch momentum 0.1: new = 0.9 * old + 0.1 * batch statistic,
  # starting from mean 0 and var 1.
  np.testing.assert_allclose(
    new_stats['mean'], 0.1 * jnp.mean(pre_bn, axis=(0, 1, 2)), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    new_stats['var'], 0.9 + 0.1 * jnp.var(pre_bn, axis=(0, 1, 2)), rtol=1e-5, atol=1e-6
  )
  # Every BatchNorm moved away from its init.
  for old, new in zip(
    jax.tree.leaves(variables['batch_stats']),
    jax.tree.leaves(updates['batch_stats']),
    strict=True,
  ):
    assert not np.allclose(old, new)


def test_get_model_unknown_name():
  with pytest.raises(ValueError, match='config.model.name') as excinfo:
    models.get_model('vgg', num_classes=10)
  message = str(excinfo.value)
  assert "'vgg'" in message
  assert "['cnn', 'resnet18']" in message

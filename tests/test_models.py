"""Tests for the model registry and every registered architecture."""

import math
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saf_jax import models, train_steps
from saf_jax.models import cnn, pyramidnet, resnet, vit, wide_resnet

pytestmark = pytest.mark.usefixtures('fast_compile')

# Input of the compute tests: batch 2, CIFAR-sized except ViT-S/32, which needs whole
# 32x32 patches (64x64: 2x2 patches + the class token). The ImageNet ResNets reach their
# last stage at 1x1 from 32x32, which runs every layer.
_INPUT_SHAPES = {'vit_s32': (2, 64, 64, 3)}
_DEFAULT_INPUT_SHAPE = (2, 32, 32, 3)
_NO_BATCHNORM = {'vit_s32'}


def _param_shapes(model, input_shape):
  """Variables of ``model`` as ShapeDtypeStructs, without running the init."""
  images = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)


def _numpy_variables(model, input_shape, seed=0):
  """Init-like variables drawn with NumPy, skipping the compile of ``model.init``.

  Compiling ``init`` takes ~20 s for PyramidNet-110 and ResNet-152 on 2 CPU cores; it runs
  for real on the small models of ``test_batch_stats_update_only_in_train``. Kernels are
  He-normal on their leading (fan-in) axes, BatchNorm and LayerNorm scales 1, biases and
  running means 0, running variances 1.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ('scale', 'var'):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name in ('bias', 'mean'):
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = math.prod(leaf.shape[:-1])
    return jnp.asarray(rng.normal(0.0, math.sqrt(2 / fan_in), leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, _param_shapes(model, input_shape))


def _cnn_param_count(width, channels, num_classes):
  """Hand count of ``cnn.CNN``: four bias-free 3x3 convs, four BNs, a two-layer MLP head."""
  w, c, k = width, channels, num_classes
  convs = 9 * c * w + 9 * w * w + 9 * w * (2 * w) + 9 * (2 * w) * (2 * w)
  bns = 2 * (w + w + 2 * w + 2 * w)  # scale and bias
  head = (2 * w * 4 * w + 4 * w) + (4 * w * k + k)
  return convs + bns + head


def _wrn_param_count(depth, widen_factor, num_classes, width=16):
  """Hand count of a CIFAR WRN: bias-free convs, BN scale and bias, 1x1 projections."""
  blocks_per_stage = (depth - 4) // 6
  total = 9 * 3 * width  # stem conv3x3, 3 input channels
  c_in = width
  for stage in range(3):
    f = width * widen_factor * 2**stage
    for _ in range(blocks_per_stage):
      total += 2 * c_in + 9 * c_in * f  # bn1, conv1
      total += 2 * f + 9 * f * f  # bn2, conv2
      if c_in != f:  # First block of a stage (also the strided ones).
        total += c_in * f  # 1x1 projection shortcut
      c_in = f
  return total + 2 * c_in + (c_in * num_classes + num_classes)  # final BN, head


def _pyramidnet_param_count(widths, bottleneck, num_classes, width=16):
  """Hand count of a PyramidNet: its shortcuts (avg-pool, zero channels) have no parameters."""
  total = 9 * 3 * width + 2 * width  # stem conv3x3 and BN
  c_in = width
  for d in widths:
    if bottleneck:
      # bn1, conv1x1, bn2, conv3x3, bn3, conv1x1 to 4d, bn4.
      total += 2 * c_in + c_in * d + 2 * d + 9 * d * d + 2 * d + d * 4 * d + 2 * 4 * d
      c_in = 4 * d
    else:
      # bn1, conv3x3, bn2, conv3x3, bn3.
      total += 2 * c_in + 9 * c_in * d + 2 * d + 9 * d * d + 2 * d
      c_in = d
  return total + 2 * c_in + (c_in * num_classes + num_classes)  # final BN, head


def _vit_param_count(num_classes, image_size=224, patch=32, d=384, depth=12, mlp=1536):
  """Hand count of a ViT: patch conv, class token, position embedding, blocks, head."""
  tokens = (image_size // patch) ** 2 + 1
  embedding = patch * patch * 3 * d + d
  block = (
    2 * d  # norm1
    + 3 * (d * d + d)  # query, key, value
    + (d * d + d)  # attention output
    + 2 * d  # norm2
    + (d * mlp + mlp)  # mlp_fc1
    + (mlp * d + d)  # mlp_fc2
  )
  return embedding + d + tokens * d + depth * block + 2 * d + (d * num_classes + num_classes)


# Hand-derived PyramidNet-110 (alpha 270) block widths d_b = round(16 + b * alpha / N): the
# reference rounds with Python 3's round (half to even); alpha / N = 270 / 36 = 7.5 makes
# every other bottleneck width a half-integer (23.5 -> 24, 38.5 -> 38, ...). Basic blocks
# widen by 270 / 54 = 5 exactly.
_PYRAMID_BOTTLENECK_WIDTHS = [round(16 + 7.5 * b) for b in range(1, 37)]
_PYRAMID_BASIC_WIDTHS = [16 + 5 * b for b in range(1, 55)]


def test_registry_names():
  assert sorted(models.MODELS) == [
    'cnn',
    'pyramidnet110',
    'resnet101',
    'resnet152',
    'resnet18',
    'resnet50',
    'vit_s32',
    'wrn28_10',
  ]


def test_hand_counts_of_the_papers_models():
  # The hand formulas reproduce the published counts before they are compared with Flax.
  assert _wrn_param_count(28, 10, 10) == 36_479_194  # common PyTorch WRN-28-10
  assert _wrn_param_count(28, 10, 100) == 36_536_884
  assert _vit_param_count(1000) == 22_878_952  # timm vit_small_patch32_224
  assert _PYRAMID_BOTTLENECK_WIDTHS[:6] == [24, 31, 38, 46, 54, 61]
  assert _PYRAMID_BOTTLENECK_WIDTHS[-1] == _PYRAMID_BASIC_WIDTHS[-1] == 16 + 270
  assert _pyramidnet_param_count(_PYRAMID_BOTTLENECK_WIDTHS, True, 10) == 18_323_787
  assert _pyramidnet_param_count(_PYRAMID_BOTTLENECK_WIDTHS, True, 100) == 18_426_837
  assert _pyramidnet_param_count(_PYRAMID_BASIC_WIDTHS, False, 10) == 28_485_477
  assert _pyramidnet_param_count(_PYRAMID_BASIC_WIDTHS, False, 100) == 28_511_307


@pytest.mark.parametrize(
  'name, kwargs, num_classes, input_shape, expected',
  [
    # The PyTorch CIFAR ResNet-18 count; running statistics are not parameters.
    ('resnet18', {}, 10, (1, 32, 32, 3), 11_173_962),
    ('resnet18', {}, 100, (1, 32, 32, 3), 11_220_132),
    ('wrn28_10', {}, 10, (1, 32, 32, 3), _wrn_param_count(28, 10, 10)),
    ('wrn28_10', {}, 100, (1, 32, 32, 3), _wrn_param_count(28, 10, 100)),
    (
      'pyramidnet110',
      {},
      10,
      (1, 32, 32, 3),
      _pyramidnet_param_count(_PYRAMID_BOTTLENECK_WIDTHS, True, 10),
    ),
    (
      'pyramidnet110',
      {},
      100,
      (1, 32, 32, 3),
      _pyramidnet_param_count(_PYRAMID_BOTTLENECK_WIDTHS, True, 100),
    ),
    (
      'pyramidnet110',
      {'bottleneck': False},
      10,
      (1, 32, 32, 3),
      _pyramidnet_param_count(_PYRAMID_BASIC_WIDTHS, False, 10),
    ),
    (
      'pyramidnet110',
      {'bottleneck': False},
      100,
      (1, 32, 32, 3),
      _pyramidnet_param_count(_PYRAMID_BASIC_WIDTHS, False, 100),
    ),
    # torchvision's resnet50 / resnet101 / resnet152.
    ('resnet50', {}, 1000, (1, 224, 224, 3), 25_557_032),
    ('resnet101', {}, 1000, (1, 224, 224, 3), 44_549_160),
    ('resnet152', {}, 1000, (1, 224, 224, 3), 60_192_808),
    ('vit_s32', {}, 1000, (1, 224, 224, 3), _vit_param_count(1000)),
  ],
)
def test_param_count(name, kwargs, num_classes, input_shape, expected):
  model = models.get_model(name, num_classes=num_classes, **kwargs)
  variables = _param_shapes(model, input_shape)
  assert models.count_params(variables['params']) == expected


@pytest.mark.parametrize(
  'module, counts',
  [
    (resnet, [11_173_962, 11_220_132, 25_557_032, 44_549_160, 60_192_808]),
    (wide_resnet, [36_479_194, 36_536_884]),
    (pyramidnet, [18_323_787, 18_426_837, 28_485_477, 28_511_307, 18_279_744, 18_372_468]),
    (vit, [22_878_952]),
    (models, [11_173_962, 36_479_194, 18_323_787, 25_557_032, 60_192_808, 22_878_952]),
  ],
)
def test_docstrings_state_the_counts(module, counts):
  for count in counts:
    assert f'{count:,}' in module.__doc__


def test_pyramidnet_block_widths():
  assert pyramidnet.block_widths(110, 270, bottleneck=True) == _PYRAMID_BOTTLENECK_WIDTHS
  assert pyramidnet.block_widths(110, 270, bottleneck=False) == _PYRAMID_BASIC_WIDTHS
  with pytest.raises(ValueError, match='9 n \\+ 2'):
    pyramidnet.block_widths(110 + 3, 270, bottleneck=True)
  with pytest.raises(ValueError, match='6 n \\+ 2'):
    pyramidnet.block_widths(111, 270, bottleneck=False)


def test_wrn_rejects_bad_depth():
  with pytest.raises(ValueError, match='6 n \\+ 4'):
    _param_shapes(wide_resnet.WideResNet(num_classes=10, depth=27), (1, 32, 32, 3))


def test_resnet_rejects_unknown_stem():
  model = resnet.ResNet18(num_classes=10, stem='tiny')
  with pytest.raises(ValueError, match="'cifar' or 'imagenet'"):
    _param_shapes(model, (1, 32, 32, 3))


@pytest.mark.parametrize('name', sorted(models.MODELS))
@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_output_shape_and_dtypes(name, channels, dtype):
  # 28x28 (Fashion-MNIST) for the convnets; ViT needs whole patches.
  height = 64 if name == 'vit_s32' else 28
  input_shape = (2, height, height, channels)
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
  stats = variables.get('batch_stats', {})
  assert jax.tree.structure(updates.get('batch_stats', {})) == jax.tree.structure(stats)
  assert {leaf.dtype for leaf in jax.tree.leaves(stats)} <= {jnp.dtype(jnp.float32)}
  assert (name in _NO_BATCHNORM) == (not stats)


def _cross_entropy(logits, num_classes):
  labels = jnp.arange(logits.shape[0]) % num_classes
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _assert_finite(tree):
  for leaf in jax.tree.leaves(tree):
    assert np.all(np.isfinite(leaf))


def _assert_batch_stats_moved(old_stats, new_stats, stationary=()):
  """Finite, and every running statistic moved from its init except the ``stationary`` ones.

  Args:
    old_stats: ``batch_stats`` before a training pass.
    new_stats: ``batch_stats`` after it.
    stationary: regexes of ``'/'``-joined paths of statistics that cannot move; see
      ``_STATIONARY_STATS``.
  """
  _assert_finite(new_stats)
  pairs = zip(
    jax.tree_util.tree_leaves_with_path(old_stats), jax.tree.leaves(new_stats), strict=True
  )
  for (path, old), new in pairs:
    key = '/'.join(k.key for k in path)
    if not any(re.search(pattern, key) for pattern in stationary):
      assert not np.allclose(old, new), key


# A PyramidNet's first block reads the stem BatchNorm's output, whose batch mean and variance
# are 0 and 1 already, so its bn1 keeps its init; a bottleneck's bn2 reads a bias-free 1x1
# conv of that zero-mean (BatchNorm-normalised) input, whose batch mean is 0.
_PYRAMID_STATIONARY = (r'^stage1_block1/bn1/',)
_STATIONARY_STATS = {
  'pyramidnet110': (*_PYRAMID_STATIONARY, r'/bn2/mean$'),
  'pyramidnet': (*_PYRAMID_STATIONARY, r'/bn2/mean$'),
  'pyramidnet_basic': _PYRAMID_STATIONARY,
}


# ResNet-101 and ResNet-152 run the forward passes but no gradient step: their blocks and
# stem are ResNet-50's (only the stage sizes differ), and compiling the step of ResNet-152
# alone takes ~25 s on 2 CPU cores.
_FORWARD_ONLY = {'resnet101', 'resnet152'}


@pytest.mark.parametrize('name', sorted(models.MODELS))
def test_forward_sgd_step_and_bfloat16(name):
  num_classes = 10
  input_shape = _INPUT_SHAPES.get(name, _DEFAULT_INPUT_SHAPE)
  model = models.get_model(name, num_classes=num_classes)
  model_bf16 = models.get_model(name, num_classes=num_classes, dtype=jnp.bfloat16)
  variables = _numpy_variables(model, input_shape)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  images = jax.random.normal(jax.random.key(1), input_shape)

  # Eval mode, float32 and bfloat16 computation on the same float32 variables.
  bf16_shapes = _param_shapes(model_bf16, input_shape)
  assert jax.tree.map(lambda s: (s.shape, s.dtype), bf16_shapes) == jax.tree.map(
    lambda a: (a.shape, a.dtype), variables
  )
  eval_logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  eval_bf16 = jax.jit(lambda v, x: model_bf16.apply(v, x, train=False))(variables, images)
  for logits in (eval_logits, eval_bf16):
    assert logits.shape == (2, num_classes)
    assert logits.dtype == jnp.float32
    _assert_finite(logits)
  # Loose: bfloat16 keeps 8 significant bits through up to 150 layers. (Eval mode:
  # train-mode BatchNorm over a batch of 2 at a 1x1 last stage is ill-conditioned.)
  error = np.linalg.norm(eval_bf16 - eval_logits) / np.linalg.norm(eval_logits)
  assert error < 0.1, error

  def loss_fn(params):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats']
    )
    return _cross_entropy(logits, num_classes), (logits, updates)

  if name in _FORWARD_ONLY:
    _, (logits, updates) = jax.jit(loss_fn)(params)
  else:

    @jax.jit
    def sgd_step(params):
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return loss, aux, grads, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    loss, (logits, updates), grads, new_params = sgd_step(params)
    assert np.isfinite(loss)
    _assert_finite(grads)
    # Every layer is connected: each kernel gets a gradient. (Some biases get none, exactly:
    # ViT's key bias shifts every attention logit of a query alike, and a bias followed by a
    # training-mode BatchNorm, PyramidNet's stem BN, is normalised away.)
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
      if path[-1].key == 'kernel':
        assert np.any(grad != 0), jax.tree_util.keystr(path)
    _assert_finite(new_params)

  assert logits.shape == (2, num_classes)
  assert logits.dtype == jnp.float32
  _assert_finite(logits)
  if name in _NO_BATCHNORM:
    assert not updates.get('batch_stats')
  else:
    _assert_batch_stats_moved(batch_stats, updates['batch_stats'], _STATIONARY_STATS.get(name, ()))


# Small instances of each architecture with real init: same code paths, fast to compile.
# (factory, input shape, conv whose output the checked BatchNorm normalises, that BN's path).
_SMALL_MODELS = {
  'cnn': (lambda: cnn.CNN(num_classes=3, width=4), (2, 16, 16, 3), 'conv0_0', ('bn0_0',)),
  'resnet': (lambda: resnet._ResNetTiny(num_classes=3), (2, 16, 16, 3), 'stem_conv', ('stem_bn',)),
  'resnet_imagenet': (
    lambda: resnet.ResNet(
      stage_sizes=(1, 1), block_cls=resnet.Bottleneck, num_classes=3, width=4, stem='imagenet'
    ),
    (2, 32, 32, 3),
    'stem_conv',
    ('stem_bn',),
  ),
  'wide_resnet': (
    lambda: wide_resnet.WideResNet(num_classes=3, depth=10, widen_factor=2, width=4),
    (2, 16, 16, 3),
    'stem_conv',
    ('stage1_block1', 'bn1'),
  ),
  'pyramidnet': (
    lambda: pyramidnet.PyramidNet(num_classes=3, depth=11, alpha=12, width=4),
    (2, 16, 16, 3),
    'stem_conv',
    ('stem_bn',),
  ),
  'pyramidnet_basic': (
    lambda: pyramidnet.PyramidNet(num_classes=3, depth=8, alpha=6, bottleneck=False, width=4),
    (2, 16, 16, 3),
    'stem_conv',
    ('stem_bn',),
  ),
}


@pytest.mark.parametrize('arch', sorted(_SMALL_MODELS))
def test_batch_stats_update_only_in_train(arch):
  make_model, input_shape, conv_name, bn_path = _SMALL_MODELS[arch]
  model = make_model()
  images = jax.random.normal(jax.random.key(1), input_shape) + 3.0
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
  new_stats = updates['batch_stats']
  for key in bn_path:
    new_stats = new_stats[key]
  # Flax momentum 0.9 == PyTorch momentum 0.1: new = 0.9 * old + 0.1 * batch statistic,
  # starting from mean 0 and var 1.
  np.testing.assert_allclose(
    new_stats['mean'], 0.1 * jnp.mean(pre_bn, axis=(0, 1, 2)), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    new_stats['var'], 0.9 + 0.1 * jnp.var(pre_bn, axis=(0, 1, 2)), rtol=1e-5, atol=1e-6
  )
  _assert_batch_stats_moved(
    variables['batch_stats'], updates['batch_stats'], _STATIONARY_STATS.get(arch, ())
  )


def test_imagenet_stem_and_shortcut_shapes():
  # torchvision shapes: 224 -> 112 (7x7 / 2 conv) -> 56 (3x3 / 2 max-pool) -> 7 at stage 4.
  model = resnet.ResNet50(num_classes=5)
  variables = _param_shapes(model, (1, 224, 224, 3))
  params = variables['params']
  assert params['stem_conv']['kernel'].shape == (7, 7, 3, 64)
  block = params['stage2_block1']
  assert block['conv1']['kernel'].shape == (1, 1, 256, 128)
  assert block['conv2']['kernel'].shape == (3, 3, 128, 128)
  assert block['conv3']['kernel'].shape == (1, 1, 128, 512)
  assert block['proj_conv']['kernel'].shape == (1, 1, 256, 512)
  assert 'proj_conv' not in params['stage2_block2']
  assert params['head']['kernel'].shape == (2048, 5)


def test_wrn_dropout_needs_rng_and_is_off_in_eval():
  model = wide_resnet.WideResNet(num_classes=3, depth=10, widen_factor=1, width=4, dropout_rate=0.5)
  images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  variables = model.init(jax.random.key(0), images, train=False)

  def train_logits(seed):
    logits, _ = model.apply(
      variables,
      images,
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': jax.random.key(seed)},
    )
    return logits

  assert not np.allclose(train_logits(0), train_logits(1))
  np.testing.assert_array_equal(
    model.apply(variables, images, train=False), model.apply(variables, images, train=False)
  )
  with pytest.raises(flax.errors.InvalidRngError):
    model.apply(variables, images, train=True, mutable=['batch_stats'])


def _tiny_vit():
  return vit.ViT(num_classes=3, patch_size=8, width=16, depth=2, num_heads=2, mlp_dim=32)


def test_vit_position_embedding_follows_init_image_size():
  model = models.get_model('vit_s32', num_classes=10)
  for side, tokens in [(224, 50), (64, 5), (32, 2)]:
    params = _param_shapes(model, (1, side, side, 3))['params']
    assert params['pos_embedding'].shape == (1, tokens, 384)
  # A model initialised at 64x64 cannot be applied to 96x96 (no interpolation).
  variables = _param_shapes(model, (1, 64, 64, 3))
  with pytest.raises(flax.errors.ScopeParamShapeError):
    jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False),
      variables,
      jax.ShapeDtypeStruct((1, 96, 96, 3), jnp.float32),
    )
  with pytest.raises(ValueError, match='multiples of patch_size=32'):
    _param_shapes(model, (1, 48, 48, 3))


def test_vit_train_step_convention_without_batch_stats():
  model = _tiny_vit()
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  variables = model.init(jax.random.key(0), images, train=False)
  assert set(variables) == {'params'}
  # The train step's forward: an empty batch_stats collection goes in and comes back.
  logits, new_batch_stats = train_steps._apply_train(model, variables['params'], {}, images)
  assert logits.shape == (2, 3)
  assert logits.dtype == jnp.float32
  assert new_batch_stats == {}
  eval_logits = train_steps._apply_eval(model, variables['params'], {}, images)
  # No dropout and no BatchNorm: training and evaluation compute the same function.
  np.testing.assert_allclose(logits, eval_logits, rtol=1e-6, atol=1e-6)


def test_vit_bfloat16_keeps_float32_params_and_norm_statistics():
  model = vit.ViT(
    num_classes=3, patch_size=8, width=16, depth=2, num_heads=2, mlp_dim=32, dtype=jnp.bfloat16
  )
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  variables = model.init(jax.random.key(0), images, train=False)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  logits = model.apply(variables, images, train=False)
  logits_fp32 = _tiny_vit().apply(variables, images, train=False)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, logits_fp32, rtol=0.1, atol=0.05)


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


def test_get_model_unknown_name():
  with pytest.raises(ValueError, match='config.model.name') as excinfo:
    models.get_model('vgg', num_classes=10)
  message = str(excinfo.value)
  assert "'vgg'" in message
  assert str(sorted(models.MODELS)) in message
  assert "'wrn28_10'" in message

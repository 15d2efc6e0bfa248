r"""CIFAR-style ResNets (He et al. 2016) as used by the SAF/MESA CIFAR experiments.

The CIFAR variant differs from the ImageNet one only in the stem: a single 3x3 stride-1
conv with 64 channels and no max-pool, so a 32x32 input reaches the last stage at 4x4::

  images [B, H, W, C]
    -> conv3x3(64) -> BN -> ReLU                       # stem, [B, H, W, 64]
    -> stage i = 0..3: stage_sizes[i] blocks with 64 * 2**i channels,
       the first block of stage i > 0 has stride 2     # [B, H/8, W/8, 512]
    -> global average pool -> Dense(num_classes)       # [B, num_classes]

Convolutions carry no bias (each is followed by BatchNorm). A block whose input and output
shapes differ gets a 1x1 conv + BatchNorm projection shortcut ("option B" of the paper).
``ResNet18`` (``BasicBlock``, stage sizes ``[2, 2, 2, 2]``) has 11,173,962 parameters for
10 classes, the same count as the common PyTorch CIFAR ResNet-18.

References:
  He et al, `Deep Residual Learning for Image Recognition
  <https://arxiv.org/abs/1512.03385>`_, 2016
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

# PyTorch BatchNorm defaults: Flax's momentum is the weight on the old statistic,
# i.e. 1 - PyTorch momentum (0.1).
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5

# He-normal (fan_out) init as in torchvision's ResNet: keeps activations' scale through the
# ReLU stack, where Flax's default lecun_normal halves the variance at every layer.
_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class BasicBlock(nn.Module):
  """Two 3x3 convs with an identity or projection shortcut; outputs ``features`` channels.

  Attributes:
    features: output channels of both convs.
    strides: stride of the first conv and of the projection shortcut.
    conv: conv constructor (bias-free, dtype set) shared by the whole network.
    norm: BatchNorm constructor (train mode, dtype set) shared by the whole network.
  """

  features: int
  strides: int
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Applies the block.

    Args:
      x: [batch, height, width, in_channels] in the computation dtype.

    Returns:
      [batch, height / strides, width / strides, features] in the computation dtype.
    """
    residual = x
    y = self.conv(self.features, (3, 3), strides=self.strides, name='conv1')(x)
    y = self.norm(name='bn1')(y)
    y = nn.relu(y)
    y = self.conv(self.features, (3, 3), name='conv2')(y)
    y = self.norm(name='bn2')(y)
    if residual.shape != y.shape:
      residual = self.conv(self.features, (1, 1), strides=self.strides, name='proj_conv')(x)
      residual = self.norm(name='proj_bn')(residual)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """Generic CIFAR ResNet: 3x3 stem, four stages of residual blocks, linear head.

  Attributes:
    stage_sizes: number of blocks in each stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
    block_cls: residual block class taking ``features``, ``strides``, ``conv`` and ``norm``
      (``BasicBlock``); it adds its own projection shortcut when shapes change.
    num_classes: number of output logits.
    width: channels of the stem and the first stage; stage ``i`` uses ``width * 2**i``.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters are always float32 and
      logits are returned as float32.

  .. note::
    BatchNorm uses batch statistics and updates ``batch_stats`` when ``train=True``
    (call ``apply`` with ``mutable=['batch_stats']``); with ``train=False`` it reads the
    running averages and needs nothing mutable. Running variance is the biased batch
    variance (Flax), where PyTorch stores the unbiased one.
  """

  stage_sizes: Sequence[int]
  block_cls: Any
  num_classes: int
  width: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """Computes class logits.

    Args:
      images: float32 [batch, height, width, channels], normalised pixels.
      train: use batch statistics and update running BatchNorm statistics.

    Returns:
      logits: float32 [batch, num_classes], unnormalised.
    """
    conv = functools.partial(
      nn.Conv,
      use_bias=False,
      kernel_init=_CONV_INIT,
      dtype=self.dtype,
      param_dtype=jnp.float32,
    )
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=_BN_MOMENTUM,
      epsilon=_BN_EPSILON,
      dtype=self.dtype,
      param_dtype=jnp.float32,
    )
    x = images.astype(self.dtype)
    x = conv(self.width, (3, 3), name='stem_conv')(x)
    x = norm(name='stem_bn')(x)
    x = nn.relu(x)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = self.block_cls(
          features=self.width * 2**i,
          strides=2 if i > 0 and j == 0 else 1,
          conv=conv,
          norm=norm,
          name=f'stage{i + 1}_block{j + 1}',
        )(x)
    x = jnp.mean(x, axis=(1, 2))  # [B, final channels]
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='head')(x)
    return x.astype(jnp.float32)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
# Test-only: one narrow block per stage still runs every code path (stride, projection).
_ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), block_cls=BasicBlock, width=8)

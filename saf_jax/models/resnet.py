r"""ResNets (He et al. 2016): the CIFAR ResNet-18 and torchvision's ImageNet ResNet-50/101/152.

Both variants share the blocks and the stage loop and differ only in the stem::

  images [B, H, W, C]
    -> stem                                            # 'cifar':    [B, H, W, w]
                                                       # 'imagenet': [B, H/4, W/4, w]
    -> stage i = 0..3: stage_sizes[i] blocks with w * 2**i bottleneck channels,
       the first block of stage i > 0 has stride 2     # [B, H/8, W/8, e * 8w] ('cifar')
    -> global average pool -> Dense(num_classes)       # [B, num_classes]

with ``w = width`` (64) and ``e`` the block's expansion (1 for ``BasicBlock``, 4 for
``Bottleneck``). The stems:

* ``'cifar'``: conv3x3(w) / stride 1 -> BN -> ReLU, no pooling, so a 32x32 image reaches the
  last stage at 4x4;
* ``'imagenet'`` (torchvision): conv7x7(w) / stride 2 -> BN -> ReLU -> 3x3 / stride 2
  max-pool, so a 224x224 image reaches the last stage at 7x7.

``Bottleneck`` is torchvision's (ResNet v1.5): conv1x1(f) -> conv3x3(f, stride) ->
conv1x1(4f), each followed by BN, ReLU after the first two and after the residual sum; the
stride sits on the 3x3 conv (v1 of the paper strides the first 1x1). Convolutions are
bias-free with PyTorch padding (see ``layers``). A block whose input and output shapes differ
gets a 1x1 conv + BatchNorm projection shortcut ("option B" of the paper).

Parameter counts (BatchNorm running statistics are not parameters):

========== =========== ============== =========== ============
model      block       stage sizes    classes     parameters
========== =========== ============== =========== ============
ResNet-18  BasicBlock  2, 2, 2, 2     10          11,173,962
ResNet-18  BasicBlock  2, 2, 2, 2     100         11,220,132
ResNet-50  Bottleneck  3, 4, 6, 3     1000        25,557,032
ResNet-101 Bottleneck  3, 4, 23, 3    1000        44,549,160
ResNet-152 Bottleneck  3, 8, 36, 3    1000        60,192,808
========== =========== ============== =========== ============

the same counts as the common PyTorch CIFAR ResNet-18 and torchvision's ``resnet50``,
``resnet101`` and ``resnet152``.

References:
  He et al, `Deep Residual Learning for Image Recognition
  <https://arxiv.org/abs/1512.03385>`_, 2016
"""

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import jax.numpy as jnp
from flax import linen as nn

from saf_jax.models import layers


class BasicBlock(nn.Module):
  """Two 3x3 convs with an identity or projection shortcut; outputs ``features`` channels.

  Attributes:
    features: output channels of both convs.
    strides: stride of the first conv and of the projection shortcut.
    conv: conv constructor (``layers.conv_fn``) shared by the whole network.
    norm: BatchNorm constructor (``layers.batch_norm_fn``) shared by the whole network.
  """

  expansion: ClassVar[int] = 1

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
    y = self.conv(self.features, (3, 3), self.strides, name='conv1')(x)
    y = self.norm(name='bn1')(y)
    y = nn.relu(y)
    y = self.conv(self.features, (3, 3), name='conv2')(y)
    y = self.norm(name='bn2')(y)
    if residual.shape != y.shape:
      residual = self.conv(self.features, (1, 1), self.strides, name='proj_conv')(x)
      residual = self.norm(name='proj_bn')(residual)
    return nn.relu(y + residual)


class Bottleneck(nn.Module):
  """torchvision's bottleneck (ResNet v1.5): 1x1, strided 3x3, 1x1 to ``4 * features``.

  Attributes:
    features: channels of the 1x1 and 3x3 convs; the block outputs ``4 * features``.
    strides: stride of the 3x3 conv and of the projection shortcut.
    conv: conv constructor (``layers.conv_fn``) shared by the whole network.
    norm: BatchNorm constructor (``layers.batch_norm_fn``) shared by the whole network.
  """

  expansion: ClassVar[int] = 4

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
      [batch, height / strides, width / strides, 4 * features] in the computation dtype.
    """
    out_features = self.expansion * self.features
    residual = x
    y = self.conv(self.features, (1, 1), name='conv1')(x)
    y = self.norm(name='bn1')(y)
    y = nn.relu(y)
    y = self.conv(self.features, (3, 3), self.strides, name='conv2')(y)
    y = self.norm(name='bn2')(y)
    y = nn.relu(y)
    y = self.conv(out_features, (1, 1), name='conv3')(y)
    y = self.norm(name='bn3')(y)
    if residual.shape != y.shape:
      residual = self.conv(out_features, (1, 1), self.strides, name='proj_conv')(x)
      residual = self.norm(name='proj_bn')(residual)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """Generic ResNet: a CIFAR or ImageNet stem, four stages of residual blocks, linear head.

  Attributes:
    stage_sizes: number of blocks in each stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
    block_cls: ``BasicBlock`` or ``Bottleneck``; it adds its own projection shortcut when
      shapes change.
    num_classes: number of output logits.
    width: channels of the stem and of the first stage's 3x3 convs; stage ``i`` uses
      ``width * 2**i``.
    stem: ``'cifar'`` (3x3 conv, stride 1, no pooling) or ``'imagenet'`` (7x7 conv,
      stride 2, then 3x3 stride-2 max-pool).
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
  stem: str = 'cifar'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """Computes class logits.

    Args:
      images: float32 [batch, height, width, channels], normalised pixels.
      train: use batch statistics and update running BatchNorm statistics.

    Returns:
      logits: float32 [batch, num_classes], unnormalised.

    Raises:
      ValueError: if ``stem`` is neither ``'cifar'`` nor ``'imagenet'``.
    """
    conv = layers.conv_fn(self.dtype)
    norm = layers.batch_norm_fn(train=train, dtype=self.dtype)
    x = images.astype(self.dtype)
    if self.stem == 'cifar':
      x = conv(self.width, (3, 3), name='stem_conv')(x)
    elif self.stem == 'imagenet':
      x = conv(self.width, (7, 7), 2, name='stem_conv')(x)
    else:
      raise ValueError(f"ResNet stem must be 'cifar' or 'imagenet', got {self.stem!r}.")
    x = norm(name='stem_bn')(x)
    x = nn.relu(x)
    if self.stem == 'imagenet':
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # [B, H/4, W/4, w]
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
ResNet50 = functools.partial(
  ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck, stem='imagenet'
)
ResNet101 = functools.partial(
  ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck, stem='imagenet'
)
ResNet152 = functools.partial(
  ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck, stem='imagenet'
)
# Test-only: one narrow block per stage still runs every code path (stride, projection).
_ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), block_cls=BasicBlock, width=8)

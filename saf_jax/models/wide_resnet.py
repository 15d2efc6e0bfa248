r"""Wide ResNets (Zagoruyko & Komodakis 2016) for CIFAR: WRN-28-10 of the SAF/MESA experiments.

Pre-activation residual blocks (BN -> ReLU -> conv), ``n = (depth - 4) / 6`` blocks per stage,
with ``w = width`` (16) and ``k = widen_factor``::

  images [B, H, W, C]
    -> conv3x3(w)                                      # stem, [B, H, W, w]
    -> stage i = 0..2: n blocks with w * k * 2**i channels,
       the first block of stage i > 0 has stride 2     # [B, H/4, W/4, 4wk]
    -> BN -> ReLU -> global average pool               # [B, 4wk]
    -> Dense(num_classes)                              # [B, num_classes]

  block(x, f, stride):  o = ReLU(BN(x))
                        y = conv3x3(f, stride)(o) -> BN -> ReLU -> [dropout] -> conv3x3(f)
                        return y + (x if shapes match else conv1x1(f, stride)(o))

Convolutions are bias-free with PyTorch padding (see ``layers``); the shortcut of a block
that changes shape is a bias-free 1x1 conv on the block's pre-activation ``o``, as in the
reference implementation. Dropout between the two convs is off by default
(``dropout_rate=0``, as in the paper's CIFAR runs); with ``dropout_rate > 0`` a training
pass needs ``rngs={'dropout': key}``.

WRN-28-10 (``depth=28``, ``widen_factor=10``: stage widths 160, 320, 640) has 36,479,194
parameters for 10 classes and 36,536,884 for 100 classes, the count of the common PyTorch
WRN-28-10.

References:
  Zagoruyko and Komodakis, `Wide Residual Networks <https://arxiv.org/abs/1605.07146>`_,
  BMVC 2016
"""

import functools
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from saf_jax.models import layers


class WideBasicBlock(nn.Module):
  """Pre-activation block: BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus a shortcut.

  Attributes:
    features: output channels of both convs.
    strides: stride of the first conv and of the projection shortcut.
    conv: conv constructor (``layers.conv_fn``) shared by the whole network.
    norm: BatchNorm constructor (``layers.batch_norm_fn``) shared by the whole network.
    dropout_rate: dropout between the two convs (0 disables it).
  """

  features: int
  strides: int
  conv: Any
  norm: Any
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """Applies the block.

    Args:
      x: [batch, height, width, in_channels] in the computation dtype.
      train: apply dropout (when ``dropout_rate > 0``).

    Returns:
      [batch, height / strides, width / strides, features] in the computation dtype.
    """
    o = nn.relu(self.norm(name='bn1')(x))
    y = self.conv(self.features, (3, 3), self.strides, name='conv1')(o)
    y = nn.relu(self.norm(name='bn2')(y))
    if self.dropout_rate > 0:
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = self.conv(self.features, (3, 3), name='conv2')(y)
    if x.shape != y.shape:
      x = self.conv(self.features, (1, 1), self.strides, name='proj_conv')(o)
    return x + y


class WideResNet(nn.Module):
  """CIFAR Wide ResNet WRN-``depth``-``widen_factor``.

  Attributes:
    num_classes: number of output logits.
    depth: total conv depth, ``6 n + 4`` for ``n`` blocks per stage (28: 4 blocks).
    widen_factor: ``k``; stage ``i`` has ``width * k * 2**i`` channels.
    width: channels of the stem conv (16); stage widths scale with it.
    dropout_rate: dropout between the two convs of every block (0: none).
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters are always float32 and
      logits are returned as float32.

  .. note::
    BatchNorm uses batch statistics and updates ``batch_stats`` when ``train=True``
    (call ``apply`` with ``mutable=['batch_stats']``); with ``train=False`` it reads the
    running averages and needs nothing mutable.
  """

  num_classes: int
  depth: int = 28
  widen_factor: int = 10
  width: int = 16
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """Computes class logits.

    Args:
      images: float32 [batch, height, width, channels], normalised pixels.
      train: use batch statistics, update running BatchNorm statistics, apply dropout.

    Returns:
      logits: float32 [batch, num_classes], unnormalised.

    Raises:
      ValueError: if ``depth - 4`` is not a positive multiple of 6.
    """
    if self.depth < 10 or (self.depth - 4) % 6:
      raise ValueError(f'WideResNet depth must be 6 n + 4 with n >= 1, got {self.depth}.')
    blocks_per_stage = (self.depth - 4) // 6
    conv = layers.conv_fn(self.dtype)
    norm = layers.batch_norm_fn(train=train, dtype=self.dtype)
    x = images.astype(self.dtype)
    x = conv(self.width, (3, 3), name='stem_conv')(x)
    for i in range(3):
      for j in range(blocks_per_stage):
        x = WideBasicBlock(
          features=self.width * self.widen_factor * 2**i,
          strides=2 if i > 0 and j == 0 else 1,
          conv=conv,
          norm=norm,
          dropout_rate=self.dropout_rate,
          name=f'stage{i + 1}_block{j + 1}',
        )(x, train=train)
    x = nn.relu(norm(name='final_bn')(x))
    x = jnp.mean(x, axis=(1, 2))  # [B, 4wk]
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='head')(x)
    return x.astype(jnp.float32)


WRN28_10 = functools.partial(WideResNet, depth=28, widen_factor=10)

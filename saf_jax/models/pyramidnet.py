r"""PyramidNets (Han et al. 2017) for CIFAR: PyramidNet-110, alpha = 270, of the SAF experiments.

A PyramidNet widens every residual block by the same amount instead of doubling the width at
each downsampling: with ``N`` blocks in all (``N / 3`` per stage) and widening factor
``alpha``, block ``b = 1..N`` has ``d_b = round(16 + b * alpha / N)`` channels (bottleneck:
``d_b`` in its 1x1 and 3x3 convs, ``4 d_b`` out), so the last block has ``16 + alpha`` (times
4). ``d_b`` follows the reference PyTorch code: ``int(round(x))`` of the float sum
``16 + alpha / N + ... + alpha / N``, Python 3's round-half-to-even::

  images [B, H, W, C]
    -> conv3x3(16) -> BN                               # stem (no ReLU), [B, H, W, 16]
    -> stage i = 0..2: N / 3 blocks, the first block of stage i > 0 has stride 2
    -> BN -> ReLU -> global average pool               # [B, 4 (16 + alpha)]
    -> Dense(num_classes)                              # [B, num_classes]

  bottleneck block b (the PyramidNet block: BN first, no ReLU after the residual sum):
    y = BN -> conv1x1(d_b) -> BN -> ReLU -> conv3x3(d_b, stride) -> BN -> ReLU
        -> conv1x1(4 d_b) -> BN
    return y + zero_pad_channels(avg_pool2x2(x) if stride 2 else x)

  basic block b (``bottleneck=False``):
    y = BN -> conv3x3(d_b, stride) -> BN -> ReLU -> conv3x3(d_b) -> BN

The shortcut has no parameters: 2x2 average pooling when the block downsamples and zero
channels appended to reach the block's width. Convolutions are bias-free with PyTorch
padding (see ``layers``).

Depth counts the weighted layers: ``depth = 9 N / 3 + 2`` with bottleneck blocks (three
convs each) and ``6 N / 3 + 2`` with basic blocks. Parameter counts (BatchNorm running
statistics not counted):

============================== ====== ====== ========== ============ ============
block                          depth  alpha  blocks N   10 classes   100 classes
============================== ====== ====== ========== ============ ============
bottleneck (default)           110    270    36         18,323,787   18,426,837
basic (``bottleneck=False``)   110    270    54         28,485,477   28,511,307
============================== ====== ====== ========== ============ ============

The "PyramidNet-110, alpha = 270, 28.3M parameters" of the PyramidNet paper's CIFAR table is
the basic-block network (its bottleneck networks there are 164 to 272 layers deep). With
bottleneck blocks and ``depth=110``, ``alpha / N = 7.5`` makes every other ``d_b`` a
half-integer: truncating (``int``) instead gives 18,279,744 parameters for 10 classes,
rounding halves up (the Lua original's ``floor(x + 0.5)``) 18,372,468.

References:
  Han, Kim and Kim, `Deep Pyramidal Residual Networks <https://arxiv.org/abs/1610.02915>`_,
  CVPR 2017; the authors' PyTorch code, github.com/dyhan0920/PyramidNet-PyTorch
"""

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from saf_jax.models import layers


def block_widths(depth: int, alpha: float, bottleneck: bool, width: int = 16) -> list[int]:
  """Channels ``d_b`` of each block (a bottleneck block outputs ``4 d_b``).

  Args:
    depth: weighted layers, ``9 n + 2`` (bottleneck) or ``6 n + 2`` (basic) for ``n`` blocks
      per stage.
    alpha: widening factor, the total channel increase over the ``3 n`` blocks.
    bottleneck: bottleneck (3 convs) or basic (2 convs) blocks.
    width: channels of the stem.

  Returns:
    ``3 n`` channel counts, ``int(round(...))`` of the running float sum as in the reference.

  Raises:
    ValueError: if ``depth`` does not fit the block type.
  """
  convs = 3 if bottleneck else 2
  if depth < 3 * convs + 2 or (depth - 2) % (3 * convs):
    raise ValueError(
      f'PyramidNet depth must be {3 * convs} n + 2 with n >= 1 for '
      f'{"bottleneck" if bottleneck else "basic"} blocks, got {depth}.'
    )
  num_blocks = 3 * ((depth - 2) // (3 * convs))
  add_rate = alpha / num_blocks
  channels, widths = float(width), []
  for _ in range(num_blocks):
    channels += add_rate
    widths.append(int(round(channels)))
  return widths


def _shortcut(x: jnp.ndarray, features: int, strides: int) -> jnp.ndarray:
  """Parameter-free shortcut: 2x2 average pool when strided, zero channels appended.

  Args:
    x: [batch, height, width, in_channels], ``in_channels <= features``.
    features: output channels.
    strides: 1 or 2.

  Returns:
    [batch, ceil(height / strides), ceil(width / strides), features], same dtype.
  """
  if strides != 1:
    # Padding (odd sizes) is left out of the average, like PyTorch's ceil_mode=True.
    x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding='SAME', count_include_pad=False)
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, features - x.shape[-1])))


class PyramidBottleneck(nn.Module):
  """BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN plus a parameter-free shortcut.

  Attributes:
    features: ``d_b``, channels of the 1x1 and 3x3 convs; the block outputs ``4 d_b``.
    strides: stride of the 3x3 conv and of the shortcut's average pool.
    conv: conv constructor (``layers.conv_fn``) shared by the whole network.
    norm: BatchNorm constructor (``layers.batch_norm_fn``) shared by the whole network.
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
      [batch, height / strides, width / strides, 4 * features] in the computation dtype.
    """
    y = self.norm(name='bn1')(x)
    y = self.conv(self.features, (1, 1), name='conv1')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.conv(self.features, (3, 3), self.strides, name='conv2')(y)
    y = nn.relu(self.norm(name='bn3')(y))
    y = self.conv(4 * self.features, (1, 1), name='conv3')(y)
    y = self.norm(name='bn4')(y)
    return y + _shortcut(x, 4 * self.features, self.strides)


class PyramidBasicBlock(nn.Module):
  """BN-conv3x3-BN-ReLU-conv3x3-BN plus a parameter-free shortcut.

  Attributes:
    features: ``d_b``, output channels of both convs.
    strides: stride of the first conv and of the shortcut's average pool.
    conv: conv constructor (``layers.conv_fn``) shared by the whole network.
    norm: BatchNorm constructor (``layers.batch_norm_fn``) shared by the whole network.
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
    y = self.norm(name='bn1')(x)
    y = self.conv(self.features, (3, 3), self.strides, name='conv1')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.conv(self.features, (3, 3), name='conv2')(y)
    y = self.norm(name='bn3')(y)
    return y + _shortcut(x, self.features, self.strides)


class PyramidNet(nn.Module):
  """CIFAR PyramidNet with additive widening.

  Attributes:
    num_classes: number of output logits.
    depth: weighted layers (110); ``(depth - 2) / 9`` bottleneck or ``(depth - 2) / 6``
      basic blocks per stage.
    alpha: widening factor (270): the last block is ``alpha`` channels wider than the stem
      (times 4 at a bottleneck's output).
    bottleneck: bottleneck blocks (default) or basic blocks.
    width: channels of the stem (16).
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters are always float32 and
      logits are returned as float32.

  .. note::
    BatchNorm uses batch statistics and updates ``batch_stats`` when ``train=True``
    (call ``apply`` with ``mutable=['batch_stats']``); with ``train=False`` it reads the
    running averages and needs nothing mutable.
  """

  num_classes: int
  depth: int = 110
  alpha: float = 270
  bottleneck: bool = True
  width: int = 16
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
      ValueError: if ``depth`` does not fit the block type.
    """
    widths = block_widths(self.depth, self.alpha, self.bottleneck, self.width)
    per_stage = len(widths) // 3
    block_cls = PyramidBottleneck if self.bottleneck else PyramidBasicBlock
    conv = layers.conv_fn(self.dtype)
    norm = layers.batch_norm_fn(train=train, dtype=self.dtype)
    x = images.astype(self.dtype)
    x = conv(self.width, (3, 3), name='stem_conv')(x)
    x = norm(name='stem_bn')(x)
    for b, features in enumerate(widths):
      stage, j = divmod(b, per_stage)
      x = block_cls(
        features=features,
        strides=2 if stage > 0 and j == 0 else 1,
        conv=conv,
        norm=norm,
        name=f'stage{stage + 1}_block{j + 1}',
      )(x)
    x = nn.relu(norm(name='final_bn')(x))
    x = jnp.mean(x, axis=(1, 2))  # [B, final channels]
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='head')(x)
    return x.astype(jnp.float32)

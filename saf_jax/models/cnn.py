r"""A small VGG-style convnet, sized for Fashion-MNIST on a 2-core CPU.

Architecture, with ``w = width``, every conv 3x3 / stride 1 / SAME and bias-free because a
BatchNorm follows it::

  images [B, H, W, C]
    -> (conv(w)  -> BN -> ReLU) x 2 -> maxpool 2x2     # [B, H/2, W/2, w]
    -> (conv(2w) -> BN -> ReLU) x 2 -> maxpool 2x2     # [B, H/4, W/4, 2w]
    -> global average pool                             # [B, 2w]
    -> Dense(4w) -> ReLU -> Dense(num_classes)         # [B, num_classes]

The global average pool makes the model accept any ``H x W x C`` (28x28x1 Fashion-MNIST,
32x32x3 CIFAR) with a parameter count that depends only on ``C``, ``width`` and the number of
classes ``K``:

.. math::

  \underbrace{9 C w + 9 w^2 + 18 w^2 + 36 w^2}_{\text{convs}}
  + \underbrace{2 (w + w + 2w + 2w)}_{\text{BN scale, bias}}
  + \underbrace{(2w \cdot 4w + 4w) + (4w K + K)}_{\text{dense}}

At the default ``width=16``, ``C=1`` and ``K=10`` this is 19,226 parameters (running
statistics not counted).

Its speed and accuracy on a 2-core CPU at several widths are in docs/models_and_configs.md.
"""

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

# PyTorch BatchNorm defaults: Flax's momentum is the weight on the old statistic,
# i.e. 1 - PyTorch momentum (0.1).
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


def _max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2 / stride 2 max-pool (VALID: an odd last row or column is dropped).

  Same values as ``nn.max_pool(x, (2, 2), strides=(2, 2))``, but the gradient is elementwise
  selects instead of XLA's ``select_and_scatter``, which took ~20% of the CPU training step.

  Args:
    x: [batch, height, width, channels].

  Returns:
    [batch, height // 2, width // 2, channels], same dtype.
  """
  h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  x = x[:, :h, :w]
  rows = jnp.maximum(x[:, 0::2], x[:, 1::2])  # [B, H/2, W, C]
  return jnp.maximum(rows[:, :, 0::2], rows[:, :, 1::2])  # [B, H/2, W/2, C]


class CNN(nn.Module):
  """Four-conv BatchNorm convnet with a global-average-pool MLP head.

  Attributes:
    num_classes: number of output logits.
    width: channels of the first two convs; the last two use ``2 * width`` and the hidden
      dense layer ``4 * width``.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters are always float32 and
      logits are returned as float32.

  .. note::
    BatchNorm uses batch statistics and updates ``batch_stats`` when ``train=True``
    (call ``apply`` with ``mutable=['batch_stats']``); with ``train=False`` it reads the
    running averages and needs nothing mutable. Running variance is the biased batch
    variance (Flax), where PyTorch stores the unbiased one.
  """

  num_classes: int
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
    """
    x = images.astype(self.dtype)
    for stage, features in enumerate((self.width, 2 * self.width)):
      for layer in range(2):
        x = nn.Conv(
          features,
          (3, 3),
          use_bias=False,
          dtype=self.dtype,
          param_dtype=jnp.float32,
          name=f'conv{stage}_{layer}',
        )(x)
        x = nn.BatchNorm(
          use_running_average=not train,
          momentum=_BN_MOMENTUM,
          epsilon=_BN_EPSILON,
          dtype=self.dtype,
          param_dtype=jnp.float32,
          name=f'bn{stage}_{layer}',
        )(x)
        x = nn.relu(x)
      x = _max_pool_2x2(x)
    x = jnp.mean(x, axis=(1, 2))  # [B, 2w]
    x = nn.Dense(4 * self.width, dtype=self.dtype, param_dtype=jnp.float32, name='hidden')(x)
    x = nn.relu(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='head')(x)
    return x.astype(jnp.float32)

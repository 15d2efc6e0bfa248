"""Conv and BatchNorm constructors shared by the convolutional networks (ResNet, WRN, PyramidNet).

One place fixes the PyTorch conventions these architectures are specified in, so a Flax
model has the same shapes, padding and statistics as its PyTorch reference:

* convolutions are bias-free (a BatchNorm follows each) with symmetric ``kernel_size // 2``
  zero padding, PyTorch's ``padding=k // 2``. Flax's ``'SAME'`` pads ``(0, 1)`` for a
  stride-2 3x3 conv on an even input where PyTorch pads ``(1, 1)``: same output shape,
  pixels shifted by one;
* kernels use He-normal fan-out init (torchvision's ``kaiming_normal_(mode='fan_out')``);
* BatchNorm uses PyTorch's defaults, momentum 0.1 and epsilon 1e-5.

Parameters are always float32; ``dtype`` is the computation dtype. Flax computes BatchNorm
and LayerNorm statistics in float32 whatever ``dtype`` is, and keeps ``batch_stats`` in float32.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

# PyTorch BatchNorm defaults: Flax's momentum is the weight on the old statistic,
# i.e. 1 - PyTorch momentum (0.1).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# He-normal (fan_out) init as in torchvision's ResNet: keeps activations' scale through the
# ReLU stack, where Flax's default lecun_normal halves the variance at every layer.
CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _conv(
  features: int,
  kernel_size: Sequence[int],
  strides: int = 1,
  *,
  dtype: Any,
  name: str,
) -> nn.Conv:
  """A bias-free conv with PyTorch's symmetric ``k // 2`` padding and He fan-out init."""
  return nn.Conv(
    features,
    tuple(kernel_size),
    strides=strides,
    padding=[(k // 2, k // 2) for k in kernel_size],
    use_bias=False,
    kernel_init=CONV_INIT,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


def conv_fn(dtype: Any) -> Callable[..., nn.Conv]:
  """Conv constructor for a whole network.

  Args:
    dtype: computation dtype; the kernel is float32.

  Returns:
    ``conv(features, kernel_size, strides=1, *, name)`` building a bias-free ``nn.Conv``
    with PyTorch padding ``kernel_size // 2`` on each side and He fan-out init.
  """
  return functools.partial(_conv, dtype=dtype)


def batch_norm_fn(*, train: bool, dtype: Any) -> Callable[..., nn.BatchNorm]:
  """BatchNorm constructor for a whole network.

  Args:
    train: normalise with batch statistics and update the running ones (``batch_stats``);
      otherwise read the running statistics.
    dtype: computation dtype; scale, bias and running statistics are float32.

  Returns:
    ``norm(*, name, scale_init=...)`` building an ``nn.BatchNorm`` with PyTorch's
    momentum 0.1 and epsilon 1e-5.
  """
  return functools.partial(
    nn.BatchNorm,
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    dtype=dtype,
    param_dtype=jnp.float32,
  )

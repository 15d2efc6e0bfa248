"""Model registry: Flax Linen image classifiers looked up by ``config.model.name``.

Every model is called as::

  logits, updates = model.apply(
      variables, images, train=True, mutable=['batch_stats'])  # clean training pass
  logits = model.apply(variables, images, train=False)        # eval, nothing mutable

with ``images`` float32 [batch, height, width, channels] and ``logits`` float32
[batch, num_classes]. ``variables`` holds ``params`` (float32) and ``batch_stats``
(BatchNorm running mean/var, PyTorch defaults momentum 0.1 / epsilon 1e-5); ``vit_s32`` has
no BatchNorm, so its ``batch_stats`` and ``updates`` are empty. Models take a ``dtype``
keyword for the computation dtype (e.g. ``jnp.bfloat16``).

======================= ============ ========================================== =============
name                    input        architecture                               parameters
======================= ============ ========================================== =============
``cnn``                 any          ``cnn.CNN``, 4 convs (``width=16``)        19,226 (10)
``resnet18``            CIFAR        ``resnet.ResNet18``, 3x3 stem              11,173,962 (10)
``wrn28_10``            CIFAR        ``wide_resnet.WRN28_10``                   36,479,194 (10)
``pyramidnet110``       CIFAR        ``pyramidnet.PyramidNet``, bottleneck,     18,323,787 (10)
                                     alpha 270
``resnet50``            ImageNet     ``resnet.ResNet50`` (torchvision)          25,557,032 (1000)
``resnet101``           ImageNet     ``resnet.ResNet101`` (torchvision)         44,549,160 (1000)
``resnet152``           ImageNet     ``resnet.ResNet152`` (torchvision)         60,192,808 (1000)
``vit_s32``             224x224      ``vit.ViTS32``, ViT-S/32                   22,878,952 (1000)
======================= ============ ========================================== =============

(number of classes in parentheses; the modules' docstrings give other class counts).
The convolutional networks accept any image size (they end in a global average pool);
``vit_s32`` learns its position embedding for the image size seen at ``init``. Every model
also takes its architecture's attributes as keywords (``config.model`` items), e.g.
``width`` (ResNets 64, WRN and PyramidNet 16, ViT 384), ``bottleneck`` or ``depth``.

This package is the only place that imports ``flax.linen``.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from saf_jax import models
  >>> model = models.get_model('cnn', num_classes=10)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), train=False)
  >>> models.count_params(variables['params'])
  19226
"""

import math
from typing import Any

import jax
from flax import linen as nn

from saf_jax.models import cnn, pyramidnet, resnet, vit, wide_resnet

MODELS = {
  # Fashion-MNIST / CIFAR.
  'cnn': cnn.CNN,
  'resnet18': resnet.ResNet18,
  'wrn28_10': wide_resnet.WRN28_10,
  'pyramidnet110': pyramidnet.PyramidNet,
  # ImageNet.
  'resnet50': resnet.ResNet50,
  'resnet101': resnet.ResNet101,
  'resnet152': resnet.ResNet152,
  'vit_s32': vit.ViTS32,
}


def get_model(name: str, *, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds a registered model.

  Args:
    name: registry key, the value of ``config.model.name`` (e.g. ``'cnn'``, ``'resnet18'``).
    num_classes: number of output logits.
    **kwargs: further module attributes, e.g. ``width`` or ``dtype``.

  Returns:
    An unbound Flax module; call ``init``/``apply`` with ``train=...`` as keyword.

  Raises:
    ValueError: if ``name`` is not a registered model.
  """
  if name not in MODELS:
    raise ValueError(f'Unknown config.model.name={name!r}; expected one of {sorted(MODELS)}.')
  return MODELS[name](num_classes=num_classes, **kwargs)


def count_params(params: Any) -> int:
  """Counts scalar parameters.

  Args:
    params: pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).

  Returns:
    Total number of elements over all leaves.
  """
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))

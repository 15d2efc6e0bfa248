"""Model registry: Flax Linen image classifiers looked up by ``config.model.name``.

Every model is called as::

  logits, updates = model.apply(
      variables, images, train=True, mutable=['batch_stats'])  # clean training pass
  logits = model.apply(variables, images, train=False)        # eval, nothing mutable

with ``images`` float32 [batch, height, width, channels] and ``logits`` float32
[batch, num_classes]. ``variables`` holds ``params`` (float32) and ``batch_stats``
(BatchNorm running mean/var, PyTorch defaults momentum 0.1 / epsilon 1e-5). Models take a
``dtype`` keyword for the computation dtype.

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

from saf_jax.models import cnn, resnet

MODELS = {
  'cnn': cnn.CNN,
  'resnet18': resnet.ResNet18,
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

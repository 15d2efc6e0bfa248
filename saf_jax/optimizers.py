"""The base optimizer every method shares, and the run's optimizer built from a config.

The base optimizer (SGD with momentum or AdamW), its warm-up + cosine or constant
learning-rate schedule, and its weight decay are the same for every method, so that any
two runs with one seed differ only in their method. ``create_optimizer`` wraps the base in
the method's SAM-family transform (``methods.Method.optimizer``).
"""

import functools

import jax
import ml_collections
import optax

from saf_jax import methods


def base_optimizer(
  opt_config: ml_collections.ConfigDict, *, steps_per_epoch: int, num_epochs: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The base optimizer and its learning rate per step.

  The base optimizer follows PyTorch's ``torch.optim.SGD`` as used by the paper: weight
  decay is an L2 term added to the gradient before momentum (``add_decayed_weights``
  then ``sgd``), momentum without dampening. AdamW decays weights decoupled from the
  gradient. With ``decay_norm_and_bias=False`` 1-D parameters (biases, BatchNorm scale
  and bias) are not decayed, as timm's default for the paper's code.

  Args:
    opt_config: ``config.optimizer`` (``name``, ``lr``, ``schedule``, ``warmup_epochs``,
      ``weight_decay``, ``decay_norm_and_bias``, ``momentum``; ``b1``, ``b2`` for AdamW).
    steps_per_epoch: optimizer steps in one epoch.
    num_epochs: the schedule's length in epochs.

  Returns:
    ``(tx, schedule)``: the optax transform, and the learning rate as a function of the
    step (a linear warm-up over ``warmup_epochs``, then cosine decay to 0 or constant).
  """
  total_steps = steps_per_epoch * num_epochs
  warmup_steps = int(round(opt_config.warmup_epochs * steps_per_epoch))
  if opt_config.schedule == 'cosine':
    main = optax.cosine_decay_schedule(opt_config.lr, total_steps - warmup_steps)
  else:
    main = optax.constant_schedule(opt_config.lr)
  schedule = main
  if warmup_steps:
    warmup = optax.linear_schedule(0.0, opt_config.lr, warmup_steps)
    schedule = optax.join_schedules([warmup, main], [warmup_steps])
  mask = None
  if not opt_config.decay_norm_and_bias:
    mask = functools.partial(jax.tree.map, lambda p: p.ndim > 1)
  if opt_config.name == 'sgd':
    tx = optax.chain(
      optax.add_decayed_weights(opt_config.weight_decay, mask=mask),
      optax.sgd(schedule, momentum=opt_config.momentum or None),
    )
  else:
    tx = optax.adamw(
      schedule,
      b1=opt_config.b1,
      b2=opt_config.b2,
      weight_decay=opt_config.weight_decay,
      mask=mask,
    )
  return tx, schedule


def create_optimizer(
  config: ml_collections.ConfigDict,
  *,
  steps_per_epoch: int,
  batch_axis_name: str | None = None,
) -> optax.GradientTransformation:
  """The run's optimizer: the base optimizer, wrapped by the SAM-family method if any.

  For a SAM-family method weight decay thus acts on the final gradient at
  :math:`\\theta` only, never on the perturbation (as in the ESAM and GSAM authors'
  PyTorch code; Foret et al.'s JAX code instead adds an L2 term to the loss, which then
  also enters the perturbation).

  Args:
    config: the run's config (``optimizer``, ``method``, ``num_epochs``, ``seed``).
    steps_per_epoch: optimizer steps in one epoch; the schedule spans ``num_epochs``.
    batch_axis_name: for the per-device perturbation scope, the mesh axis the SAM-family
      transform averages its final gradient over (see ``transforms.sam``).

  Returns:
    An optax transform; for a SAM-family method it takes ``grad_fn`` in ``update``.
  """
  base, schedule = base_optimizer(
    config.optimizer, steps_per_epoch=steps_per_epoch, num_epochs=config.num_epochs
  )
  method = methods.parse(config.method.name)
  return method.optimizer(base, config, schedule=schedule, batch_axis_name=batch_axis_name)

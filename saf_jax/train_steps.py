r"""Pure train and eval steps for vanilla training (SGD/AdamW), SAF and MESA.

One step of Algorithm 1 of Du et al. 2022, for a mini-batch :math:`B` in epoch :math:`e`:

.. math::

  \mathcal{L}(\theta) = L_B(f_\theta) + [e > E_{start}]\;\lambda\, L^{tra}_B(f_\theta, t)

with :math:`t` the target logits: the batch's own logits from :math:`\tilde E` epochs
ago (SAF, Eq. 9, carried in the batch as ``target_logits``/``target_mask``) or the
EMA model's eval-mode logits (MESA, Eq. 13). Whether the trajectory term is active is
a static argument of the step factory, so the loop compiles one step for epochs
:math:`\le E_{start}` and one for later epochs, and MESA's teacher forward runs only
when its loss is used.

BatchNorm policy: the student's ``batch_stats`` are updated exactly once per step, from
its own training forward pass. MESA's teacher runs in eval mode with
``ema_batch_stats`` and writes nothing.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from saf_jax import losses, train_state, transforms

METHODS = ('sgd', 'saf', 'mesa')


def _apply_train(model, params, batch_stats, images):
  """Training-mode forward; returns (float32 logits, new batch_stats)."""
  logits, new_vars = model.apply(
    {'params': params, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats']
  )
  return logits.astype(jnp.float32), new_vars.get('batch_stats', batch_stats)


def _apply_eval(model, params, batch_stats, images):
  logits = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=False)
  return logits.astype(jnp.float32)


def make_train_step(
  *,
  model: Any,
  tx: optax.GradientTransformation,
  method: str,
  lam: float = 0.0,
  tau: float = 1.0,
  ema_decay: float = 0.0,
  trajectory_active: bool = False,
) -> Callable:
  r"""Builds ``train_step(state, batch) -> (state, metrics, logits)``.

  Args:
    model: a Flax module called as ``apply(variables, images, train=..., mutable=...)``.
    tx: the base optimizer (an optax transform); gradients go in, updates come out.
    method: 'sgd' (vanilla training with ``tx``), 'saf' or 'mesa'.
    lam: :math:`\lambda \ge 0`, weight of the trajectory loss (Algorithm 1, line 11).
    tau: :math:`\tau > 0`, temperature of the trajectory loss (Eq. 9, 13).
    ema_decay: :math:`\beta \in (0, 1)` of MESA's EMA (Eq. 10); unused otherwise.
    trajectory_active: whether :math:`e > E_{start}` (Algorithm 1, line 10).

  Returns:
    A pure function. ``batch`` is a dict with ``image`` float32 [B, H, W, C], ``label``
    int32 [B], ``index`` int32 [B], and for SAF ``target_logits`` float32 [B, K] and
    ``target_mask`` float32 [B]. ``metrics`` is a dict of float32 scalars: ``loss``,
    ``ce_loss``, ``trajectory_loss`` (unweighted, :math:`\tau^2`-scaled; 0 when
    inactive), ``accuracy``, ``l2_grads``, ``l2_params`` and, for SAF,
    ``table_valid_fraction``. ``logits`` is the training forward's own float32 [B, K]
    logits for SAF (Algorithm 1, line 4) and None otherwise.

  Raises:
    ValueError: for an unknown ``method``.
  """
  if method not in METHODS:
    raise ValueError(f'config.method.name must be one of {list(METHODS)}, got {method!r}.')
  use_trajectory = trajectory_active and method in ('saf', 'mesa')

  def train_step(state: train_state.TrainState, batch: dict[str, jax.Array]):
    images, labels = batch['image'], batch['label']
    if method == 'mesa' and use_trajectory:
      # Eq. 13: the EMA teacher, eval mode, its own EMA batch stats, no gradient.
      target_logits = jax.lax.stop_gradient(
        _apply_eval(model, state.ema_params, state.ema_batch_stats, images)
      )
      target_mask = None
    elif method == 'saf' and use_trajectory:
      target_logits = batch['target_logits']  # Algorithm 1, line 5: from E_tilde epochs ago.
      target_mask = batch['target_mask']

    def loss_fn(params):
      logits, new_batch_stats = _apply_train(model, params, state.batch_stats, images)
      ce = losses.cross_entropy(logits, labels)
      if use_trajectory:
        traj = losses.trajectory_loss(logits, target_logits, temperature=tau, mask=target_mask)
        loss = ce + lam * traj  # Algorithm 1, line 11.
      else:
        traj = jnp.zeros([], jnp.float32)
        loss = ce  # Algorithm 1, line 13.
      return loss, (logits, new_batch_stats, ce, traj)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, new_batch_stats, ce, traj)), grads = grad_fn(state.params)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
      step=state.step + 1,
      params=new_params,
      batch_stats=new_batch_stats,
      opt_state=new_opt_state,
    )
    if method == 'mesa':
      # Eq. 10 after every step, also before E_start, so the teacher is ready then.
      new_state = new_state.replace(
        ema_params=transforms.ema_update(state.ema_params, new_params, ema_decay=ema_decay),
        ema_batch_stats=transforms.ema_update(
          state.ema_batch_stats, new_batch_stats, ema_decay=ema_decay
        ),
      )
    metrics = {
      'loss': loss,
      'ce_loss': ce,
      'trajectory_loss': traj,
      'accuracy': jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32)),
      'l2_grads': optax.global_norm(grads),
      'l2_params': optax.global_norm(new_params),
    }
    if method == 'saf':
      metrics['table_valid_fraction'] = (
        jnp.mean(batch['target_mask']) if 'target_mask' in batch else jnp.zeros([])
      )
    out_logits = jax.lax.stop_gradient(logits) if method == 'saf' else None
    return new_state, metrics, out_logits

  return train_step


def eval_step(
  model: Any, params: Any, batch_stats: Any, batch: dict[str, jax.Array]
) -> dict[str, jax.Array]:
  """Sums of correct predictions, cross-entropy and example count over a padded batch.

  Args:
    model: the Flax module.
    params: pytree of weights (the student's, or MESA's ``ema_params``).
    batch_stats: matching BatchNorm statistics (eval mode, not updated).
    batch: dict with ``image`` float32 [B, H, W, C], ``label`` int32 [B] and ``mask``
      float32 [B] (0 on padding).

  Returns:
    dict of float32 scalars ``correct``, ``loss_sum`` (nats) and ``count``; top-1
    accuracy is ``correct / count``.
  """
  logits = _apply_eval(model, params, batch_stats, batch['image'])
  mask = batch['mask'].astype(jnp.float32)
  nll = losses.per_example_cross_entropy(logits, batch['label'])
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  return {
    'correct': jnp.sum(correct * mask),
    'loss_sum': jnp.sum(nll * mask),
    'count': jnp.sum(mask),
  }

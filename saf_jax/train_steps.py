r"""Pure train and eval steps for every method: SGD/AdamW, SAF, MESA and the SAM family.

One step of Algorithm 1 of Du et al. 2022, for a mini-batch :math:`B` in epoch :math:`e`:

.. math::

  \mathcal{L}(\theta) = L_B(f_\theta) + [e > E_{start}]\;\lambda\, L^{tra}_B(f_\theta, t)

with :math:`t` the target logits: the batch's own logits from :math:`\tilde E` epochs
ago (SAF, Eq. 9, carried in the batch as ``target_logits``/``target_mask``) or the
EMA model's eval-mode logits (MESA, Eq. 13). Whether the trajectory term is active is
a static argument of the step factory, so the loop compiles one step for epochs
:math:`\le E_{start}` and one for later epochs, and MESA's teacher forward runs only
when its loss is used.

A SAM-family method (``saf_jax.transforms``; alone, or composed as ``'saf+sam'``) takes
its second gradient of the same objective, with the same targets, at perturbed params.
MSAM takes no gradient at :math:`\theta`: its step's one forward-backward is at
:math:`\tilde\theta = ` ``transforms.msam_perturbed_params(opt_state, params)``.

BatchNorm policy: the student's ``batch_stats`` are updated exactly once per step, from
its own training forward pass at :math:`\theta` (for MSAM, the only one, at
:math:`\tilde\theta`). Perturbed passes normalise with their batch's statistics and
write none; MESA's teacher runs in eval mode with ``ema_batch_stats`` and writes nothing.
With gradient accumulation (``accum_steps``; ``saf_jax.accumulate``) that forward is one
per micro-batch, and the running statistics are the mean of their updates, still once per
step.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from saf_jax import accumulate, losses, methods, train_state, transforms


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
  method: str | methods.Method,
  lam: float = 0.0,
  tau: float = 1.0,
  ema_decay: float = 0.0,
  model_ema_decay: float = 0.0,
  trajectory_active: bool = False,
  batch_axis_name: str | None = None,
  sam_step: bool | None = None,
  label_smoothing: float = 0.0,
  accum_steps: int = 1,
  accum_scope: str = 'accumulated',
) -> Callable:
  r"""Builds ``train_step(state, batch) -> (state, metrics, logits)``.

  The objective of a step is :math:`L_B(\theta) = \mathrm{CE}_B(\theta)` plus, for SAF
  and MESA once active, :math:`\lambda L^{tra}_B(\theta)` (Algorithm 1, line 11). For a
  SAM-family method (alone or composed, e.g. 'saf+sam'), ``tx`` is the matching
  transform of ``saf_jax.transforms`` and receives the clean gradient plus ``grad_fn``,
  the gradient of the same objective (same targets) at perturbed params.

  MSAM (``'msam'``, ``'saf+msam'``, ...) has one forward-backward per step, at
  :math:`\tilde\theta_t = \theta_t - \rho v_t/\|v_t\|` (``transforms.msam``): its loss,
  logits, metrics and ``l2_grads`` are those of :math:`\tilde\theta_t`, and ``tx``
  receives that gradient without ``grad_fn``; ``state.params`` stay :math:`\theta_t`.

  BatchNorm policy, for every method: ``batch_stats`` are updated exactly once per step,
  from the clean training forward at :math:`\theta` (MSAM: from its only forward, at
  :math:`\tilde\theta_t`). Perturbed passes (SAM family, m-RWP's noisy pass) normalise
  with their batch's statistics and write none; MESA's teacher runs in eval mode with
  ``ema_batch_stats`` and writes none.

  Args:
    model: a Flax module called as ``apply(variables, images, train=..., mutable=...)``.
    tx: the optimizer: the base optimizer (an optax transform) for 'sgd', 'saf', 'mesa';
      the SAM-family transform wrapping it otherwise (see ``optimizers.create_optimizer``).
    method: a name of ``methods.NAMES`` or its parsed ``methods.Method``.
    lam: :math:`\lambda \ge 0`, weight of the trajectory loss (Algorithm 1, line 11).
    tau: :math:`\tau > 0`, temperature of the trajectory loss (Eq. 9, 13).
    ema_decay: :math:`\beta \in (0, 1)` of MESA's EMA (Eq. 10); unused otherwise.
    model_ema_decay: decay of the evaluation-only model EMA (``state.model_ema_params``,
      updated after every step like MESA's, from the new params and batch_stats); 0 when
      the state has none.
    trajectory_active: whether :math:`e > E_{start}` (Algorithm 1, line 10).
    batch_axis_name: None for the usual step under ``jit`` (the loss is the global
      batch's mean). For the per-device perturbation scope, the mesh axis over which the
      step runs inside ``jax.shard_map``: each device computes its shard's clean and
      perturbed gradients, the transform averages the final gradient over this axis, and
      the new ``batch_stats`` and the metrics are averaged too (BatchNorm then normalises
      with each device's shard statistics, as in the original SAM's m-sharpness).
    sam_step: LookSAM only: True for a step with ``state.step % k == 0`` (full SAM
      gradient), False for a reuse step; None decides in the graph (``jax.lax.cond``).
    label_smoothing: :math:`\epsilon` of the cross-entropy term (``losses``); the
      trajectory loss never uses it.
    accum_steps: :math:`M \ge 1`: the batch (per device, in the per-device scope) is
      processed as :math:`M` micro-batches of rows ``j::M`` in one ``lax.scan``, and the
      gradient is their mean (``saf_jax.accumulate``: the global counts normalise each
      micro-batch, so without BatchNorm the step equals the one-batch step; with it, each
      micro-batch normalises with its own statistics and the running statistics get one
      update from the mean of the micro-batches' statistics). MESA's teacher runs per
      micro-batch; SAF's logits are returned [B, K] in batch order. 1: no accumulation.
    accum_scope: with :math:`M > 1` and a SAM-family method, ``'accumulated'`` perturbs with
      the mean gradient of the whole batch (the transform's ``grad_fn`` scans the
      micro-batches again at the perturbed params) and ``'per_microbatch'`` with each
      micro-batch's own gradient, averaging the final gradients (not for LookSAM, MSAM,
      m-RWP: ``accumulate.PER_MICROBATCH_REFUSED``).

  Returns:
    A pure function. ``batch`` is a dict with ``image`` float32 [B, H, W, C], ``label``
    int32 [B], ``index`` int32 [B], and for SAF ``target_logits`` float32 [B, K] and
    ``target_mask`` float32 [B]. ``metrics`` is a dict of float32 scalars: ``loss``,
    ``ce_loss``, ``trajectory_loss`` (unweighted, :math:`\tau^2`-scaled; 0 when
    inactive), ``accuracy``, ``l2_grads`` (of the clean gradient), ``l2_params`` and, for
    SAF, ``table_valid_fraction``. ``logits`` is the training forward's own float32
    [B, K] logits for SAF (Algorithm 1, line 4) and None otherwise.

  Raises:
    ValueError: for an unknown ``method``, ``accum_steps < 1``, an unknown ``accum_scope``
      or one refused for the method; when traced, for a batch that ``accum_steps`` does
      not divide.
  """
  method = methods.parse(method)
  trajectory, perturbation = method.trajectory, method.perturbation
  use_trajectory = trajectory_active and trajectory is not None
  accumulate.check_accum_steps(accum_steps)
  if accum_scope not in accumulate.ACCUM_SCOPES:
    raise ValueError(
      f'accum_scope must be one of {list(accumulate.ACCUM_SCOPES)}, got {accum_scope!r}.'
    )
  refused = accumulate.PER_MICROBATCH_REFUSED.get(perturbation)
  if accum_steps > 1 and accum_scope == 'per_microbatch' and refused:
    raise ValueError(f"accum_scope='per_microbatch' does not apply to {perturbation}: {refused}.")

  def pmean(tree):
    return tree if batch_axis_name is None else jax.lax.pmean(tree, batch_axis_name)

  def train_step(state: train_state.TrainState, batch: dict[str, jax.Array]):
    full = {'image': batch['image'], 'label': batch['label']}
    if use_trajectory:
      full.update(_trajectory_targets(model, state, batch, trajectory, accum_steps))
    objective = _objective_fn(
      model,
      state.batch_stats,
      lam=lam if use_trajectory else None,
      tau=tau,
      label_smoothing=label_smoothing,
      per_example_kl=perturbation == 'esam',
    )
    params = state.params
    if perturbation == 'msam':
      # Algorithm 1 of Becker et al. 2024: the step's only gradient is at theta_tilde.
      params = transforms.msam_perturbed_params(state.opt_state, state.params)
    if batch_axis_name is not None:
      # Inside shard_map the gradient w.r.t. a replicated input is summed over devices;
      # marking params device-varying keeps each device's own shard gradient.
      params = jax.tree.map(lambda x: jax.lax.pcast(x, batch_axis_name, to='varying'), params)
    if accum_steps == 1:
      grad_fn = jax.value_and_grad(objective, has_aux=True)
      (loss, (logits, new_batch_stats, ce, traj, per_example)), grads = grad_fn(params, full)
      extra_args = {}
      if perturbation not in (None, 'msam'):  # MSAM's grads are already at theta_tilde.
        extra_args = _perturbation_args(perturbation, objective, full, per_example, sam_step)
    else:
      (loss, logits, new_batch_stats, ce, traj), grads, extra_args = accumulate.accumulated_pass(
        objective,
        params,
        full,
        num=accum_steps,
        perturbation=perturbation,
        scope=accum_scope,
        sam_step=sam_step,
      )
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params, **extra_args)
    new_params = optax.apply_updates(state.params, updates)
    new_batch_stats = pmean(new_batch_stats)
    new_state = state.replace(
      step=state.step + 1,
      params=new_params,
      batch_stats=new_batch_stats,
      opt_state=new_opt_state,
    )
    new_state = _with_emas(
      state,
      new_state,
      ema_decay=ema_decay if trajectory == 'mesa' else None,
      model_ema_decay=model_ema_decay,
    )
    metrics = {
      'loss': loss,
      'ce_loss': ce,
      'trajectory_loss': traj,
      'accuracy': jnp.mean((jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)),
    }
    if trajectory == 'saf':
      metrics['table_valid_fraction'] = (
        jnp.mean(batch['target_mask']) if 'target_mask' in batch else jnp.zeros([])
      )
    metrics = pmean(metrics)
    metrics['l2_grads'] = optax.global_norm(pmean(grads))
    metrics['l2_params'] = optax.global_norm(new_params)
    out_logits = jax.lax.stop_gradient(logits) if trajectory == 'saf' else None
    return new_state, metrics, out_logits

  return train_step


def _trajectory_targets(model, state, batch, trajectory: str, accum_steps: int):
  """The trajectory loss's targets ``t`` for the batch (SAF: with their mask), a dict."""
  if trajectory == 'mesa':
    # Eq. 13: the EMA teacher, eval mode, its own EMA batch stats, no gradient.
    def teacher_fn(images):
      return _apply_eval(model, state.ema_params, state.ema_batch_stats, images)

    if accum_steps == 1:
      teacher = teacher_fn(batch['image'])
    else:  # One micro-batch's forward at a time; [B, K] in batch order.
      teacher = accumulate.map_microbatches(teacher_fn, batch['image'], accum_steps)
    return {'target_logits': jax.lax.stop_gradient(teacher)}
  # Algorithm 1, line 5: the logits of E_tilde epochs ago, masked where not recorded.
  return {'target_logits': batch['target_logits'], 'target_mask': batch['target_mask']}


def _objective_fn(model, batch_stats, *, lam, tau, label_smoothing, per_example_kl) -> Callable:
  """``objective(params, batch, denominators=None) -> (loss, (logits, batch_stats, ce, traj,
  per_example))``.

  The step's objective: the cross-entropy (Algorithm 1, line 13) plus, when ``lam`` is not
  None, ``lam`` times the trajectory loss against ``batch['target_logits']`` (line 11).
  ``per_example`` is each example's cross-entropy, plus its share of the trajectory term
  when ``per_example_kl`` (ESAM's SDS ranks examples by their share of the objective).
  With ``denominators`` (a micro-batch, ``accumulate.denominators``) the means are sums
  over ``denominators['ce']`` and ``['kl']``, weighted by ``batch['weight']`` if present.
  """

  def objective(params, sub, denominators=None):
    logits, new_batch_stats = _apply_train(model, params, batch_stats, sub['image'])
    per_example = losses.per_example_cross_entropy(
      logits, sub['label'], label_smoothing=label_smoothing
    )
    weight = sub.get('weight')
    if denominators is None:
      ce = jnp.mean(per_example)
    else:
      ce = jnp.sum(per_example if weight is None else per_example * weight) / denominators['ce']
    traj = jnp.zeros([], jnp.float32)
    loss = ce  # Algorithm 1, line 13.
    if lam is not None:
      mask = sub.get('target_mask')
      if weight is not None:
        mask = weight if mask is None else mask * weight
      kl_den = None if denominators is None else denominators['kl']
      traj = losses.trajectory_loss(
        logits, sub['target_logits'], temperature=tau, mask=mask, denominator=kl_den
      )
      loss = ce + lam * traj  # Algorithm 1, line 11.
      if per_example_kl:
        kl = losses.per_example_kl(logits, sub['target_logits'], temperature=tau)
        if mask is not None or kl_den is not None:  # Each one's share: mean(...) == loss.
          den = kl_den if kl_den is not None else jnp.maximum(jnp.sum(mask), 1.0)
          kl = (kl if mask is None else kl * mask) * kl.shape[0] / den
        per_example = per_example + lam * tau**2 * kl
    return loss, (logits, new_batch_stats, ce, traj, per_example)

  return objective


def _perturbation_args(perturbation, objective, full, per_example, sam_step) -> dict[str, Any]:
  """The extra arguments of a SAM-family transform's ``update``: ``grad_fn`` and its kin."""

  def perturbed_grad_fn(params, indices=None):
    # Perturbed passes write no batch_stats: the aux output is dropped.
    sub = full if indices is None else jax.tree.map(lambda x: x[indices], full)
    return jax.grad(lambda p: objective(p, sub)[0])(params)

  extra_args = {'grad_fn': perturbed_grad_fn}
  if perturbation == 'looksam' and sam_step is not None:
    extra_args['sam_step'] = sam_step
  if perturbation == 'esam':
    extra_args['per_example_loss_fn'] = lambda p: objective(p, full)[1][4]
    extra_args['per_example_losses'] = per_example
  return extra_args


def _with_emas(state, new_state, *, ema_decay: float | None, model_ema_decay: float):
  """``new_state`` with MESA's EMA (``ema_decay`` not None) and the model EMA (> 0) updated."""
  if ema_decay is not None:
    # Eq. 10 after every step, also before E_start, so the teacher is ready then.
    new_state = new_state.replace(
      ema_params=transforms.ema_update(state.ema_params, new_state.params, ema_decay=ema_decay),
      ema_batch_stats=transforms.ema_update(
        state.ema_batch_stats, new_state.batch_stats, ema_decay=ema_decay
      ),
    )
  if model_ema_decay > 0:
    new_state = new_state.replace(
      model_ema_params=transforms.ema_update(
        state.model_ema_params, new_state.params, ema_decay=model_ema_decay
      ),
      model_ema_batch_stats=transforms.ema_update(
        state.model_ema_batch_stats, new_state.batch_stats, ema_decay=model_ema_decay
      ),
    )
  return new_state


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

"""Train steps: lam=0 reduces SAF/MESA to SGD, the EMA closed form, BatchNorm updated once."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saf_jax import losses, methods, train_state, train_steps, transforms

NUM_CLASSES = 5


class _DenseBN(nn.Module):
  """Test-only model: Dense -> BatchNorm (momentum 0.9, as the real models)."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(NUM_CLASSES)(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)


def _setup(method, seed=0):
  model = _DenseBN()
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
  state = train_state.create_train_state(
    model, tx, rng=jax.random.key(seed), image_shape=(4, 4, 1), method=method
  )
  return model, tx, state


def _batches(num, batch_size=8, seed=0, constant=False):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    if constant:
      image = np.full((batch_size, 4, 4, 1), 0.7, np.float32)
    else:
      image = rng.normal(size=(batch_size, 4, 4, 1)).astype(np.float32)
    out.append(
      {
        'image': image,
        'label': rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32),
        'index': rng.permutation(100)[:batch_size].astype(np.int32),
        'target_logits': rng.normal(size=(batch_size, NUM_CLASSES)).astype(np.float32) * 3,
        'target_mask': (rng.random(batch_size) > 0.3).astype(np.float32),
      }
    )
  return out


def _run(method, batches, **hparams):
  model, tx, state = _setup(method)
  step = jax.jit(train_steps.make_train_step(model=model, tx=tx, method=method, **hparams))
  history = [state]
  for batch in batches:
    state, metrics, _ = step(state, batch)
    history.append(state)
  return history, metrics


def _assert_trees_equal(a, b, exact=True):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if exact:
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('method, extra', [('saf', {}), ('mesa', {'ema_decay': 0.9})])
def test_lam_zero_gives_exactly_the_sgd_params(method, extra):
  batches = _batches(3)
  sgd_history, _ = _run('sgd', batches)
  history, metrics = _run(method, batches, lam=0.0, tau=5.0, trajectory_active=True, **extra)
  assert float(metrics['trajectory_loss']) > 0  # The term is computed, just weighted by 0.
  _assert_trees_equal(history[-1].params, sgd_history[-1].params)
  _assert_trees_equal(history[-1].batch_stats, sgd_history[-1].batch_stats)


@pytest.mark.parametrize('method, extra', [('saf', {}), ('mesa', {'ema_decay': 0.9})])
def test_positive_lam_changes_the_update(method, extra):
  batches = _batches(2)
  sgd_history, _ = _run('sgd', batches)
  history, _ = _run(method, batches, lam=0.5, tau=5.0, trajectory_active=True, **extra)
  diff = jax.tree.map(lambda a, b: np.abs(a - b).max(), history[-1].params, sgd_history[-1].params)
  assert max(jax.tree.leaves(diff)) > 1e-6


def _manual_objective(model, state, batch, target_logits, mask, *, lam, tau):
  """CE + lam * trajectory_loss of ``batch`` as a function of params, written out directly."""

  def loss(params):
    z, _ = model.apply(
      {'params': params, 'batch_stats': state.batch_stats},
      batch['image'],
      train=True,
      mutable=['batch_stats'],
    )
    traj = losses.trajectory_loss(z, target_logits, temperature=tau, mask=mask)
    return losses.cross_entropy(z, batch['label']) + lam * traj

  return loss


def _manual_sgd_update(model, tx, state, batch, target_logits, mask, *, lam, tau):
  """Params after one step on CE + lam * trajectory_loss, written out directly."""
  loss = _manual_objective(model, state, batch, target_logits, mask, lam=lam, tau=tau)
  updates, _ = tx.update(jax.grad(loss)(state.params), state.opt_state, state.params)
  return optax.apply_updates(state.params, updates)


def test_saf_gradient_is_ce_plus_lam_masked_trajectory():
  model, tx, state = _setup('saf')
  batch = _batches(1)[0]
  lam, tau = 0.3, 5.0
  step = train_steps.make_train_step(
    model=model, tx=tx, method='saf', lam=lam, tau=tau, trajectory_active=True
  )
  new_state, metrics, logits = jax.jit(step)(state, batch)

  want = _manual_sgd_update(
    model, tx, state, batch, batch['target_logits'], batch['target_mask'], lam=lam, tau=tau
  )
  _assert_trees_equal(new_state.params, want, exact=False)
  np.testing.assert_allclose(metrics['table_valid_fraction'], batch['target_mask'].mean())
  # The logits returned for the table are the training forward's own (Algorithm 1,
  # line 4): train-mode BatchNorm, the pre-update params.
  train_logits, _ = model.apply(
    {'params': state.params, 'batch_stats': state.batch_stats},
    batch['image'],
    train=True,
    mutable=['batch_stats'],
  )
  np.testing.assert_allclose(logits, train_logits, rtol=1e-6, atol=1e-6)
  eval_logits = model.apply(
    {'params': state.params, 'batch_stats': state.batch_stats}, batch['image'], train=False
  )
  assert np.abs(np.asarray(logits) - np.asarray(eval_logits)).max() > 1e-3


def test_mesa_teacher_is_eval_mode_ema_without_gradient():
  model, tx, state = _setup('mesa')
  batches = _batches(2)
  step = jax.jit(
    train_steps.make_train_step(
      model=model,
      tx=tx,
      method='mesa',
      lam=0.8,
      tau=5.0,
      ema_decay=0.5,
      trajectory_active=True,
    )
  )
  state, _, _ = step(state, batches[0])  # Now ema != params, ema_batch_stats != batch_stats.
  batch = batches[1]
  new_state, _, logits = step(state, batch)
  assert logits is None
  teacher = model.apply(
    {'params': state.ema_params, 'batch_stats': state.ema_batch_stats},
    batch['image'],
    train=False,
  )

  # The teacher's eval-mode logits of the EMA weights enter as a constant target.
  want = _manual_sgd_update(model, tx, state, batch, teacher, None, lam=0.8, tau=5.0)
  _assert_trees_equal(new_state.params, want, exact=False)


def test_ema_closed_form_over_three_steps():
  beta = 0.7
  history, _ = _run('mesa', _batches(3), lam=0.8, tau=5.0, ema_decay=beta, trajectory_active=True)
  for field, ema_field in (('params', 'ema_params'), ('batch_stats', 'ema_batch_stats')):
    thetas = [getattr(s, field) for s in history]  # theta_0 .. theta_3.
    want = jax.tree.map(
      lambda t0, t1, t2, t3: beta**3 * t0 + (1 - beta) * (beta**2 * t1 + beta * t2 + t3),
      *thetas,
    )
    _assert_trees_equal(getattr(history[-1], ema_field), want, exact=False)


@pytest.mark.parametrize('method', ['sgd', 'mesa'])
def test_model_ema_closed_form_and_its_own_decay(method):
  """config.eval.ema_decay: any method's eval-only EMA, apart from MESA's teacher."""
  beta, batches = 0.6, _batches(3)
  model, tx, state = _setup(method)
  state = train_state.create_train_state(
    model, tx, rng=jax.random.key(0), image_shape=(4, 4, 1), method=method, model_ema=True
  )
  hparams = {'ema_decay': 0.9, 'lam': 0.8, 'tau': 5.0} if method == 'mesa' else {}
  step = jax.jit(
    train_steps.make_train_step(
      model=model, tx=tx, method=method, model_ema_decay=beta, trajectory_active=True, **hparams
    )
  )
  history = [state]
  for batch in batches:
    history.append(step(history[-1], batch)[0])
  for field, ema_field in (
    ('params', 'model_ema_params'),
    ('batch_stats', 'model_ema_batch_stats'),
  ):
    thetas = [getattr(s, field) for s in history]
    want = jax.tree.map(
      lambda t0, t1, t2, t3: beta**3 * t0 + (1 - beta) * (beta**2 * t1 + beta * t2 + t3),
      *thetas,
    )
    _assert_trees_equal(getattr(history[-1], ema_field), want, exact=False)
  # It never enters the loss: the params are those of a run without it.
  plain, _ = _run(method, batches, trajectory_active=True, **hparams)
  _assert_trees_equal(history[-1].params, plain[-1].params)
  if method == 'mesa':  # The teacher keeps its own decay (0.9), so the two differ.
    assert not np.allclose(
      history[-1].ema_params['Dense_0']['kernel'], history[-1].model_ema_params['Dense_0']['kernel']
    )
  else:
    assert history[-1].ema_params is None


def _tx_for(method, base):
  """The SAM-family transform a method uses around ``base`` (the base alone otherwise)."""
  perturbation = methods.parse(method).perturbation
  return {
    None: lambda: base,
    'sam': lambda: transforms.sam(base, rho=0.05),
    'asam': lambda: transforms.asam(base, rho=0.5, eta=0.01),
    'gsam': lambda: transforms.gsam(
      base, learning_rate=0.1, lr_max=0.1, rho_max=0.05, rho_min=0.05, alpha=0.3
    ),
    'looksam': lambda: transforms.looksam(base, rho=0.05, k=2),
    'esam': lambda: transforms.esam(base, rho=0.05, beta=0.5, gamma=0.5),
    'msam': lambda: transforms.msam(base, rho=0.5),
    'rwp': lambda: transforms.rwp(base, sigma=0.05, lam=0.5),
  }[perturbation]()


@pytest.mark.parametrize('method', methods.NAMES)
@pytest.mark.parametrize('active', [False, True])
def test_student_batch_stats_change_exactly_once_per_step(method, active):
  trajectory = methods.parse(method).trajectory
  model, base, _ = _setup('sgd')
  tx = _tx_for(method, base)
  state = train_state.create_train_state(
    model, tx, rng=jax.random.key(0), image_shape=(4, 4, 1), method=method
  )
  batch = _batches(1, constant=True)[0]
  hparams = {} if trajectory is None else {'lam': 0.8, 'tau': 5.0}
  if trajectory == 'mesa':
    hparams['ema_decay'] = 0.9
  step = train_steps.make_train_step(
    model=model, tx=tx, method=method, trajectory_active=active, **hparams
  )
  new_state, _, _ = jax.jit(step)(state, batch)
  x = batch['image'].reshape(8, -1)
  dense = state.params['Dense_0']
  pre_bn_mean = (x @ dense['kernel'] + dense['bias']).mean(0)
  # Momentum 0.9 from zeros: one update gives 0.1 * mean; two would give 0.19 * mean,
  # which a SAM-family method writing its perturbed pass's statistics would produce.
  np.testing.assert_allclose(
    new_state.batch_stats['BatchNorm_0']['mean'], 0.1 * pre_bn_mean, rtol=1e-5, atol=1e-7
  )
  assert (
    max(
      jax.tree.leaves(
        jax.tree.map(lambda a, b: np.abs(a - b).max(), new_state.params, state.params)
      )
    )
    > 0
  )


def test_saf_plus_sam_perturbs_the_objective_with_the_trajectory_term():
  """'saf+sam': both gradients are of CE + lam * trajectory, the second at theta + eps."""
  model, base, state = _setup('saf')
  tx = transforms.sam(base, rho=0.1)
  state = state.replace(opt_state=tx.init(state.params))
  batch = _batches(1)[0]
  lam, tau, rho = 0.3, 5.0, 0.1
  step = train_steps.make_train_step(
    model=model, tx=tx, method='saf+sam', lam=lam, tau=tau, trajectory_active=True
  )
  new_state, metrics, logits = jax.jit(step)(state, batch)

  objective = _manual_objective(
    model, state, batch, batch['target_logits'], batch['target_mask'], lam=lam, tau=tau
  )

  g = jax.grad(objective)(state.params)
  g_norm = optax.global_norm(g)
  perturbed = jax.tree.map(lambda p, gi: p + rho * gi / g_norm, state.params, g)
  updates, _ = base.update(jax.grad(objective)(perturbed), state.opt_state.base_state, state.params)
  _assert_trees_equal(new_state.params, optax.apply_updates(state.params, updates), exact=False)
  np.testing.assert_allclose(metrics['loss'], objective(state.params), rtol=1e-6)
  np.testing.assert_allclose(metrics['l2_grads'], g_norm, rtol=1e-6)
  assert logits.shape == (8, NUM_CLASSES)  # SAF's table still gets the clean logits.


def test_ema_transform_matches_train_state_ema():
  beta = 0.9
  history, _ = _run('mesa', _batches(3), lam=0.0, tau=5.0, ema_decay=beta, trajectory_active=False)
  # The same params trajectory through the optax transform, put last in a chain.
  tx = optax.chain(optax.identity(), transforms.ema_params(ema_decay=beta))
  opt_state = tx.init(history[0].params)
  params = history[0].params
  for nxt in history[1:]:
    updates = jax.tree.map(lambda a, b: a - b, nxt.params, params)
    updates, opt_state = tx.update(updates, opt_state, params)
    params = optax.apply_updates(params, updates)
  _assert_trees_equal(transforms.get_ema_params(opt_state), history[-1].ema_params, exact=False)
  assert int(opt_state[1].count) == 3


def test_ema_transform_validates_and_passes_updates_through():
  with pytest.raises(ValueError, match='ema_decay'):
    transforms.ema_params(ema_decay=1.0)
  tx = transforms.ema_params(ema_decay=0.5)
  params = {'w': jnp.array([1.0, 2.0])}
  state = tx.init(params)
  updates, state = jax.jit(tx.update)({'w': jnp.array([1.0, 1.0])}, state, params)
  np.testing.assert_array_equal(updates['w'], [1.0, 1.0])
  np.testing.assert_allclose(state.ema_params['w'], [1.5, 2.5])  # 0.5*[1,2] + 0.5*[2,3].
  with pytest.raises(ValueError, match='params'):
    tx.update(updates, state)


def test_ema_transform_state_can_be_donated_with_params():
  tx = optax.chain(optax.sgd(0.1), transforms.ema_params(ema_decay=0.9))
  params = {'w': jnp.ones((3,))}
  opt_state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state):
    updates, opt_state = tx.update({'w': jnp.ones((3,))}, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = step(params, opt_state)  # Would fail if the EMA aliased params.
  np.testing.assert_allclose(transforms.get_ema_params(opt_state)['w'], 0.9 + 0.1 * 0.9)


def test_unknown_method_raises():
  with pytest.raises(ValueError, match=r"config.method.name must be one of \['sgd', 'saf', 'mesa'"):
    train_steps.make_train_step(model=None, tx=None, method='sam+saf')


def test_eval_step_ignores_padding():
  model, _, state = _setup('sgd')
  batch = _batches(1)[0]
  batch['mask'] = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  out = train_steps.eval_step(model, state.params, state.batch_stats, batch)
  logits = model.apply(
    {'params': state.params, 'batch_stats': state.batch_stats}, batch['image'], train=False
  )
  correct = (np.argmax(logits, -1) == batch['label'])[:5].sum()
  assert float(out['count']) == 5.0
  assert float(out['correct']) == correct


def test_looksam_host_chosen_steps_equal_the_in_graph_conditional():
  """The loop's two compiled LookSAM steps (picked by step number) = the lax.cond step."""
  model, base, _ = _setup('sgd')
  tx = transforms.looksam(base, rho=0.05, k=3, alpha=0.7)
  state = train_state.create_train_state(
    model, tx, rng=jax.random.key(0), image_shape=(4, 4, 1), method='looksam'
  )
  make = functools.partial(train_steps.make_train_step, model=model, tx=tx, method='looksam')
  in_graph = jax.jit(make())
  static = {flag: jax.jit(make(sam_step=flag)) for flag in (True, False)}
  a = b = state
  for i, batch in enumerate(_batches(7)):
    a, _, _ = in_graph(a, batch)
    b, _, _ = static[i % 3 == 0](b, batch)
  _assert_trees_equal(a.params, b.params, exact=False)
  _assert_trees_equal(a.opt_state.g_v, b.opt_state.g_v, exact=False)
  assert int(b.opt_state.count) == 7


def test_esam_per_example_losses_average_to_the_objective_under_a_partial_mask():
  """SDS ranks each example by its share of the very loss that is minimised."""

  def spy():
    def init_fn(params):
      del params
      return {'mean': jnp.zeros([]), 'refit': jnp.zeros([])}

    def update_fn(updates, state, params=None, **extra_args):
      del state
      losses_at_theta = extra_args['per_example_losses']
      refit = extra_args['per_example_loss_fn'](params)
      return updates, {
        'mean': jnp.mean(losses_at_theta),
        'refit': jnp.abs(refit - losses_at_theta).max(),
      }

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

  model, _, state = _setup('saf')
  tx = spy()
  state = state.replace(opt_state=tx.init(state.params))
  batch = _batches(1)[0]
  batch['target_mask'] = np.array([1, 0, 0, 1, 0, 1, 0, 0], np.float32)
  step = train_steps.make_train_step(
    model=model, tx=tx, method='saf+esam', lam=0.3, tau=5.0, trajectory_active=True
  )
  new_state, metrics, _ = jax.jit(step)(state, batch)
  np.testing.assert_allclose(new_state.opt_state['mean'], metrics['loss'], rtol=1e-6)
  assert metrics['trajectory_loss'] > 0
  assert float(new_state.opt_state['refit']) < 1e-5


def test_label_smoothing_enters_the_cross_entropy_only():
  batches = _batches(1)
  _, plain = _run('saf', batches, lam=0.3, tau=5.0, trajectory_active=True)
  _, smoothed = _run('saf', batches, lam=0.3, tau=5.0, trajectory_active=True, label_smoothing=0.1)
  model, _, state = _setup('saf')
  logits, _ = model.apply(
    {'params': state.params, 'batch_stats': state.batch_stats},
    batches[0]['image'],
    train=True,
    mutable=['batch_stats'],
  )
  want = float(
    jnp.mean(losses.per_example_cross_entropy(logits, batches[0]['label'], label_smoothing=0.1))
  )
  np.testing.assert_allclose(float(smoothed['ce_loss']), want, rtol=1e-6)
  assert float(smoothed['ce_loss']) != float(plain['ce_loss'])
  np.testing.assert_allclose(smoothed['trajectory_loss'], plain['trajectory_loss'], rtol=1e-6)

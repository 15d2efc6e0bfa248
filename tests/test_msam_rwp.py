"""MSAM and m-RWP: reductions to SGD, the papers' and authors' rules in NumPy, cost, BatchNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import default
from saf_jax import config_upgrade, methods, train, train_state, train_steps, transforms, validation

_rng = np.random.default_rng(0)
# A quadratic L(theta) = 1/2 theta^T A theta, A symmetric positive definite (eigenvalues ~1-5).
_M = _rng.normal(size=(5, 5))
A64 = _M @ _M.T / 5 + np.eye(5)
A = jnp.asarray(A64, jnp.float32)
THETA0 = _rng.normal(size=5)
# A small MLP 6 -> 8 (tanh) -> 3 on fixed random data: kernels and biases for RWP's filters.
X = jnp.asarray(_rng.normal(size=(16, 6)), jnp.float32)
Y = jnp.asarray(_rng.integers(0, 3, 16), jnp.int32)


def _quad_grad(theta):
  return A @ theta


def _mlp_params():
  k = jax.random.split(jax.random.key(0), 4)
  return {
    'dense1': {'kernel': jax.random.normal(k[0], (6, 8)), 'bias': 0.1 * jnp.ones(8)},
    'dense2': {'kernel': jax.random.normal(k[2], (8, 3)), 'bias': 0.1 * jnp.ones(3)},
  }


def _mlp_grad(params):
  def loss(p):
    h = jnp.tanh(X @ p['dense1']['kernel'] + p['dense1']['bias'])
    logits = h @ p['dense2']['kernel'] + p['dense2']['bias']
    return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()

  return jax.grad(loss)(params)


def _sgd(lr=0.1, wd=5e-4):
  """The code base's SGD: L2 term added to the gradient, then momentum 0.9 (PyTorch)."""
  return optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9))


def _history(tx, params, num_steps, step_fn):
  state, out = tx.init(params), []
  step = jax.jit(lambda p, s: step_fn(tx, p, s))
  for _ in range(num_steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    out.append((params, state))
  return out


def _clean_step(tx, params, state):
  """The SAM-family protocol: the clean gradient, and grad_fn for other points."""
  return tx.update(_mlp_grad(params), state, params, grad_fn=_mlp_grad)


def _msam_given_gradient(tx, params, state):
  """MSAM as the training step calls it: the gradient at theta_tilde, no grad_fn."""
  point = transforms.msam_perturbed_params(state, params)
  return tx.update(_mlp_grad(point), state, params)


def _msam_grad_fn(tx, params, state):
  return tx.update(None, state, params, grad_fn=_mlp_grad)


def _assert_trees(a, b, exact=True, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if exact:
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------
# MSAM.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('step_fn', [_msam_given_gradient, _msam_grad_fn])
def test_msam_with_rho_zero_is_sgd_with_momentum(step_fn):
  base = _history(_sgd(), _mlp_params(), 5, lambda tx, p, s: tx.update(_mlp_grad(p), s, p))
  got = _history(transforms.msam(_sgd(), rho=0.0), _mlp_params(), 5, step_fn)
  for (want_p, _), (got_p, _) in zip(base, got, strict=True):
    _assert_trees(got_p, want_p)
  moved = _history(transforms.msam(_sgd(), rho=0.5), _mlp_params(), 5, step_fn)
  assert not np.allclose(moved[-1][0]['dense1']['kernel'], base[-1][0]['dense1']['kernel'])


def _with_momentum(state, v):
  """An MSAM-around-optax.sgd state whose momentum buffer is ``v``."""
  trace, *rest = state.base_state
  return state._replace(base_state=(trace._replace(trace=jnp.asarray(v, jnp.float32)), *rest))


def test_msam_one_step_is_the_papers_algorithm():
  """Becker et al. 2024, Algorithm 1 (Fig. 1), one iteration from a nonzero momentum."""
  rho, mu, eta = 0.7, 0.9, 0.05
  v = _rng.normal(size=5)
  tx = transforms.msam(optax.sgd(eta, momentum=mu), rho=rho)
  state = _with_momentum(tx.init(jnp.asarray(THETA0, jnp.float32)), v)
  theta = jnp.asarray(THETA0, jnp.float32)
  updates, new_state = jax.jit(lambda p, s: tx.update(None, s, p, grad_fn=_quad_grad))(theta, state)
  new_theta = optax.apply_updates(theta, updates)

  w_tilde = THETA0 - rho * v / np.linalg.norm(v)  # The stored (perturbed) weights.
  g = A64 @ w_tilde  # Perturbed forward and backward pass.
  w = w_tilde + rho * v / np.linalg.norm(v)  # Remove the last perturbation.
  v_next = mu * v + g  # Update the momentum vector.
  w_next = w - eta * v_next  # SGD step.
  w_tilde_next = w_next - rho * v_next / np.linalg.norm(v_next)  # Perturb for the next one.

  np.testing.assert_allclose(new_theta, w_next, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(transforms.msam_momentum(new_state.base_state), v_next, rtol=1e-5)
  point = transforms.msam_perturbed_params(new_state, new_theta)
  np.testing.assert_allclose(point, w_tilde_next, rtol=1e-5, atol=1e-6)


def _authors_sgd_msam(num_steps, *, lr, rho, mu, wd):
  """optimizer/msam.py's MSAM.step, in NumPy: the weights stored are the perturbed ones.

  Returns each step's (move_back_from_momentumAscent() weights, stored weights).
  """
  p, buf, inverse_norm, out = THETA0.copy(), np.zeros(5), 0.0, []
  for t in range(num_steps):
    d_p = A64 @ p + wd * p  # The gradient at the stored weights, plus the L2 term there.
    p = p + rho * inverse_norm * buf  # Back to the unperturbed weights.
    buf = mu * buf + d_p
    p = p - lr(t) * buf
    inverse_norm = 1 / (np.linalg.norm(buf) + 1e-12)
    p = p - rho * inverse_norm * buf  # Ascend again.
    out.append((p + rho * inverse_norm * buf, p))
  return out


def _authors_adamw_msam(num_steps, *, lr, rho, b1, b2, eps, wd):
  """optimizer/adamW_msam.py's adamW_msam, in NumPy (same return as _authors_sgd_msam)."""
  p, m, s, norm_factor, out = THETA0.copy(), np.zeros(5), np.zeros(5), 0.0, []
  for t in range(num_steps):
    g = A64 @ p
    step = t + 1
    p = p + m * norm_factor  # Descent (back to the unperturbed weights).
    m = b1 * m + (1 - b1) * g
    s = b2 * s + (1 - b2) * g * g
    denom = np.sqrt(s) / np.sqrt(1 - b2**step) + eps
    p = p - lr(t) / (1 - b1**step) * m / denom
    p = p * (1 - lr(t) * wd)
    norm_factor = rho / (np.linalg.norm(m) + 1e-12)
    p = p - m * norm_factor  # Ascent.
    out.append((p + m * norm_factor, p))
  return out


@pytest.mark.parametrize('base', ['sgd', 'adamw'])
def test_msam_five_steps_follow_the_authors_optimizer(base):
  """Our unperturbed params are their weights after move_back_from_momentumAscent()."""
  rho = 0.5
  lr = lambda t: 0.05 * 0.9**t  # noqa: E731 (a schedule: rho must not follow it)
  if base == 'sgd':  # Their CIFAR optimizer, weight decay (added at the stored weights).
    tx = transforms.msam(_sgd(lr, wd=5e-4), rho=rho)
    want = _authors_sgd_msam(5, lr=lr, rho=rho, mu=0.9, wd=5e-4)
  else:  # AdamW_MSAM; its decay differs from optax.adamw's by O(lr * wd * rho), so wd = 0.
    tx = transforms.msam(optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0), rho=rho)
    want = _authors_adamw_msam(5, lr=lr, rho=rho, b1=0.9, b2=0.999, eps=1e-8, wd=0.0)
  theta0 = jnp.asarray(THETA0, jnp.float32)
  got = _history(tx, theta0, 5, lambda tx, p, s: tx.update(None, s, p, grad_fn=_quad_grad))
  for (theta, state), (unperturbed, stored) in zip(got, want, strict=True):
    np.testing.assert_allclose(theta, unperturbed, rtol=1e-5, atol=1e-6)
    point = transforms.msam_perturbed_params(state, theta)
    np.testing.assert_allclose(point, stored, rtol=1e-5, atol=1e-6)
  assert np.abs(want[-1][0] - want[-1][1]).max() > 0.1  # The perturbation is not negligible.


def test_msam_costs_one_gradient_per_step():
  calls = []

  def counting_grad(theta):
    calls.append(1)
    return _quad_grad(theta)

  tx = transforms.msam(_sgd(), rho=0.5)
  theta = jnp.asarray(THETA0, jnp.float32)
  state = tx.init(theta)
  for _ in range(5):  # Not jitted: every call is a gradient evaluation.
    updates, state = tx.update(None, state, theta, grad_fn=counting_grad)
    theta = optax.apply_updates(theta, updates)
  assert len(calls) == 5 and int(state.count) == 5


def test_msam_refuses_a_base_without_momentum_and_finds_its_state_in_a_chain():
  with pytest.raises(ValueError, match='exactly one momentum buffer'):
    transforms.msam(optax.sgd(0.1), rho=1.0).init({'w': jnp.ones(3)})
  with pytest.raises(ValueError, match='msam rho must be >= 0'):
    transforms.msam(_sgd(), rho=-1.0)
  tx = transforms.msam(_sgd(), rho=1.0)
  params = {'w': jnp.ones(3)}
  state = tx.init(params)
  _assert_trees(transforms.msam_perturbed_params((optax.EmptyState(), state), params), params)
  with pytest.raises(ValueError, match='one MSAMState'):
    transforms.msam_perturbed_params((state, state), params)
  with pytest.raises(ValueError, match='gradient at msam_perturbed_params'):
    tx.update(None, state, params)


# ---------------------------------------------------------------------------------------
# m-RWP.
# ---------------------------------------------------------------------------------------


def test_rwp_with_zero_noise_and_lam_one_is_sgd():
  base = _history(_sgd(), _mlp_params(), 4, lambda tx, p, s: tx.update(_mlp_grad(p), s, p))
  for sigma, lam in ((0.0, 1.0), (0.05, 0.0), (0.0, 0.5)):
    got = _history(transforms.rwp(_sgd(), sigma=sigma, lam=lam), _mlp_params(), 4, _clean_step)
    for (want_p, _), (got_p, _) in zip(base, got, strict=True):
      _assert_trees(got_p, want_p)
  noisy = _history(transforms.rwp(_sgd(), sigma=0.05, lam=1.0), _mlp_params(), 4, _clean_step)
  assert not np.allclose(noisy[-1][0]['dense1']['kernel'], base[-1][0]['dense1']['kernel'])


def test_rwp_one_step_equals_a_transcription_with_a_fixed_noise_key():
  sigma, lam, lr, wd, seed = 0.05, 0.3, 0.1, 5e-4, 3
  params = _mlp_params()
  tx = transforms.rwp(_sgd(lr, wd), sigma=sigma, lam=lam, seed=seed)
  updates, _ = jax.jit(lambda p, s: _clean_step(tx, p, s))(params, tx.init(params))
  got = optax.apply_updates(params, updates)

  # The step's standard normals: one key per leaf, from the documented key of step 0.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(transforms.rwp_noise_key(seed, 0), len(leaves))
  noise = []
  for k, x in zip(keys, leaves, strict=True):
    z = np.asarray(jax.random.normal(k, x.shape, jnp.float32), np.float64)
    x = np.asarray(x, np.float64)
    if x.ndim >= 2:  # Per output filter (the last axis of a Flax Dense kernel).
      std = sigma * np.sqrt((x**2).sum(axis=0, keepdims=True))
    else:
      std = sigma * (np.linalg.norm(x) + 1e-16)
    noise.append(std * z)
  perturbed = jax.tree.unflatten(treedef, [x + n for x, n in zip(leaves, noise, strict=True)])
  g, g_s = _mlp_grad(params), _mlp_grad(jax.tree.map(jnp.float32, perturbed))
  # lam weighs the perturbed gradient; SGD from zero momentum: v = g_m + wd * theta.
  want = jax.tree.map(
    lambda p, a, b: np.asarray(p) - lr * ((1 - lam) * np.asarray(a) + lam * np.asarray(b) + wd * p),
    params,
    g,
    g_s,
  )
  _assert_trees(got, want, exact=False)


def test_rwp_noise_has_the_documented_scale_per_filter():
  sigma, num_draws = 0.02, 400
  filter_scale = jnp.array([0.1, 1.0, 3.0, 10.0])
  params = {
    'conv': {'kernel': jax.random.normal(jax.random.key(1), (3, 3, 5, 4)) * filter_scale},
    'dense': {'kernel': jax.random.normal(jax.random.key(2), (10, 4)) * filter_scale},
    'bn': {'scale': jnp.arange(1.0, 7.0)},
  }
  keys = jax.random.split(jax.random.key(7), num_draws)
  noise = jax.vmap(lambda k: transforms.rwp_noise(k, params, sigma))(keys)
  for name in ('conv', 'dense'):
    x = np.asarray(params[name]['kernel'])
    eps = np.asarray(noise[name]['kernel']).reshape(num_draws, -1, 4)  # [draws, entries, filters]
    n = eps.shape[0] * eps.shape[1]
    want = sigma * np.sqrt((x.reshape(-1, 4) ** 2).sum(axis=0))  # sigma * ||filter||.
    got = eps.std(axis=(0, 1))
    # Sample std's relative standard error is 1/sqrt(2n): 5 of them.
    np.testing.assert_allclose(got, want, rtol=5 / np.sqrt(2 * n))
    np.testing.assert_array_less(np.abs(eps.mean(axis=(0, 1))), 5 * want / np.sqrt(n))
  eps = np.asarray(noise['bn']['scale']).ravel()
  want = sigma * np.linalg.norm(np.arange(1.0, 7.0))  # 1-D: the whole leaf's norm.
  np.testing.assert_allclose(eps.std(), want, rtol=5 / np.sqrt(2 * eps.size))
  # A step's noise is fixed by (seed, count); the next step draws anew.
  one = transforms.rwp_noise(transforms.rwp_noise_key(0, 5), params, sigma)
  _assert_trees(one, transforms.rwp_noise(transforms.rwp_noise_key(0, 5), params, sigma))
  other = transforms.rwp_noise(transforms.rwp_noise_key(0, 6), params, sigma)
  assert not np.allclose(one['bn']['scale'], other['bn']['scale'])
  _assert_trees(transforms.rwp_noise(keys[0], params, 0.0), jax.tree.map(jnp.zeros_like, params))


def test_rwp_bad_hyperparameters_raise():
  with pytest.raises(ValueError, match='rwp sigma must be >= 0'):
    transforms.rwp(_sgd(), sigma=-0.1)
  with pytest.raises(ValueError, match=r'rwp lam must lie in \[0, 1\]'):
    transforms.rwp(_sgd(), lam=1.5)
  tx = transforms.rwp(_sgd())
  with pytest.raises(ValueError, match='grad_fn'):
    tx.update(_mlp_grad(_mlp_params()), tx.init(_mlp_params()), _mlp_params())


# ---------------------------------------------------------------------------------------
# The training step: forward passes, BatchNorm, compositions.
# ---------------------------------------------------------------------------------------

NUM_CLASSES = 5
_FORWARDS = []  # The train flag of every forward traced.


class _DenseBN(nn.Module):
  """Dense -> BatchNorm (momentum 0.9, as the real models); records each forward."""

  @nn.compact
  def __call__(self, x, train: bool):
    _FORWARDS.append(train)
    x = nn.Dense(NUM_CLASSES)(x.reshape((x.shape[0], -1)))
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)


def _tx(method, base):
  perturbation = methods.parse(method).perturbation
  return {
    None: lambda: base,
    'sam': lambda: transforms.sam(base, rho=0.05),
    'msam': lambda: transforms.msam(base, rho=0.5),
    'rwp': lambda: transforms.rwp(base, sigma=0.05, lam=0.5),
  }[perturbation]()


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {
    'image': rng.normal(size=(8, 4, 4, 1)).astype(np.float32),
    'label': rng.integers(0, NUM_CLASSES, 8).astype(np.int32),
    'index': np.arange(8, dtype=np.int32),
    'target_logits': rng.normal(size=(8, NUM_CLASSES)).astype(np.float32),
    'target_mask': np.ones(8, np.float32),
  }


def _step_setup(method):
  model, base = _DenseBN(), _sgd()
  tx = _tx(method, base)
  state = train_state.create_train_state(
    model, tx, rng=jax.random.key(0), image_shape=(4, 4, 1), method=method
  )
  hparams = {'lam': 0.3, 'tau': 5.0, 'ema_decay': 0.9, 'trajectory_active': True}
  step = train_steps.make_train_step(model=model, tx=tx, method=method, **hparams)
  return model, base, state, jax.jit(step)


@pytest.mark.parametrize(
  'method, forwards',
  [('sgd', 1), ('msam', 1), ('saf+msam', 1), ('sam', 2), ('rwp', 2), ('mesa+rwp', 2)],
)
def test_training_step_forward_passes(method, forwards):
  """MSAM's step is one forward-backward (as SGD's); m-RWP's two (as SAM's)."""
  _, _, state, step = _step_setup(method)
  _FORWARDS.clear()
  step.lower(state, _batch())  # Traces the step once.
  assert _FORWARDS.count(True) == forwards  # Training-mode passes (MESA's teacher: eval).


def _pre_bn_mean(params, images):
  dense = params['Dense_0']
  return (images.reshape(8, -1) @ dense['kernel'] + dense['bias']).mean(0)


@pytest.mark.parametrize('method', ['msam', 'saf+msam'])
def test_msam_step_takes_its_one_gradient_at_theta_tilde(method):
  model, base, state, step = _step_setup(method)
  state, _, _ = step(state, _batch(0))  # Zero momentum: theta_tilde = theta here.
  batch = _batch(1)
  point = transforms.msam_perturbed_params(state.opt_state, state.params)
  assert transforms._sam_common.global_norm(jax.tree.map(jnp.subtract, point, state.params)) > 0.1
  new_state, metrics, logits = step(state, batch)

  def loss_fn(p):
    out, _ = model.apply(
      {'params': p, 'batch_stats': state.batch_stats},
      batch['image'],
      train=True,
      mutable=['batch_stats'],
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(out, batch['label']).mean()
    if method == 'msam':
      return ce, out
    log_q = jax.nn.log_softmax(out / 5.0)
    log_p = jax.nn.log_softmax(batch['target_logits'] / 5.0)
    kl = jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1))
    return ce + 0.3 * 25.0 * kl, out

  (loss, out), g = jax.value_and_grad(loss_fn, has_aux=True)(point)
  updates, _ = base.update(g, state.opt_state.base_state, point)  # Decay at theta_tilde.
  _assert_trees(new_state.params, optax.apply_updates(state.params, updates), exact=False)
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-5)
  # The step's one forward, at theta_tilde, is the one that writes batch_stats.
  want_mean = 0.9 * state.batch_stats['BatchNorm_0']['mean'] + 0.1 * _pre_bn_mean(
    point, batch['image']
  )
  np.testing.assert_allclose(new_state.batch_stats['BatchNorm_0']['mean'], want_mean, rtol=1e-5)
  if method == 'saf+msam':  # SAF's table receives that forward's logits.
    np.testing.assert_allclose(logits, out, rtol=1e-5, atol=1e-6)


def test_rwp_step_writes_batch_stats_from_the_clean_pass_only():
  _, _, state, step = _step_setup('rwp')
  batch = _batch(0)
  new_state, _, _ = step(state, batch)
  np.testing.assert_allclose(
    new_state.batch_stats['BatchNorm_0']['mean'],
    0.1 * _pre_bn_mean(state.params, batch['image']),
    rtol=1e-5,
    atol=1e-7,
  )


# ---------------------------------------------------------------------------------------
# Config: names, validation, upgrade; end to end.
# ---------------------------------------------------------------------------------------


def test_names_compose_with_saf_and_mesa():
  for name in ('msam', 'rwp', 'saf+msam', 'mesa+msam', 'saf+rwp', 'mesa+rwp'):
    assert name in methods.NAMES
  assert methods.parse('mesa+rwp') == methods.Method('mesa+rwp', 'mesa', 'rwp')


@pytest.mark.parametrize(
  'method, overrides, match',
  [
    ('msam', {'method.msam.rho': -1.0}, r'config.method.msam.rho must be a number >= 0'),
    (
      'saf+msam',
      {'optimizer.momentum': 0.0},
      r'config.optimizer.momentum must be > 0 for an msam method with optimizer.name=sgd',
    ),
    ('rwp', {'method.rwp.sigma': -0.01}, r'config.method.rwp.sigma must be a number >= 0'),
    ('mesa+rwp', {'method.rwp.lam': 1.5}, r'config.method.rwp.lam must be a number in \[0, 1\]'),
  ],
)
def test_bad_msam_and_rwp_configs_name_the_field(method, overrides, match):
  config = default.get_config(f'method={method}')
  for field, value in overrides.items():
    section, _, name = field.rpartition('.')
    target = config
    for part in section.split('.'):
      target = target[part]
    target[name] = value
  with pytest.raises(ValueError, match=match):
    validation.validate_config(config, num_devices=1)


def test_msam_with_adamw_needs_no_sgd_momentum_and_old_configs_upgrade():
  config = default.get_config('method=msam')
  config.optimizer.name, config.optimizer.momentum = 'adamw', 0.0  # AdamW's mu is the buffer.
  validation.validate_config(config, num_devices=1)
  old = default.get_config('method=mesa+rwp').to_dict()
  del old['method']['msam'], old['method']['rwp']
  upgraded = ml_collections.ConfigDict(config_upgrade.upgrade_config(old))
  validation.validate_config(upgraded, num_devices=1)
  assert upgraded.method.msam.rho == 3.0 and upgraded.method.rwp.to_dict() == {
    'sigma': 0.01,
    'lam': 0.5,
  }


@pytest.mark.parametrize('method', ['msam', 'rwp'])
def test_one_epoch_end_to_end(method, fashion_mnist_data_dir, tmp_path):
  from saf_jax.analysis import runs

  config = default.get_config(f'method={method},smoke')
  config.input.data_dir = fashion_mnist_data_dir
  config.num_epochs = 1
  config.analysis.sharpness_every_epochs = 0
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result.status == train.FINISHED and result.step == 512 // 64
  assert np.isfinite(result.record['train/loss']) and np.isfinite(result.record['test/accuracy'])
  state = runs.load_run(str(tmp_path), data_dir=fashion_mnist_data_dir).state
  if method == 'msam':  # The checkpoint holds theta; theta_tilde is derived from its state.
    assert isinstance(state.opt_state, transforms.MSAMState) and float(state.opt_state.rho) == 3.0
    point = transforms.msam_perturbed_params(state.opt_state, state.params)
    diff = jax.tree.map(jnp.subtract, point, state.params)
    np.testing.assert_allclose(transforms._sam_common.global_norm(diff), 3.0, rtol=1e-4)


_PER_DEVICE_SCRIPT = """
import jax, numpy as np
from configs import default
from saf_jax import data, experiment, train
from tests import test_train

assert jax.device_count() == 2
for method in ('msam', 'rwp'):
  params = {}
  for scope in ('global', 'per_device'):
    config = default.get_config(f'method={method},smoke')
    config.input.batch_size, config.input.placement = 4, 'host'
    config.method.perturbation_scope = scope
    config.method.msam.rho = 0.5
    info = data.DatasetInfo(
      name='fake', num_train=10, num_test=0, num_classes=3, image_shape=(1, 1, 3)
    )
    exp = experiment.create(config, info, model=test_train._DenseModel())
    state, table, fake = exp.init_state(), exp.new_table(), test_train._FakeDatasets()
    for epoch in (1, 2):
      batches = fake.train_epoch(epoch, batch_size=4)
      state, _, _ = train.run_steps(exp, state, batches, epoch=epoch, table=table)
    params[scope] = jax.device_get(state.params)
  for a, b in zip(*(jax.tree.leaves(p) for p in params.values()), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
print('ok')
"""


def test_per_device_scope_equals_global_without_batchnorm():
  """2 CPU devices, a model without BatchNorm: the mean of the devices' final gradients is
  the global one, for MSAM (one point for all) and m-RWP (the same noise on every device,
  each device's gradient at it its own shard's, not the sum over devices)."""
  import os
  import subprocess
  import sys

  from tests import conftest

  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  proc = subprocess.run(
    [sys.executable, '-c', _PER_DEVICE_SCRIPT],
    cwd=conftest.REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0 and proc.stdout.strip().endswith('ok'), proc.stderr[-3000:]

"""The SAM family as optax transforms: reductions, closed forms and NumPy transcriptions."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saf_jax import transforms

NAMES = ('sam', 'asam', 'gsam', 'looksam', 'esam')

# A small MLP, 6 -> 8 (tanh) -> 3, softmax cross-entropy on fixed random data.
_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.normal(size=(16, 6)), jnp.float32)
Y = jnp.asarray(_rng.integers(0, 3, 16), jnp.int32)

# A quadratic f(theta) = 1/2 theta^T A theta with A symmetric positive definite.
_M = _rng.normal(size=(5, 5))
A64 = _M @ _M.T + np.eye(5)
A = jnp.asarray(A64, jnp.float32)
THETA0 = jnp.asarray(_rng.normal(size=5), jnp.float32)


def _mlp_params(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  return {
    'dense1': {
      'kernel': 0.5 * jax.random.normal(k[0], (6, 8)),
      'bias': 0.1 * jax.random.normal(k[1], (8,)),
    },
    'dense2': {
      'kernel': 0.5 * jax.random.normal(k[2], (8, 3)),
      'bias': 0.1 * jax.random.normal(k[3], (3,)),
    },
  }


def _mlp_per_example_loss(params):
  p = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  h = jnp.tanh(X @ p['dense1']['kernel'] + p['dense1']['bias'])
  logits = h @ p['dense2']['kernel'] + p['dense2']['bias']
  return optax.softmax_cross_entropy_with_integer_labels(logits, Y)


def _mlp_grad(params, indices=None):
  """Gradient of the mean loss (over ``indices`` if given); fits every grad_fn signature."""

  def loss(p):
    per_example = _mlp_per_example_loss(p)
    return per_example.mean() if indices is None else per_example[indices].mean()

  return jax.grad(loss)(params)


def _quad_grad(theta, indices=None):
  del indices
  return A @ theta


def _base():
  return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))


def _make(name, base, rho, **kwargs):
  """One of the five transforms around ``base`` with radius ``rho`` (SAM-equivalent rest)."""
  if name == 'sam':
    return transforms.sam(base, rho=rho, **kwargs)
  if name == 'asam':
    return transforms.asam(base, rho=rho, **kwargs)
  if name == 'gsam':
    kwargs = {'alpha': 0.1, **kwargs}
    return transforms.gsam(base, learning_rate=0.1, lr_max=0.1, rho_max=rho, rho_min=rho, **kwargs)
  if name == 'looksam':
    return transforms.looksam(base, rho=rho, **{'k': 5, **kwargs})
  if name == 'esam':
    return transforms.esam(base, rho=rho, **{'beta': 1.0, 'gamma': 1.0, **kwargs})
  raise AssertionError(name)


def _run(tx, params, num_steps, grad_fn=_mlp_grad, update_grad_fn=None):
  """Params after each of ``num_steps`` jitted steps; the clean gradient is ``grad_fn``'s.

  ``update_grad_fn`` (default ``grad_fn``) is the ``grad_fn`` given to ``tx.update``.
  """
  state = tx.init(params)
  update_grad_fn = update_grad_fn or grad_fn

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grad_fn(params), state, params, grad_fn=update_grad_fn)
    return optax.apply_updates(params, updates), state

  history = []
  for _ in range(num_steps):
    params, state = step(params, state)
    history.append(params)
  return history


@functools.cache
def _base_history(num_steps):
  """The base optimizer's params on the MLP (computed once, shared by several tests)."""
  return _run(_base(), _mlp_params(), num_steps)


@functools.cache
def _sam_history(num_steps):
  """SAM's params (rho = 0.1) on the MLP (computed once, shared by several tests)."""
  return _run(transforms.sam(_base(), rho=0.1), _mlp_params(), num_steps)


def _assert_trees_equal(a, b, exact=True, rtol=1e-6, atol=1e-7):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if exact:
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def _max_abs_diff(a, b):
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(a, b, strict=True))


def _tree_max_abs_diff(a, b):
  return _max_abs_diff(jax.tree.leaves(a), jax.tree.leaves(b))


# ----------------------------------------------------------------------------------------
# 1. rho = 0 reduces every transform to its base optimizer.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'name, exact',
  [
    ('sam', True),  # eps = 0 * g / |g| is exactly 0, and theta + 0 == theta.
    ('asam', True),
    ('esam', True),
    # LookSAM: g_v = g_s - (g_s.g / |g|^2) g is rounding noise (g_s == g), which the 1e-5
    # threshold stores as exact zeros; the reuse steps then send g + 0 * 0 == g.
    ('looksam', True),
    # GSAM: g_perp = g - (g.u) u with u = g_p/|g_p| = g/|g| is rounding noise of order
    # 1e-7 |g| in float32, not zeroed: alpha * g_perp may change the params' last bits.
    ('gsam', False),
  ],
)
def test_rho_zero_gives_the_base_optimizer_params(name, exact):
  params = _mlp_params()
  want = _base_history(6)  # 6 steps: LookSAM's k=5 gives SAM, 4 reuse steps, SAM.
  got = _run(_make(name, _base(), 0.0), params, 6)
  for g, w in zip(got, want, strict=True):
    _assert_trees_equal(g, w, exact=exact)
  assert _tree_max_abs_diff(want[-1], params) > 1e-3  # The params did move.


@pytest.mark.parametrize('name', NAMES)
def test_positive_rho_changes_the_update(name):
  want = _base_history(6)
  got = _run(_make(name, _base(), 0.2), _mlp_params(), 1)
  assert _tree_max_abs_diff(got[0], want[0]) > 1e-5


# ----------------------------------------------------------------------------------------
# 2-4. SAM: optax.contrib.sam, the closed form on a quadratic, the zero-gradient guard.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize('problem', ['mlp', 'quadratic'])
def test_sam_equals_optax_contrib_sam(problem):
  params, grad_fn = (_mlp_params(), _mlp_grad) if problem == 'mlp' else (THETA0, _quad_grad)
  rho = 0.1
  reference = optax.contrib.sam(
    _base(),
    optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
    sync_period=2,
    opaque_mode=True,
  )
  # optax calls grad_fn(params, i), i the adversarial step: not our ESAM indices.
  want = _run(reference, params, 5, grad_fn, update_grad_fn=lambda p, i: grad_fn(p))
  got = _run(transforms.sam(_base(), rho=rho), params, 5, grad_fn)
  for g, w in zip(got, want, strict=True):
    _assert_trees_equal(g, w, exact=False)
  assert _tree_max_abs_diff(got[0], _run(_base(), params, 1, grad_fn)[0]) > 1e-4


def test_sam_first_step_on_a_quadratic_is_the_closed_form():
  rho, lr = 0.3, 0.05
  (theta1,) = _run(transforms.sam(optax.sgd(lr), rho=rho), THETA0, 1, _quad_grad)
  theta0 = np.asarray(THETA0, np.float64)
  g = A64 @ theta0
  eps = rho * g / np.linalg.norm(g)
  np.testing.assert_allclose(theta1, theta0 - lr * A64 @ (theta0 + eps), rtol=1e-5, atol=1e-6)
  # Not the plain gradient step.
  assert np.abs(np.asarray(theta1) - (theta0 - lr * g)).max() > 1e-2


@pytest.mark.parametrize('name', NAMES)
def test_zero_gradient_gives_no_perturbation_and_no_nan(name):
  """A zero clean gradient: eps = 0, so the update is base(grad_fn(params)), finite."""
  params = _mlp_params()
  tx = _make(name, _base(), 0.1, **({'beta': 0.5} if name == 'esam' else {}))
  seen = []

  def grad_fn(p, indices=None):
    jax.debug.callback(seen.append, p)  # Records the concrete params under jit.
    return _mlp_grad(p, indices)

  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(lambda p: tx.update(zeros, tx.init(p), p, grad_fn=grad_fn))(params)
  base = _base()
  want, _ = jax.jit(lambda p: base.update(_mlp_grad(p), base.init(p), p))(params)
  for leaf in jax.tree.leaves(updates):
    assert np.isfinite(np.asarray(leaf)).all()
  # LookSAM computes grad_fn inside lax.cond, which XLA may compile differently from the
  # plain gradient (last-bit float32 differences, ~1e-10 here).
  _assert_trees_equal(updates, want, exact=name != 'looksam', atol=1e-9)
  jax.effects_barrier()
  _assert_trees_equal(seen[-1], params)  # grad_fn was asked at theta itself.


@pytest.mark.parametrize('name', NAMES)
def test_zero_gradient_at_the_minimum_stays_put(name):
  def grad_fn(p, indices=None):
    return {'kernel': _quad_grad(p['kernel'])}

  tx = _make(name, optax.sgd(0.1, momentum=0.9), 0.1, **({'k': 2} if name == 'looksam' else {}))
  theta = {'kernel': jnp.zeros(5)}
  state = tx.init(theta)
  for _ in range(3):  # LookSAM: SAM, reuse (with g = g_v = 0), SAM.
    updates, state = tx.update(grad_fn(theta), state, theta, grad_fn=grad_fn)
    np.testing.assert_array_equal(updates['kernel'], np.zeros(5))


# ----------------------------------------------------------------------------------------
# 5. ASAM: adaptive masks and a NumPy transcription of one step.
# ----------------------------------------------------------------------------------------

_ASAM_MASKS = {
  'weights': {'conv': {'kernel': True, 'bias': False}, 'norm': {'scale': True, 'bias': False}},
  'kernels': {'conv': {'kernel': True, 'bias': False}, 'norm': {'scale': False, 'bias': False}},
  'all': {'conv': {'kernel': True, 'bias': True}, 'norm': {'scale': True, 'bias': True}},
}


def _asam_params():
  rng = np.random.default_rng(1)

  # Entries of mixed magnitude, so |theta| + eta differs a lot between entries.
  def leaf(*shape):
    return jnp.asarray(rng.normal(size=shape) * rng.choice([0.05, 1.0, 3.0], size=shape))

  return {
    'conv': {'kernel': leaf(3, 4), 'bias': leaf(4)},
    'norm': {'scale': leaf(4), 'bias': leaf(4)},
  }


_c_rng = np.random.default_rng(2)
_ASAM_C = jax.tree.map(lambda x: _c_rng.normal(size=x.shape), _asam_params())


def _asam_grad(params):
  """Gradient of sum c * sin(theta): nonlinear, so the perturbation matters."""
  return jax.tree.map(lambda c, p: jnp.asarray(c, jnp.float32) * jnp.cos(p), _ASAM_C, params)


def test_asam_adaptive_mask_matches_the_documented_names():
  params = _asam_params()
  for adaptive_params, want in _ASAM_MASKS.items():
    assert transforms.asam_adaptive_mask(params, adaptive_params) == want
  assert transforms.asam_adaptive_mask(params) == _ASAM_MASKS['weights']  # The default.
  with pytest.raises(ValueError, match='adaptive_params'):
    transforms.asam_adaptive_mask(params, 'biases')


@pytest.mark.parametrize('adaptive_params', list(_ASAM_MASKS))
def test_asam_step_equals_numpy_transcription(adaptive_params):
  rho, eta = 0.5, 0.05
  params = _asam_params()
  tx = transforms.asam(_base(), rho=rho, eta=eta, adaptive_params=adaptive_params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=_asam_grad))
  updates, _ = update(_asam_grad(params), tx.init(params), params)

  theta = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  mask = _ASAM_MASKS[adaptive_params]
  g = jax.tree.map(lambda c, t: c * np.cos(t), _ASAM_C, theta)
  t_w = jax.tree.map(lambda t, m: np.abs(t) + eta if m else np.ones_like(t), theta, mask)
  norm = np.sqrt(
    sum(np.sum((t * gi) ** 2) for t, gi in zip(*map(jax.tree.leaves, (t_w, g)), strict=True))
  )
  eps = jax.tree.map(lambda t, gi: rho * t**2 * gi / norm, t_w, g)
  g_adv = jax.tree.map(lambda c, t, e: c * np.cos(t + e), _ASAM_C, theta, eps)
  # First step of sgd(0.1, momentum=0.9) after add_decayed_weights(5e-4).
  want = jax.tree.map(lambda ga, t: -0.1 * (ga + 5e-4 * t), g_adv, theta)
  _assert_trees_equal(updates, want, exact=False, rtol=1e-5, atol=1e-6)
  # The perturbation is large enough for the test to see it.
  plain = jax.tree.map(lambda gi, t: -0.1 * (gi + 5e-4 * t), g, theta)
  assert _tree_max_abs_diff(want, plain) > 1e-2


# ----------------------------------------------------------------------------------------
# 6. GSAM: the radius schedule, the reduction to SAM and the surrogate-gap step.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize('lr_min', [0.0, 0.01])
def test_gsam_rho_stays_in_range_over_warmup_cosine(lr_min):
  lr_max, rho_max, rho_min, warmup = 0.1, 0.08, 0.02, 10
  schedule = optax.join_schedules(
    [
      optax.linear_schedule(0.0, lr_max, warmup),
      optax.cosine_decay_schedule(lr_max, 90, alpha=lr_min / lr_max),
    ],
    [warmup],
  )
  lrs = np.array([schedule(t) for t in range(101)], np.float64)
  rhos = np.array(
    [
      transforms.gsam_rho(lr, rho_max=rho_max, rho_min=rho_min, lr_max=lr_max, lr_min=lr_min)
      for lr in lrs
    ]
  )
  assert np.all(rhos >= np.float32(rho_min)) and np.all(rhos <= np.float32(rho_max))
  want = np.clip(rho_min + (rho_max - rho_min) * (lrs - lr_min) / (lr_max - lr_min), rho_min, None)
  np.testing.assert_allclose(rhos, want, rtol=1e-5)
  np.testing.assert_allclose(rhos[warmup], rho_max, rtol=1e-6)
  np.testing.assert_allclose(rhos[-1], rho_min, rtol=1e-5)
  if lr_min > 0:  # Warm-up steps below lr_min are clipped to rho_min, not below it.
    below = lrs < lr_min
    assert below.sum() >= 1
    np.testing.assert_array_equal(rhos[below], np.float32(rho_min))


def test_gsam_rho_values():
  kw = {'rho_max': 0.1, 'rho_min': 0.02, 'lr_max': 0.5, 'lr_min': 0.1}
  for frac in (0.0, 0.3, 0.75, 1.0):
    lr = 0.1 + frac * 0.4
    want = 0.02 + frac * 0.08
    np.testing.assert_allclose(transforms.gsam_rho(lr, **kw), want, rtol=1e-6)
    np.testing.assert_allclose(transforms.gsam_rho(-lr, **kw), want, rtol=1e-6)  # |lr|.
  np.testing.assert_allclose(transforms.gsam_rho(2.0, **kw), 0.1, rtol=1e-7)
  assert transforms.gsam_rho(0.3, **kw).dtype == jnp.float32
  # A constant schedule (lr_max == lr_min): rho_max whatever the lr.
  for lr in (0.0, 0.05, 0.1, 1.0):
    rho = transforms.gsam_rho(lr, rho_max=0.1, rho_min=0.02, lr_max=0.1, lr_min=0.1)
    np.testing.assert_allclose(rho, 0.1, rtol=1e-7)


def test_gsam_perturbation_radius_follows_the_schedule():
  lr_max, lr_min, rho_max, rho_min = 0.1, 0.01, 0.2, 0.05
  schedule = optax.join_schedules(
    [
      optax.linear_schedule(0.0, lr_max, 2),
      optax.cosine_decay_schedule(lr_max, 4, alpha=lr_min / lr_max),
    ],
    [2],
  )
  tx = transforms.gsam(
    optax.sgd(schedule),
    learning_rate=schedule,
    lr_max=lr_max,
    lr_min=lr_min,
    rho_max=rho_max,
    rho_min=rho_min,
    alpha=0.2,
  )
  seen = []

  def grad_fn(theta):
    seen.append(np.asarray(theta, np.float64))
    return _quad_grad(theta)

  theta, state = THETA0, tx.init(THETA0)
  radii, want = [], []
  for t in range(7):  # Not jitted: grad_fn sees concrete perturbed params.
    updates, state = tx.update(_quad_grad(theta), state, theta, grad_fn=grad_fn)
    radii.append(np.linalg.norm(seen[-1] - np.asarray(theta, np.float64)))
    kw = {'rho_max': rho_max, 'rho_min': rho_min, 'lr_max': lr_max, 'lr_min': lr_min}
    want.append(float(transforms.gsam_rho(schedule(t), **kw)))
    theta = optax.apply_updates(theta, updates)
  np.testing.assert_allclose(radii, want, rtol=1e-4)
  assert min(want) == pytest.approx(rho_min) and max(want) == pytest.approx(rho_max)


def test_gsam_with_alpha_zero_equals_sam():
  params = _mlp_params()
  want = _sam_history(5)
  got = _run(_make('gsam', _base(), 0.1, alpha=0.0), params, 5)
  for g, w in zip(got, want, strict=True):
    _assert_trees_equal(g, w, exact=False)


def test_gsam_with_alpha_differs_from_sam_and_equals_numpy():
  params = _mlp_params()
  sam_params = _sam_history(5)
  gsam_params = _run(_make('gsam', _base(), 0.1, alpha=0.5), params, 5)
  assert _tree_max_abs_diff(gsam_params[-1], sam_params[-1]) > 1e-5

  rho, lr, alpha = 0.3, 0.05, 0.5
  tx = transforms.gsam(
    optax.sgd(lr), learning_rate=lr, lr_max=lr, rho_max=rho, rho_min=rho, alpha=alpha
  )
  (theta1,) = _run(tx, THETA0, 1, _quad_grad)
  theta0 = np.asarray(THETA0, np.float64)
  g = A64 @ theta0
  g_p = A64 @ (theta0 + rho * g / np.linalg.norm(g))
  u = g_p / np.linalg.norm(g_p)
  g_perp = g - (g @ u) * u
  np.testing.assert_allclose(theta1, theta0 - lr * (g_p - alpha * g_perp), rtol=1e-5, atol=1e-6)
  assert np.abs(g_perp).max() > 1e-2 * np.abs(g).max()  # The correction is not negligible.


# ----------------------------------------------------------------------------------------
# 7. LookSAM: k = 1 is SAM; reuse steps; grad_fn skipped on reuse steps.
# ----------------------------------------------------------------------------------------


def test_looksam_with_k_one_equals_sam():
  params = _mlp_params()
  want = _sam_history(5)
  got = _run(transforms.looksam(_base(), rho=0.1, k=1, alpha=0.7), params, 5)
  for g, w in zip(got, want, strict=True):
    _assert_trees_equal(g, w, exact=False)


def test_looksam_reuse_steps_equal_numpy():
  rho, lr, alpha, k = 0.3, 0.05, 0.7, 5
  tx = transforms.looksam(optax.sgd(lr), rho=rho, k=k, alpha=alpha)
  sam = transforms.sam(optax.sgd(lr), rho=rho)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=_quad_grad))
  sam_update = jax.jit(lambda g, s, p: sam.update(g, s, p, grad_fn=_quad_grad))

  theta, state = THETA0, tx.init(THETA0)
  g_v = None
  for t in range(k + 1):  # SAM step, k - 1 reuse steps, SAM step again.
    g_jax = _quad_grad(theta)
    updates, state = update(g_jax, state, theta)
    th = np.asarray(theta, np.float64)
    g = A64 @ th
    if t % k == 0:
      want_sam, _ = sam_update(g_jax, sam.init(theta), theta)
      np.testing.assert_allclose(updates, want_sam, rtol=1e-6, atol=1e-7)
      g_s = A64 @ (th + rho * g / np.linalg.norm(g))
      np.testing.assert_allclose(updates, -lr * g_s, rtol=1e-5, atol=1e-6)
      g_v = g_s - (g_s @ g) / (g @ g) * g
      np.testing.assert_allclose(state.g_v, g_v, rtol=1e-4, atol=1e-5)
      stored_g_v = np.asarray(state.g_v)
    else:
      want = -lr * (g + alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v)
      np.testing.assert_allclose(updates, want, rtol=1e-5, atol=1e-6)
      assert np.abs(np.asarray(updates) + lr * g).max() > 1e-3  # Not base(g).
      np.testing.assert_array_equal(state.g_v, stored_g_v)  # g_v is kept, not recomputed.
    theta = optax.apply_updates(theta, updates)
  assert int(state.count) == k + 1


@pytest.mark.parametrize('name, k, want_calls', [('sam', None, 10), ('looksam', 5, 2)])
def test_looksam_skips_grad_fn_on_reuse_steps(name, k, want_calls):
  calls = []

  def grad_fn(theta):
    # Runs only when the branch holding it executes (lax.cond traces both branches).
    jax.debug.callback(lambda: calls.append(1))
    return _quad_grad(theta)

  if name == 'sam':
    tx = transforms.sam(optax.sgd(0.05), rho=0.1)
  else:
    tx = transforms.looksam(optax.sgd(0.05), rho=0.1, k=k)
  _run(tx, THETA0, 10, grad_fn)
  jax.effects_barrier()
  # The clean gradient in _run also goes through grad_fn: 10 of the calls.
  assert len(calls) == 10 + want_calls


# ----------------------------------------------------------------------------------------
# 8. ESAM: SAM for beta = gamma = 1, data selection (SDS), weight perturbation (SWP).
# ----------------------------------------------------------------------------------------


def test_esam_with_beta_gamma_one_equals_sam_exactly():
  params = _mlp_params()
  want = _sam_history(5)
  got = _run(transforms.esam(_base(), rho=0.1, beta=1.0, gamma=1.0), params, 5)
  for g, w in zip(got, want, strict=True):
    _assert_trees_equal(g, w)


_SDS_B = 10
_sds_rng = np.random.default_rng(25)  # A seed where both selections below are informative.
_SDS_X = _sds_rng.normal(size=(_SDS_B, 3))
_SDS_Y = _sds_rng.normal(size=_SDS_B)
_SDS_THETA = {'w': _sds_rng.normal(size=3), 'b': np.array(0.3)}


def _sds_losses(p):
  """Per-example 1/2 (x.w + b - y)^2 (JAX, float32)."""
  x, y = jnp.asarray(_SDS_X, jnp.float32), jnp.asarray(_SDS_Y, jnp.float32)
  return 0.5 * (x @ p['w'] + p['b'] - y) ** 2


def _sds_losses_np(p):
  return 0.5 * (_SDS_X @ p['w'] + p['b'] - _SDS_Y) ** 2


@pytest.mark.parametrize('gamma', [0.25, 0.5])
def test_esam_selects_the_examples_with_the_largest_loss_increase(gamma):
  rho, lr = 0.8, 0.1
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _SDS_THETA)
  seen = []

  def grad_fn(p, indices):
    seen.append(None if indices is None else np.asarray(indices))
    return jax.grad(lambda q: _sds_losses(q)[indices].mean())(p)

  full_grad = jax.grad(lambda q: _sds_losses(q).mean())
  tx = transforms.esam(optax.sgd(lr), rho=rho, beta=1.0, gamma=gamma)
  updates, _ = tx.update(  # Not jitted: grad_fn sees concrete indices.
    full_grad(params),
    tx.init(params),
    params,
    grad_fn=grad_fn,
    per_example_loss_fn=_sds_losses,
    per_example_losses=_sds_losses(params),
  )

  theta = {k: np.asarray(v, np.float64) for k, v in params.items()}
  r = _SDS_X @ theta['w'] + theta['b'] - _SDS_Y
  g = {'w': _SDS_X.T @ r / _SDS_B, 'b': r.mean()}
  g_norm = np.sqrt(np.sum(g['w'] ** 2) + g['b'] ** 2)
  perturbed = {k: theta[k] + rho * g[k] / g_norm for k in theta}
  sharpness = _sds_losses_np(perturbed) - _sds_losses_np(theta)
  num = math.ceil(gamma * _SDS_B)
  order = np.argsort(-sharpness)
  top = order[:num]
  assert sharpness[order[num - 1]] - sharpness[order[num]] > 1e-3  # No near-tie.
  # The selection is by loss *increase*: neither the largest perturbed nor clean losses.
  assert set(top) != set(np.argsort(-_sds_losses_np(perturbed))[:num])
  assert set(top) != set(np.argsort(-_sds_losses_np(theta))[:num])

  (indices,) = seen
  assert len(indices) == num
  assert set(indices.tolist()) == set(top.tolist())
  r_top = _SDS_X[top] @ perturbed['w'] + perturbed['b'] - _SDS_Y[top]
  want = {'w': -lr * _SDS_X[top].T @ r_top / num, 'b': -lr * r_top.mean()}
  _assert_trees_equal(updates, want, exact=False, rtol=1e-5, atol=1e-6)


def test_esam_gamma_below_one_needs_per_example_losses():
  tx = transforms.esam(optax.sgd(0.1), rho=0.1, beta=1.0, gamma=0.5)
  with pytest.raises(ValueError, match='per_example_loss_fn'):
    tx.update(THETA0, tx.init(THETA0), THETA0, grad_fn=_quad_grad)


def test_esam_stochastic_weight_perturbation():
  rho, beta, n = 0.7, 0.3, 100 * 100
  params = {'a': jnp.zeros((100, 100)), 'b': jnp.zeros((100, 100))}
  rng = np.random.default_rng(4)
  grads = {k: jnp.asarray(rng.normal(size=(100, 100)), jnp.float32) for k in params}

  def perturbations(seed, num_steps):
    """eps of each step: at theta = 0, grad_fn returning its params gives theta + eps = eps."""
    tx = transforms.esam(optax.identity(), rho=rho, beta=beta, gamma=1.0, seed=seed)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=lambda q: q))
    state, out = tx.init(params), []
    for _ in range(num_steps):
      eps, state = update(grads, state, params)
      out.append({k: np.asarray(v) for k, v in eps.items()})
    return out

  eps0, eps1 = perturbations(seed=0, num_steps=2)
  g_norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads.values()))
  sigma = math.sqrt(beta * (1 - beta) / n)
  for eps in (eps0, eps1):
    for k in params:
      mask = eps[k] != 0
      assert abs(mask.mean() - beta) < 5 * sigma, (k, mask.mean())
      g = np.asarray(grads[k], np.float64)
      np.testing.assert_allclose(eps[k][mask], rho * g[mask] / g_norm / beta, rtol=1e-5)
  # Independent masks: across steps (the key folds in the count) and across leaves.
  overlap_sigma = math.sqrt(beta**2 * (1 - beta**2) / n)
  for a, b in ((eps0['a'], eps1['a']), (eps0['a'], eps0['b'])):
    assert abs(((a != 0) & (b != 0)).mean() - beta**2) < 5 * overlap_sigma
  # Reproducible for a seed, different for another.
  (again,) = perturbations(seed=0, num_steps=1)
  _assert_trees_equal(again, eps0)
  (other,) = perturbations(seed=1, num_steps=1)
  assert np.any((other['a'] != 0) != (eps0['a'] != 0))


# ----------------------------------------------------------------------------------------
# 9. Conformance: jit, state and dtypes, hyperparameter validation.
# ----------------------------------------------------------------------------------------


def _mixed_precision_params():
  params = _mlp_params()
  params['dense2'] = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params['dense2'])
  return params


@pytest.mark.parametrize('name', NAMES)
def test_conformance_jit_state_and_dtypes(name):
  params = _mixed_precision_params()
  # Non-reducing settings: GSAM alpha > 0, LookSAM k = 2, ESAM with SWP and SDS.
  extra = {'gsam': {'alpha': 0.3}, 'looksam': {'k': 2}, 'esam': {'beta': 0.5, 'gamma': 0.5}}
  tx = _make(name, _base(), 0.1, **extra.get(name, {}))
  kwargs = {}
  if name == 'esam':
    kwargs = {
      'per_example_loss_fn': _mlp_per_example_loss,
      'per_example_losses': _mlp_per_example_loss(params),
    }

  @jax.jit
  def step(params, state):
    return tx.update(_mlp_grad(params), state, params, grad_fn=_mlp_grad, **kwargs)

  state0 = state = tx.init(params)
  for _ in range(3):
    updates, state = step(params, state)
    assert jax.tree.structure(state) == jax.tree.structure(state0)
    for new, old in zip(jax.tree.leaves(state), jax.tree.leaves(state0), strict=True):
      assert (new.shape, new.dtype) == (old.shape, old.dtype)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
      assert (u.shape, u.dtype) == (p.shape, p.dtype)
      assert np.isfinite(np.asarray(u, np.float32)).all()
    params = optax.apply_updates(params, updates)
  assert int(state.count) == 3


_GSAM_KW = {'learning_rate': 0.1, 'lr_max': 0.1}


@pytest.mark.parametrize(
  'make, kwargs, name',
  [
    (transforms.sam, {'rho': -0.1}, 'rho'),
    (transforms.sam, {'rho': float('nan')}, 'rho'),
    (transforms.asam, {'rho': -0.1}, 'rho'),
    (transforms.asam, {'eta': -0.01}, 'eta'),
    (transforms.asam, {'adaptive_params': 'biases'}, 'adaptive_params'),
    (transforms.gsam, {**_GSAM_KW, 'rho_min': -0.1, 'rho_max': 0.1}, 'rho_min'),
    (transforms.gsam, {**_GSAM_KW, 'rho_max': -0.1}, 'rho_max'),
    (transforms.gsam, {**_GSAM_KW, 'rho_min': 0.2, 'rho_max': 0.1}, 'rho_max'),
    (transforms.gsam, {**_GSAM_KW, 'alpha': -0.1}, 'alpha'),
    (transforms.gsam, {**_GSAM_KW, 'lr_min': 0.2}, 'lr_min'),
    (transforms.looksam, {'rho': -0.1}, 'rho'),
    (transforms.looksam, {'k': 0}, 'k'),
    (transforms.looksam, {'k': 2.5}, 'k'),
    (transforms.looksam, {'k': 5.0}, 'k'),
    (transforms.looksam, {'alpha': -0.1}, 'alpha'),
    (transforms.esam, {'rho': -0.1}, 'rho'),
    (transforms.esam, {'beta': 0.0}, 'beta'),
    (transforms.esam, {'beta': 1.5}, 'beta'),
    (transforms.esam, {'beta': -0.5}, 'beta'),
    (transforms.esam, {'gamma': 0.0}, 'gamma'),
    (transforms.esam, {'gamma': 1.5}, 'gamma'),
  ],
)
def test_bad_hyperparameters_raise_at_construction(make, kwargs, name):
  with pytest.raises(ValueError, match=rf'\b{name}\b'):
    make(optax.sgd(0.1), **kwargs)


@pytest.mark.parametrize('name', NAMES)
def test_missing_grad_fn_raises(name):
  tx = _make(name, _base(), 0.1)
  params = _mlp_params()
  with pytest.raises(ValueError, match='grad_fn'):
    tx.update(_mlp_grad(params), tx.init(params), params)

"""Sharpness tools against closed forms: quadratics with a known Hessian, a dense Hessian, the CNN.

The quadratics are L(theta) = 1/2 x^T A x with x the concatenation of a two-leaf pytree's leaves
and A = Q diag(lam) Q^T for a random orthogonal Q, so every eigenvalue, Hessian-vector product,
trace and SAM sharpness is known exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from saf_jax import losses, models
from saf_jax.analysis import sharpness

SHAPES = {'a': (10,), 'b': (5, 6)}
DIM = 40
# Top three well separated; the most negative one has the largest magnitude, so a Lanczos that
# ranked by |lambda| would return -9.5 instead of 9.
LAMBDAS = np.concatenate([[9.0, 7.0, 6.0, -9.5, -2.0], np.linspace(-1.5, 4.5, DIM - 5)])


pytestmark = pytest.mark.usefixtures('fast_compile')


def _flatten(params):
  """x: the leaves 'a' then 'b' (row-major), in the test's own order."""
  return jnp.concatenate([params['a'], params['b'].reshape(-1)])


def _unflatten(x):
  x = np.asarray(x)
  return {'a': x[:10], 'b': x[10:].reshape(5, 6)}


def _matrix(lambdas, seed):
  """A = Q diag(lambdas) Q^T, float64, with a random orthogonal Q."""
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(lambdas), len(lambdas))))
  return (q * lambdas) @ q.T


def _quadratic(a):
  a32 = jnp.asarray(a, jnp.float32)

  def loss_fn(params, batch):
    del batch
    x = _flatten(params)
    return 0.5 * x @ a32 @ x

  return loss_fn


def _params(seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(scale * rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize('k', [1, 3])
def test_top_eigenvalues_of_quadratic(k):
  """The k largest (algebraic, not by magnitude) eigenvalues of a known Hessian."""
  a = _matrix(LAMBDAS, seed=0)
  result = sharpness.hessian_top_eigenvalues(_quadratic(a), _params(), [None], k=k)
  assert result.eigenvalues.shape == (k,) and result.residuals.shape == (k,)
  np.testing.assert_allclose(result.eigenvalues, np.sort(LAMBDAS)[::-1][:k], atol=1e-4)
  assert result.converged
  assert 1 <= result.iterations <= DIM
  assert np.all(result.residuals <= 1e-4 * np.abs(result.eigenvalues))


def test_too_few_iterations_is_not_converged():
  """Stopping at max_iterations must say so, and a Ritz value never exceeds the top eigenvalue."""
  a = _matrix(LAMBDAS, seed=0)
  result = sharpness.hessian_top_eigenvalues(_quadratic(a), _params(), [None], max_iterations=2)
  assert not result.converged
  assert result.iterations == 2
  assert result.eigenvalues.shape == (1,)
  assert result.eigenvalues[0] < LAMBDAS.max() + 1e-4
  assert result.residuals[0] > 1e-4 * abs(result.eigenvalues[0])


def test_lanczos_float64_operator_brackets_true_eigenvalues():
  """Exact float64 operator: top-4 to 1e-9, each within its residual of a true eigenvalue."""
  lambdas = np.concatenate([[5.0, 4.0, 3.5, 3.0], np.linspace(-4.0, 2.0, 56)])
  a = _matrix(lambdas, seed=3)
  result = sharpness.lanczos(lambda v: a @ v, len(lambdas), k=4, max_iterations=60, tol=1e-10)
  assert result.converged
  np.testing.assert_allclose(result.eigenvalues, [5.0, 4.0, 3.5, 3.0], atol=1e-9)
  for value, residual in zip(result.eigenvalues, result.residuals, strict=True):
    assert np.min(np.abs(lambdas - value)) <= residual + 1e-12


def test_lanczos_small_dimension_stops_at_invariant_space():
  """With max_iterations > dim the Krylov space is the whole space after dim steps: exact."""
  lambdas = np.array([2.0, -1.0, 0.5, 3.0, 1.5])
  a = _matrix(lambdas, seed=4)
  result = sharpness.lanczos(lambda v: a @ v, 5, k=5, max_iterations=100, tol=1e-12)
  assert result.converged and result.iterations == 5
  np.testing.assert_allclose(result.eigenvalues, np.sort(lambdas)[::-1], atol=1e-12)


def test_hessian_vector_product_is_a_times_v():
  """H v of the quadratic is A v, returned with the params' tree structure and shapes."""
  a = _matrix(LAMBDAS, seed=1)
  params, vector = _params(seed=1), _params(seed=2)
  got = sharpness.hessian_vector_product(_quadratic(a), params, None, vector)
  assert jax.tree.structure(got) == jax.tree.structure(params)
  expected = _unflatten(a @ np.asarray(_flatten(vector), np.float64))
  for key in SHAPES:
    assert got[key].shape == SHAPES[key]
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-5)


def _softmax_regression():
  rng = np.random.default_rng(5)
  params = {
    'w': jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
    'b': jnp.asarray(rng.normal(size=(3,)), jnp.float32),
  }
  batch = {
    'x': jnp.asarray(2.0 * rng.normal(size=(32, 6)), jnp.float32),
    'y': jnp.asarray(rng.integers(0, 3, size=32), jnp.int32),
  }

  def loss_fn(params, batch):
    return losses.cross_entropy(batch['x'] @ params['w'] + params['b'], batch['y'])

  return loss_fn, params, batch


def test_top_eigenvalues_match_dense_hessian():
  """Lanczos on HVPs of a softmax regression equals eigvalsh of its dense 21x21 Hessian."""
  loss_fn, params, batch = _softmax_regression()
  flat, unravel = ravel_pytree(params)
  dense = jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat)
  dense = np.asarray(dense, np.float64)
  expected = np.linalg.eigvalsh((dense + dense.T) / 2)[::-1][:2]
  result = sharpness.hessian_top_eigenvalues(loss_fn, params, [batch], k=2)
  assert result.converged
  assert expected[0] - expected[1] > 1e-2  # Distinct, so the comparison is meaningful.
  np.testing.assert_allclose(result.eigenvalues, expected, rtol=1e-4, atol=1e-6)


def test_top_eigenvalue_of_mean_over_batches():
  """Batches carrying A_1 and A_2: the top eigenvalue of (A_1 + A_2) / 2, not the mean of tops."""
  a1 = _matrix(LAMBDAS, seed=6)
  a2 = _matrix(LAMBDAS[::-1] * 0.5 + 1.0, seed=7)

  def loss_fn(params, a):
    x = _flatten(params)
    return 0.5 * x @ a @ x

  batches = [jnp.asarray(a1, jnp.float32), jnp.asarray(a2, jnp.float32)]
  result = sharpness.hessian_top_eigenvalues(loss_fn, _params(), batches)
  expected = np.linalg.eigvalsh((a1 + a2) / 2)[-1]
  mean_of_tops = (np.linalg.eigvalsh(a1)[-1] + np.linalg.eigvalsh(a2)[-1]) / 2
  assert abs(expected - mean_of_tops) > 0.1
  assert result.converged
  np.testing.assert_allclose(result.eigenvalues[0], expected, atol=1e-4)


@pytest.mark.parametrize(
  'kwargs',
  [{'k': 0}, {'k': 6}, {'k': 3, 'max_iterations': 2}, {'tol': 0.0}, {'tol': -1e-4}],
)
def test_lanczos_rejects_bad_arguments(kwargs):
  """k outside [1, dim], max_iterations < k and tol <= 0 are errors, not silent results."""
  with pytest.raises(ValueError):
    sharpness.lanczos(lambda v: v, 5, **kwargs)


def test_empty_batches_are_errors():
  loss_fn = _quadratic(np.eye(DIM))
  with pytest.raises(ValueError):
    sharpness.hessian_top_eigenvalues(loss_fn, _params(), [])
  with pytest.raises(ValueError):
    sharpness.hessian_trace(loss_fn, _params(), [])
  with pytest.raises(ValueError):
    sharpness.sam_sharpness(loss_fn, _params(), [])


def _shifted_quadratic(a):
  """L_B(theta) = 1/2 (x - c_B)^T A (x - c_B), the batch being c_B, float32 [DIM]."""
  a32 = jnp.asarray(a, jnp.float32)

  def loss_fn(params, c):
    x = _flatten(params) - c
    return 0.5 * x @ a32 @ x

  return loss_fn


def _sam_closed_form(a, theta, c, rho):
  """float64: R_B = rho |g| + 1/2 rho^2 g_hat^T A g_hat, with g = A (theta - c)."""
  x = theta - c
  g = a @ x
  g_norm = np.linalg.norm(g)
  g_hat = g / g_norm
  return {
    'sharpness': rho * g_norm + 0.5 * rho**2 * g_hat @ a @ g_hat,
    'loss': 0.5 * x @ a @ x,
    'grad_norm': g_norm,
  }


@pytest.mark.parametrize('rho', [0.05, 0.5])
def test_sam_sharpness_closed_form_per_batch(rho):
  """sharpness = L(theta + rho g/|g|) - L(theta), plus the loss and |g| at theta."""
  a = _matrix(LAMBDAS, seed=8)
  params = _params(seed=3, scale=0.3)
  c = np.random.default_rng(9).normal(size=DIM) * 0.3
  fn = jax.jit(sharpness.sam_sharpness_fn(_shifted_quadratic(a), rho=rho))
  got = fn(params, jnp.asarray(c, jnp.float32))
  theta = np.asarray(_flatten(params), np.float64)
  expected = _sam_closed_form(a, theta, np.float32(c).astype(np.float64), rho)
  assert set(got) == {'sharpness', 'loss', 'grad_norm'}
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, err_msg=key)


def test_sam_sharpness_averages_per_batch_directions():
  """Each batch ascends along its own gradient; the result is the mean of per-batch values."""
  a = _matrix(LAMBDAS, seed=10)
  rho = 0.3
  params = _params(seed=4, scale=0.3)
  rng = np.random.default_rng(11)
  cs = [np.float32(rng.normal(size=DIM) * 0.3) for _ in range(2)]
  got = sharpness.sam_sharpness(
    _shifted_quadratic(a), params, [jnp.asarray(c) for c in cs], rho=rho
  )
  theta = np.asarray(_flatten(params), np.float64)
  per_batch = [_sam_closed_form(a, theta, np.float64(c), rho) for c in cs]
  assert all(isinstance(v, float) for v in got.values())
  for key in ('sharpness', 'loss', 'grad_norm'):
    expected = np.mean([p[key] for p in per_batch])
    np.testing.assert_allclose(got[key], expected, rtol=1e-5, err_msg=key)
  # One shared direction (the mean gradient) would give a clearly different number.
  g_mean = np.mean([a @ (theta - np.float64(c)) for c in cs], axis=0)
  eps = rho * g_mean / np.linalg.norm(g_mean)
  shared = np.mean([eps @ a @ (theta - c) + 0.5 * eps @ a @ eps for c in cs])
  assert abs(shared - got['sharpness']) > 1e-2


def test_sam_sharpness_zero_gradient_is_zero():
  """At theta = c the gradient is 0: no perturbation, sharpness exactly 0 and no NaN."""
  a = _matrix(LAMBDAS, seed=12)
  params = _params(seed=5)
  c = _flatten(params)
  got = jax.jit(sharpness.sam_sharpness_fn(_shifted_quadratic(a), rho=0.05))(params, c)
  assert float(got['sharpness']) == 0.0
  assert float(got['loss']) == 0.0
  assert float(got['grad_norm']) == 0.0
  mean = sharpness.sam_sharpness(_shifted_quadratic(a), params, [c, c])
  assert mean == {'sharpness': 0.0, 'loss': 0.0, 'grad_norm': 0.0}


@pytest.mark.parametrize('rho', [0.0, -0.05, float('nan')])
def test_sam_sharpness_rejects_bad_rho(rho):
  loss_fn = _shifted_quadratic(np.eye(DIM))
  with pytest.raises(ValueError):
    sharpness.sam_sharpness_fn(loss_fn, rho=rho)
  with pytest.raises(ValueError):
    sharpness.sam_sharpness(loss_fn, _params(), [jnp.zeros(DIM)], rho=rho)


def test_hessian_trace_exact_for_diagonal():
  """Rademacher probes give v^T D v = tr(D) for every v: exact, with zero spread."""
  diagonal = np.concatenate([np.linspace(-3.0, 5.0, DIM - 1), [0.25]])
  got = sharpness.hessian_trace(_quadratic(np.diag(diagonal)), _params(), [None], num_samples=8)
  np.testing.assert_allclose(got['trace'], diagonal.sum(), rtol=1e-6)
  assert got['stderr'] == 0.0
  assert got['num_samples'] == 8


def test_hessian_trace_unbiased_with_right_stderr():
  """Within 4 standard errors of tr(A), and the stderr is sqrt(Var(v^T A v) / n)."""
  a = _matrix(LAMBDAS, seed=13)
  n = 200
  got = sharpness.hessian_trace(_quadratic(a), _params(), [None], num_samples=n, seed=1)
  assert abs(got['trace'] - LAMBDAS.sum()) <= 4 * got['stderr']
  # Rademacher: Var(v^T A v) = 2 sum_{i != j} A_ij^2.
  variance = 2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2))
  np.testing.assert_allclose(got['stderr'], np.sqrt(variance / n), rtol=0.25)


@pytest.mark.parametrize('num_samples', [1, 0])
def test_hessian_trace_rejects_too_few_samples(num_samples):
  with pytest.raises(ValueError):
    sharpness.hessian_trace(_quadratic(np.eye(DIM)), _params(), [None], num_samples=num_samples)


@pytest.fixture(scope='module')
def cnn():
  """Width-4 CNN with non-trivial running statistics, and a batch of 4 random images."""
  model = models.get_model('cnn', num_classes=10, width=4)
  init = jax.jit(lambda key, x: model.init(key, x, train=False))
  variables = init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)))
  rng = np.random.default_rng(14)

  def perturb(path, x):
    name = path[-1].key
    noise = rng.uniform(0.5, 2.0, size=x.shape) if name == 'var' else rng.normal(size=x.shape)
    return jnp.asarray(x * noise if name == 'var' else x + 0.3 * noise, jnp.float32)

  batch_stats = jax.tree_util.tree_map_with_path(perturb, variables['batch_stats'])
  batch = {
    'image': jnp.asarray(rng.normal(size=(4, 28, 28, 1)), jnp.float32),
    'label': jnp.asarray([0, 3, 7, 9], jnp.int32),
  }
  return model, variables['params'], batch_stats, variables['batch_stats'], batch


def _np_cross_entropy(logits, labels):
  logits = np.asarray(logits, np.float64)
  logits = logits - logits.max(-1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -log_p[np.arange(len(labels)), np.asarray(labels)].mean()


def test_model_loss_fn_is_eval_mode_cross_entropy(cnn):
  """Eval-mode CE with the given running statistics, which the call leaves as they are."""
  model, params, batch_stats, init_stats, batch = cnn
  before = jax.tree.map(np.array, batch_stats)
  loss_fn = sharpness.model_loss_fn(model, batch_stats)
  logits = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'], train=False)
  expected = _np_cross_entropy(logits, batch['label'])
  first = float(loss_fn(params, batch))
  np.testing.assert_allclose(first, expected, rtol=1e-5)
  assert float(jax.jit(loss_fn)(params, batch)) == pytest.approx(first, rel=1e-5)
  jax.grad(loss_fn)(params, batch)  # Differentiable without any mutable collection.
  assert float(loss_fn(params, batch)) == first
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, batch_stats))
  # The statistics really are used: the initial ones or train mode give other numbers.
  other = float(sharpness.model_loss_fn(model, init_stats)(params, batch))
  train_logits, _ = model.apply(
    {'params': params, 'batch_stats': batch_stats},
    batch['image'],
    train=True,
    mutable=['batch_stats'],
  )
  assert abs(other - first) > 1e-3
  assert abs(_np_cross_entropy(train_logits, batch['label']) - first) > 1e-3


def test_model_sam_sharpness_fn_matches_generic(cnn):
  """The jitted model version equals sam_sharpness_fn(model_loss_fn(...)) for each batch_stats."""
  model, params, batch_stats, init_stats, batch = cnn
  fn = sharpness.model_sam_sharpness_fn(model, rho=0.1)
  results = []
  for stats in (batch_stats, init_stats):
    got = fn(params, stats, batch)
    expected = sharpness.sam_sharpness_fn(sharpness.model_loss_fn(model, stats), rho=0.1)(
      params, batch
    )
    for key in ('sharpness', 'loss', 'grad_norm'):
      np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, err_msg=key)
    results.append(got)
  # New running statistics are an argument, not a stale closure.
  assert abs(float(results[0]['loss']) - float(results[1]['loss'])) > 1e-3
  assert float(results[0]['sharpness']) > 0


def test_batch_mean_is_float64():
  """1e8 + 1 - 1e8 summed in float32 is 0; the float64 mean is 1/3."""
  values = iter([1e8, 1.0, -1e8])

  def fn(batch):
    del batch
    v = next(values)
    return {'x': jnp.float32(v), 'y': jnp.float32(2.0)}

  got = sharpness.batch_mean(fn, [0, 1, 2])
  assert got == {'x': pytest.approx(1 / 3, rel=1e-12), 'y': 2.0}
  assert all(type(v) is float for v in got.values())
  with pytest.raises(ValueError):
    sharpness.batch_mean(fn, [])

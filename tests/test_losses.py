"""The trajectory loss against a direct NumPy transcription of Eq. 9/13 (with tau^2)."""

import jax.numpy as jnp
import numpy as np
import pytest

from saf_jax import losses


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_trajectory(logits, target, tau, mask=None):
  """tau^2 * mean_i sum_c p_t (log p_t - log p_s), in float64."""
  logits, target = np.float64(logits), np.float64(target)
  log_s = _np_log_softmax(logits / tau)
  log_t = _np_log_softmax(target / tau)
  kl = (np.exp(log_t) * (log_t - log_s)).sum(-1)
  if mask is None:
    mask = np.ones(len(kl))
  return tau**2 * (kl * mask).sum() / max(mask.sum(), 1.0)


@pytest.mark.parametrize('tau', [1.0, 2.0, 5.0])
def test_matches_numpy_transcription(tau):
  rng = np.random.default_rng(0)
  z = rng.normal(size=(16, 10)).astype(np.float32) * 3
  t = rng.normal(size=(16, 10)).astype(np.float32) * 3
  got = losses.trajectory_loss(jnp.asarray(z), jnp.asarray(t), temperature=tau)
  np.testing.assert_allclose(got, _np_trajectory(z, t, tau), rtol=1e-5)


def test_direction_is_kl_target_to_student():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(8, 5)).astype(np.float32) * 4
  t = rng.normal(size=(8, 5)).astype(np.float32) * 4
  forward = float(losses.trajectory_loss(z, t, temperature=1.0))
  np.testing.assert_allclose(forward, _np_trajectory(z, t, 1.0), rtol=1e-5)
  # KL is asymmetric: the swapped direction is a different number.
  assert abs(forward - _np_trajectory(t, z, 1.0)) > 1e-3


def test_tau_squared_factor():
  rng = np.random.default_rng(2)
  z = rng.normal(size=(4, 3)).astype(np.float32)
  t = rng.normal(size=(4, 3)).astype(np.float32)
  tau = 3.0
  plain_kl = _np_trajectory(z, t, tau) / tau**2
  np.testing.assert_allclose(
    losses.trajectory_loss(z, t, temperature=tau), tau**2 * plain_kl, rtol=1e-5
  )


def test_identical_logits_give_zero():
  z = np.random.default_rng(3).normal(size=(6, 4)).astype(np.float32)
  np.testing.assert_allclose(losses.trajectory_loss(z, z, temperature=5.0), 0.0, atol=1e-6)


def test_mask_excludes_examples_and_all_masked_is_zero():
  rng = np.random.default_rng(4)
  z = rng.normal(size=(6, 4)).astype(np.float32)
  t = rng.normal(size=(6, 4)).astype(np.float32)
  mask = np.array([1, 0, 1, 0, 0, 1], np.float32)
  t_garbage = t.copy()
  t_garbage[mask == 0] = 1e4  # Masked rows must not matter, whatever they hold.
  got = losses.trajectory_loss(z, t_garbage, temperature=2.0, mask=mask)
  np.testing.assert_allclose(got, _np_trajectory(z[mask == 1], t[mask == 1], 2.0), rtol=1e-5)
  zero = losses.trajectory_loss(z, t, temperature=2.0, mask=np.zeros(6, np.float32))
  assert float(zero) == 0.0


def test_underflowing_target_probability_stays_finite():
  # exp(-2000/1) underflows to exactly 0 in float32: 0 * log 0 must count as 0.
  t = np.array([[1000.0, -1000.0, 0.0]], np.float32)
  z = np.array([[0.0, 0.0, 0.0]], np.float32)
  got = float(losses.trajectory_loss(z, t, temperature=1.0))
  assert np.isfinite(got)
  # Target is one-hot on class 0: KL = -log softmax(z)_0 = log 3.
  np.testing.assert_allclose(got, np.log(3.0), rtol=1e-5)
  # The gradient w.r.t. the student is finite too.
  import jax

  g = jax.grad(lambda z_: losses.trajectory_loss(z_, t, temperature=1.0))(jnp.asarray(z))
  assert np.all(np.isfinite(g))


def test_cross_entropy_matches_numpy():
  rng = np.random.default_rng(5)
  z = rng.normal(size=(7, 4)).astype(np.float32)
  y = rng.integers(0, 4, size=7)
  want = -np.mean(_np_log_softmax(np.float64(z))[np.arange(7), y])
  np.testing.assert_allclose(losses.cross_entropy(z, y), want, rtol=1e-6)


def test_label_smoothing_is_the_mixture_of_label_and_uniform_targets():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(6, 7)).astype(np.float32) * 2
  labels = rng.integers(0, 7, 6)
  eps = 0.1
  target = np.full((6, 7), eps / 7)
  target[np.arange(6), labels] += 1 - eps
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -(target * logp).sum(-1)
  got = losses.per_example_cross_entropy(logits, labels, label_smoothing=eps)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  plain = losses.per_example_cross_entropy(logits, labels)
  assert np.all(np.abs(np.asarray(got) - np.asarray(plain)) > 1e-4)

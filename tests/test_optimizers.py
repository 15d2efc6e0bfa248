"""saf_jax.optimizers: PyTorch's SGD (L2 before momentum), its schedule, and GSAM's rho."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from saf_jax import optimizers


def test_create_optimizer_is_pytorch_sgd_with_l2_and_cosine():
  config = default.get_config('method=sgd')
  config.num_epochs = 2
  tx = optimizers.create_optimizer(config, steps_per_epoch=5)  # 10 steps.
  params = {'w': jnp.ones((2, 2)), 'b': jnp.ones((2,))}
  grads = {'w': jnp.full((2, 2), 0.5), 'b': jnp.full((2,), 0.5)}
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  # Step 0: lr = 0.05; d = g + wd * w for 2-D params (1-D not decayed); buf = d.
  np.testing.assert_allclose(updates['w'], -0.05 * (0.5 + 5e-4), rtol=1e-6)
  np.testing.assert_allclose(updates['b'], -0.05 * 0.5, rtol=1e-6)
  updates, state = tx.update(grads, state, params)
  # Step 1: lr = 0.05 * 0.5 * (1 + cos(pi / 10)); buf = 0.9 * d + d.
  lr1 = 0.05 * 0.5 * (1 + np.cos(np.pi / 10))
  np.testing.assert_allclose(updates['w'], -lr1 * 1.9 * (0.5 + 5e-4), rtol=1e-6)


@pytest.mark.parametrize(
  'schedule, warmup_epochs, moves',
  [('constant', 0, True), ('constant', 1, False), ('cosine', 0, True)],
)
def test_gsam_rho_follows_a_warm_up_from_zero(schedule, warmup_epochs, moves):
  """At step 0 of a warm-up the learning rate is 0, so GSAM's rho is rho_min = 0."""
  config = default.get_config('method=gsam')
  config.optimizer.schedule = schedule
  config.optimizer.warmup_epochs = warmup_epochs
  config.optimizer.weight_decay = 0.0
  config.method.gsam.alpha = 0.0
  config.method.gsam.rho_min = 0.0
  tx = optimizers.create_optimizer(config, steps_per_epoch=10)
  params = {'w': jnp.array([3.0, -4.0])}
  grad_fn = jax.grad(lambda p: jnp.sum(p['w'] ** 4))  # Not linear: a perturbation shows.
  seen = []
  tx.update(
    grad_fn(params), tx.init(params), params, grad_fn=lambda p: seen.append(p) or grad_fn(p)
  )
  moved = float(jnp.linalg.norm(seen[0]['w'] - params['w']))  # |eps| = rho.
  if moves:
    np.testing.assert_allclose(moved, config.method.gsam.rho_max, rtol=1e-5)
  else:
    assert moved == 0.0

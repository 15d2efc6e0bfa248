"""saf_jax.experiment: the trajectory loss's epochs, the perturbation scope and mixed precision."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from saf_jax import data, experiment, optimizers
from tests.test_train import BATCH, NUM_TRAIN, _EchoModel


def test_trajectory_active_follows_e_start():
  config = default.get_config('method=mesa,smoke')
  config.input.batch_size = BATCH
  config.method.mesa.E_start = 3
  info = data.DatasetInfo(
    name='fake', num_train=NUM_TRAIN, num_test=0, num_classes=3, image_shape=(1, 1, 3)
  )
  exp = experiment.create(config, info, model=_EchoModel())
  assert [exp.trajectory_active(e) for e in (1, 2, 3, 4, 5)] == [False, False, False, True, True]
  config_sgd = default.get_config('method=sgd,smoke')
  config_sgd.input.batch_size = BATCH
  exp_sgd = experiment.create(config_sgd, info, model=_EchoModel())
  assert not any(exp_sgd.trajectory_active(e) for e in range(1, 10))


class _DenseBN(nn.Module):
  """Test-only model: Dense -> BatchNorm, so per-device BatchNorm statistics show."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(3)(x.reshape((x.shape[0], -1)))
    return nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)


def _scope_run(scope: str, num_devices: int) -> dict:
  """One SAM step on a fixed batch; returns numpy params, batch_stats and the inputs."""
  import jax

  config = default.get_config('method=sam,smoke')
  config.input.batch_size = 16
  config.mesh.data = num_devices
  config.method.perturbation_scope = scope
  config.method.sam.rho = 0.5
  info = data.DatasetInfo(
    name='fake', num_train=64, num_test=0, num_classes=3, image_shape=(2, 2, 1)
  )
  exp = experiment.create(config, info, model=_DenseBN())
  state = exp.init_state()
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.normal(size=(16, 2, 2, 1)).astype(np.float32),
    'label': rng.integers(0, 3, 16).astype(np.int32),
    'index': np.arange(16, dtype=np.int32),
  }
  init = jax.device_get(state)
  new_state, metrics, _ = exp.compiled_step(False)(state, jax.device_put(batch, exp.batch_sharding))
  return {'init': init, 'new': jax.device_get(new_state), 'batch': batch, 'exp': exp}


def _per_shard_sam_reference(run: dict, num_shards: int):
  """Per-device SAM written out: each shard's own SAM gradient, then their mean."""
  import jax
  import optax

  exp, init, batch = run['exp'], run['init'], run['batch']
  rho = exp.config.method.sam.rho

  def loss(params, images, labels):
    logits, new_vars = exp.model.apply(
      {'params': params, 'batch_stats': init.batch_stats},
      images,
      train=True,
      mutable=['batch_stats'],
    )
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1)), new_vars['batch_stats']

  grads, stats = [], []
  for images, labels in zip(
    np.split(batch['image'], num_shards), np.split(batch['label'], num_shards), strict=True
  ):
    g, new_stats = jax.grad(loss, has_aux=True)(init.params, images, labels)
    scale = rho / optax.global_norm(g)
    eps = jax.tree.map(lambda x, s=scale: s * x, g)
    perturbed = jax.tree.map(jnp.add, init.params, eps)
    grads.append(jax.grad(lambda p, i=images, y=labels: loss(p, i, y)[0])(perturbed))
    stats.append(new_stats)
  mean = lambda trees: jax.tree.map(lambda *x: np.mean(x, axis=0), *trees)  # noqa: E731
  base_state = init.opt_state.base_state
  base, _ = optimizers.base_optimizer(exp.config.optimizer, steps_per_epoch=4, num_epochs=4)
  updates, _ = base.update(mean(grads), base_state, init.params)
  return optax.apply_updates(init.params, updates), mean(stats)


def _check_per_device_scope():
  """Run in a process with 8 CPU devices (see the test below); raises on a mismatch."""
  import jax

  assert jax.device_count() == 8, jax.devices()
  per_device = _scope_run('per_device', 8)
  want_params, want_stats = _per_shard_sam_reference(per_device, 8)
  for got, want in (
    (per_device['new'].params, want_params),
    (per_device['new'].batch_stats, want_stats),
  ):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  # The global scope on 8 devices is one SAM step on the whole batch: it differs.
  global_8 = _scope_run('global', 8)
  one_shard_params, _ = _per_shard_sam_reference(global_8, 1)
  diffs = []
  for a, b, c in zip(
    jax.tree.leaves(global_8['new'].params),
    jax.tree.leaves(one_shard_params),
    jax.tree.leaves(per_device['new'].params),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    diffs.append(np.abs(a - c).max())
  assert max(diffs) > 1e-4, diffs
  # On one device both scopes are the same step.
  for a, b in zip(
    jax.tree.leaves(_scope_run('per_device', 1)['new']),
    jax.tree.leaves(_scope_run('global', 1)['new']),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  print('per-device scope OK')


def test_per_device_scope_is_the_mean_of_each_shards_sam_gradient():
  """8 simulated CPU devices, in a subprocess (the device count is fixed at JAX start)."""
  import os
  import subprocess
  import sys

  from tests.conftest import REPO_ROOT

  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run(
    [sys.executable, '-c', 'from tests import test_experiment as t; t._check_per_device_scope()'],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert 'per-device scope OK' in proc.stdout


@pytest.mark.parametrize('method', ['saf', 'mesa'])
def test_bfloat16_compute_keeps_float32_state_and_losses(method):
  """config.model.dtype='bfloat16': the CNN computes in bfloat16, all else is float32."""
  rng = np.random.default_rng(0)
  info = data.DatasetInfo(
    name='fake', num_train=64, num_test=0, num_classes=10, image_shape=(8, 8, 1)
  )
  batch = {
    'image': rng.normal(size=(16, 8, 8, 1)).astype(np.float32),
    'label': rng.integers(0, 10, 16).astype(np.int32),
    'index': np.arange(16, dtype=np.int32),
    'target_logits': rng.normal(size=(16, 10)).astype(np.float32),
    'target_mask': np.ones(16, np.float32),
  }
  if method == 'mesa':
    del batch['target_logits'], batch['target_mask']
  results = {}
  for dtype in ('float32', 'bfloat16'):
    config = default.get_config(f'method={method},smoke')
    config.input.batch_size = 16
    config.model.dtype = dtype
    exp = experiment.create(config, info)
    step = exp.compiled_step(active=True)
    state, metrics, logits = step(exp.init_state(), dict(batch))
    results[dtype] = metrics
    for leaf in jax.tree.leaves((state.params, state.opt_state, state.ema_params)):
      assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    assert all(m.dtype == jnp.float32 for m in metrics.values())
    assert logits is None or logits.dtype == jnp.float32
  # Same init and batch: bfloat16 rounding moves the losses a little, not a lot.
  for key in ('ce_loss', 'trajectory_loss'):
    got, want = float(results['bfloat16'][key]), float(results['float32'][key])
    assert got != want and abs(got - want) < 0.05 * abs(want), key

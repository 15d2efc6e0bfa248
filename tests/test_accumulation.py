"""Gradient accumulation (config.input.accum_steps): micro-batches in one scan, exact means."""

import functools
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from saf_jax import (
  accumulate,
  data,
  experiment,
  losses,
  methods,
  train,
  train_state,
  train_steps,
  transforms,
  validation,
)
from tests import conftest
from tests.test_train import NUM_TRAIN, _DenseModel, _FakeDatasets
from tests.test_train_steps import _DenseBN

NUM_CLASSES, BATCH, M = 5, 16, 4
LAM, TAU = 0.3, 5.0


class _Mlp(nn.Module):
  """Test-only model without BatchNorm: each example's logits depend on it alone."""

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    x = nn.tanh(nn.Dense(6)(x.reshape((x.shape[0], -1))))
    return nn.Dense(NUM_CLASSES)(x)


def _mask():
  """SAF's target mask with 4, 2, 1 and 0 valid targets in micro-batches 0..3 (rows j::4)."""
  valid = (4, 2, 1, 0)
  return np.array([float(i // M < valid[i % M]) for i in range(BATCH)], np.float32)


def _batches(num, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {
      'image': rng.normal(size=(BATCH, 4, 4, 1)).astype(np.float32),
      'label': rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32),
      'index': rng.permutation(100)[:BATCH].astype(np.int32),
      'target_logits': 3 * rng.normal(size=(BATCH, NUM_CLASSES)).astype(np.float32),
      'target_mask': _mask(),
    }
    for _ in range(num)
  ]


def _base():
  return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))


# The SAM-family transforms around a base (ESAM: 5 of 16 examples, padded to 8 rows in 4
# micro-batches; a half of the entries perturbed).
_TRANSFORMS = {
  'sam': lambda base: transforms.sam(base, rho=0.1),
  'asam': lambda base: transforms.asam(base, rho=0.5, eta=0.01),
  'gsam': lambda base: transforms.gsam(
    base, learning_rate=0.1, lr_max=0.1, rho_max=0.1, rho_min=0.1, alpha=0.3
  ),
  'looksam': lambda base: transforms.looksam(base, rho=0.1, k=2, alpha=0.7),
  'esam': lambda base: transforms.esam(base, rho=0.1, beta=0.5, gamma=0.3),
  'msam': lambda base: transforms.msam(base, rho=0.5),
  'rwp': lambda base: transforms.rwp(base, sigma=0.05, lam=0.5),
}


def _tx(method, base=None):
  base = _base() if base is None else base
  perturbation = methods.parse(method).perturbation
  return base if perturbation is None else _TRANSFORMS[perturbation](base)


def _hparams(method):
  trajectory = methods.parse(method).trajectory
  if trajectory is None:
    return {}
  return {'lam': LAM, 'tau': TAU, **({'ema_decay': 0.5} if trajectory == 'mesa' else {})}


def _run(method, accum_steps, *, model=None, scope='accumulated', looksam_static=False, steps=3):
  """``steps`` steps on fixed batches; returns the states, the last metrics and logits."""
  model = _Mlp() if model is None else model
  tx = _tx(method)
  state = train_state.create_train_state(
    model, tx, rng=jax.random.key(0), image_shape=(4, 4, 1), method=method
  )
  make = functools.partial(
    train_steps.make_train_step,
    model=model,
    tx=tx,
    method=method,
    trajectory_active=True,
    accum_steps=accum_steps,
    accum_scope=scope,
    **_hparams(method),
  )
  if looksam_static:  # LookSAM's SAM step (count % 2 == 0) and its reuse step.
    programs = [jax.jit(make(sam_step=flag)) for flag in (True, False)]
  else:
    programs = [jax.jit(make())] * 2
  history = [state]
  for i, batch in enumerate(_batches(steps)):
    state, metrics, logits = programs[i % 2](state, batch)
    history.append(state)
  return history, metrics, logits


def _assert_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _max_diff(a, b):
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(a, b, strict=True))


def test_microbatch_j_is_rows_j_mod_m_and_merge_restores_the_batch_order():
  x = jnp.arange(12 * 2).reshape(12, 2)
  parts = [accumulate.microbatch(x, j, 3) for j in range(3)]
  for j, part in enumerate(parts):
    np.testing.assert_array_equal(part, x[j::3])
  np.testing.assert_array_equal(accumulate.merge(jnp.stack(parts)), x)


@pytest.mark.parametrize(
  'method, looksam_static',
  [
    ('sgd', False),
    ('saf', False),
    ('mesa', False),
    ('sam', False),
    ('asam', False),
    ('gsam', False),
    ('looksam', False),  # Steps chosen in the graph (lax.cond).
    ('looksam', True),  # The SAM step and the reuse step as two programs.
    ('esam', False),
    ('saf+esam', False),  # SDS ranks by shares of the masked mean: global counts.
    ('msam', False),
    ('rwp', False),
    ('saf+sam', False),
  ],
)
def test_accumulation_equals_the_one_batch_step_without_batchnorm(method, looksam_static):
  """M = 4 micro-batches of a BatchNorm-free model: params, optimizer state, EMAs,
  metrics and SAF's logits equal M = 1's after 3 steps, to 1e-5 (relative) and 1e-6."""
  one, metrics_one, logits_one = _run(method, 1, looksam_static=looksam_static)
  acc, metrics_acc, logits_acc = _run(method, M, looksam_static=looksam_static)
  _assert_close(acc[-1], one[-1])
  _assert_close(metrics_acc, metrics_one)
  if methods.parse(method).saf:
    assert logits_acc.shape == (BATCH, NUM_CLASSES)
    _assert_close(logits_acc, logits_one)
  if methods.parse(method).trajectory is not None:
    assert float(metrics_acc['trajectory_loss']) > 0
  # Not vacuous: the steps moved the params.
  assert _max_diff(jax.tree.leaves(acc[-1].params), jax.tree.leaves(acc[0].params)) > 1e-3


def test_saf_masked_mean_uses_the_global_count_of_valid_targets():
  """The mask has 4, 2, 1, 0 valid targets in the four micro-batches: averaging their own
  masked means would weigh them 1/4 each; the step's loss is the global masked mean."""
  model = _Mlp()
  state = train_state.create_train_state(
    model, _base(), rng=jax.random.key(0), image_shape=(4, 4, 1), method='saf'
  )
  batch = _batches(1)[0]
  step = train_steps.make_train_step(
    model=model, tx=_base(), method='saf', lam=LAM, tau=TAU, trajectory_active=True, accum_steps=M
  )
  _, metrics, _ = jax.jit(step)(state, batch)
  logits = model.apply({'params': state.params}, batch['image'], train=True)
  want = losses.trajectory_loss(
    logits, batch['target_logits'], temperature=TAU, mask=batch['target_mask']
  )
  np.testing.assert_allclose(metrics['trajectory_loss'], want, rtol=1e-6)
  own_means = [
    losses.trajectory_loss(
      logits[j::M], batch['target_logits'][j::M], temperature=TAU, mask=batch['target_mask'][j::M]
    )
    for j in range(M)
  ]
  assert abs(float(np.mean(own_means)) - float(want)) > 1e-2


def _plain_final(method, g, params, grad_fn, **kwargs):
  """The plain transform's final gradient: its update around an identity base optimizer."""
  tx = _TRANSFORMS[methods.parse(method).perturbation](optax.identity())
  final, _ = tx.update(g, tx.init(params), params, grad_fn=grad_fn, **kwargs)
  return final


def _per_microbatch_reference(method, state, batch, model):
  """Written out: each micro-batch j's final gradient from its own clean gradient and loss
  L_j (cross-entropy mean over j, SAF's masked KL sum over the global count / M), their
  mean, then the base step."""
  saf = methods.parse(method).saf
  valid = max(float(batch['target_mask'].sum()), 1.0)

  def objective(params, rows, kl_den=None, per_example=False):
    logits = model.apply({'params': params}, batch['image'][rows], train=True)
    ce = losses.per_example_cross_entropy(logits, batch['label'][rows])
    if per_example:
      return ce
    loss = jnp.mean(ce)
    if saf:
      kl = losses.per_example_kl(logits, batch['target_logits'][rows], temperature=TAU)
      loss = loss + LAM * TAU**2 * jnp.sum(kl * batch['target_mask'][rows]) / kl_den
    return loss

  finals = []
  for j in range(M):
    rows = np.arange(j, BATCH, M)
    loss_j = functools.partial(objective, rows=rows, kl_den=valid / M)

    def grad_fn(params, indices=None, rows=rows, loss_j=loss_j):
      if indices is None:
        return jax.grad(loss_j)(params)
      return jax.grad(objective)(params, rows[np.asarray(indices)])  # ESAM's B+ of j.

    kwargs = {}
    if method == 'esam':
      kwargs['per_example_loss_fn'] = functools.partial(objective, rows=rows, per_example=True)
      kwargs['per_example_losses'] = kwargs['per_example_loss_fn'](state.params)
    g_j = jax.grad(loss_j)(state.params)
    finals.append(_plain_final(method, g_j, state.params, grad_fn, **kwargs))
  mean = jax.tree.map(lambda *x: sum(x) / M, *finals)
  updates, _ = _base().update(mean, state.opt_state.base_state, state.params)
  return optax.apply_updates(state.params, updates)


@pytest.mark.parametrize('method', ['sam', 'asam', 'gsam', 'esam', 'saf+sam'])
def test_per_microbatch_scope_is_the_mean_of_each_microbatchs_final_gradient(method):
  model = _Mlp()
  tx = _tx(method)
  state = train_state.create_train_state(
    model, tx, rng=jax.random.key(0), image_shape=(4, 4, 1), method=method
  )
  batch = _batches(1)[0]
  step = train_steps.make_train_step(
    model=model,
    tx=tx,
    method=method,
    trajectory_active=True,
    accum_steps=M,
    accum_scope='per_microbatch',
    **_hparams(method),
  )
  new_state, _, _ = jax.jit(step)(state, batch)
  want = _per_microbatch_reference(method, state, batch, model)
  _assert_close(new_state.params, want)
  # It is not the accumulated scope's step.
  accumulated = _run(method, M, steps=1)[0][-1]
  assert _max_diff(jax.tree.leaves(accumulated.params), jax.tree.leaves(want)) > 1e-5


@pytest.mark.parametrize('method', ['sgd', 'sam'])
def test_batchnorm_normalises_per_microbatch_and_averages_the_running_statistics(method):
  """Each micro-batch normalises with its own statistics; the running statistics are the
  mean of the micro-batches' updates: 0.9 r + 0.1 mean_j(s_j), s_j its mean and biased
  variance. SAM's perturbed scan writes none."""
  model = _DenseBN()
  history, _, _ = _run(method, M, model=model, steps=1)
  state, new_state = history
  batch = _batches(1)[0]
  x = batch['image'].reshape(BATCH, -1) @ np.asarray(state.params['Dense_0']['kernel'])
  x = x + np.asarray(state.params['Dense_0']['bias'])
  parts = [x[j::M] for j in range(M)]
  want_mean = 0.9 * 0.0 + 0.1 * np.mean([p.mean(0) for p in parts], axis=0)
  want_var = 0.9 * 1.0 + 0.1 * np.mean([p.var(0) for p in parts], axis=0)
  got = new_state.batch_stats['BatchNorm_0']
  np.testing.assert_allclose(got['mean'], want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got['var'], want_var, rtol=1e-5, atol=1e-6)
  # Not the one-batch update: the variance lacks the spread of the micro-batch means.
  assert np.abs(got['var'] - (0.9 + 0.1 * x.var(0))).max() > 1e-3
  # The same statistics from Flax, micro-batch by micro-batch, averaged.
  stats = [
    model.apply(
      {'params': state.params, 'batch_stats': state.batch_stats},
      batch['image'][j::M],
      train=True,
      mutable=['batch_stats'],
    )[1]['batch_stats']
    for j in range(M)
  ]
  _assert_close(new_state.batch_stats, jax.tree.map(lambda *s: sum(s) / M, *stats))
  if method == 'sgd':  # The gradient: the mean of the micro-batches' own-statistics ones.

    def loss(params, j):
      logits, _ = model.apply(
        {'params': params, 'batch_stats': state.batch_stats},
        batch['image'][j::M],
        train=True,
        mutable=['batch_stats'],
      )
      return losses.cross_entropy(logits, batch['label'][j::M])

    grads = jax.tree.map(
      lambda *g: sum(g) / M, *[jax.grad(loss)(state.params, j) for j in range(M)]
    )
    updates, _ = _base().update(grads, state.opt_state, state.params)
    _assert_close(new_state.params, optax.apply_updates(state.params, updates))


def test_make_train_step_refuses_bad_arguments():
  model, tx = _Mlp(), _tx('looksam')
  with pytest.raises(ValueError, match='accum_steps must be an integer >= 1, got 0'):
    train_steps.make_train_step(model=model, tx=tx, method='sgd', accum_steps=0)
  with pytest.raises(ValueError, match=r"accum_scope must be one of \['accumulated'"):
    train_steps.make_train_step(model=model, tx=tx, method='sam', accum_steps=2, accum_scope='x')
  with pytest.raises(ValueError, match=r"'per_microbatch' does not apply to looksam: its stored"):
    train_steps.make_train_step(
      model=model, tx=tx, method='looksam', accum_steps=2, accum_scope='per_microbatch'
    )
  state = train_state.create_train_state(
    model, _base(), rng=jax.random.key(0), image_shape=(4, 4, 1), method='sgd'
  )
  step = train_steps.make_train_step(model=model, tx=_base(), method='sgd', accum_steps=3)
  with pytest.raises(ValueError, match='accum_steps=3 must divide the batch of 16 rows'):
    jax.jit(step)(state, _batches(1)[0])


@pytest.mark.parametrize(
  'method, fields, num_devices, match',
  [
    ('saf', {'input.accum_steps': 0}, 1, r'config.input.accum_steps must be an integer >= 1 \('),
    (
      'saf',
      {'input.accum_steps': 32},
      8,
      r'accum_steps must be a divisor of the per-device batch \(input.batch_size 128 / 8 '
      r'devices = 16\): one of \[1, 2, 4, 8, 16\], got 32\.',
    ),
    ('sgd', {'input.accum_steps': 3}, 1, r'accum_steps must be a divisor of the per-device'),
    ('sam', {'method.accum_scope': 'global'}, 1, r"accum_scope must be one of \['accumulated'"),
    *(
      (
        name,
        {'input.accum_steps': 2, 'method.accum_scope': 'per_microbatch'},
        1,
        rf"config.method.accum_scope must be 'accumulated' for method {re.escape(name)} with "
        r'input.accum_'
        rf'steps > 1 \(its {word}',
      )
      for name, word in (
        ('looksam', 'stored'),
        ('saf+looksam', 'stored'),
        ('msam', 'perturbation comes from the momentum'),
        ('rwp', 'perturbation is random'),
      )
    ),
  ],
)
def test_validation_refuses_with_one_line_naming_the_field(method, fields, num_devices, match):
  config = default.get_config(f'method={method}')
  for field, value in fields.items():
    section, name = field.split('.')
    config[section][name] = value
  with pytest.raises(ValueError, match=match) as error:
    validation.validate_config(config, num_devices=num_devices)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize(
  'method, scope, perturbation_scope',
  [
    ('sam', 'per_microbatch', 'global'),
    ('esam', 'per_microbatch', 'per_device'),
    ('looksam', 'accumulated', 'per_device'),
    ('msam', 'accumulated', 'global'),
    ('saf', 'per_microbatch', 'global'),  # Read by the SAM family only.
  ],
)
def test_validation_accepts(method, scope, perturbation_scope):
  config = default.get_config(f'method={method}')
  config.input.accum_steps = 4  # 128 / 8 devices = 16 per device.
  config.method.accum_scope = scope
  config.method.perturbation_scope = perturbation_scope
  validation.validate_config(config, num_devices=8)
  config.input.accum_steps, config.method.accum_scope = 1, 'per_microbatch'
  validation.validate_config(config, num_devices=8)  # Not read without accumulation.


def _exp_run(scope, accum_steps, perturbation_scope, order=None):
  """One SAM step through ``Experiment.compiled_step`` on every device; numpy params."""
  config = default.get_config('method=sam,smoke')
  config.input.batch_size = 8
  config.input.accum_steps = accum_steps
  config.method.accum_scope = scope
  config.method.perturbation_scope = perturbation_scope
  config.method.sam.rho = 0.5
  validation.validate_config(config, num_devices=jax.device_count())
  info = data.DatasetInfo(
    name='fake', num_train=64, num_test=0, num_classes=NUM_CLASSES, image_shape=(4, 4, 1)
  )
  exp = experiment.create(config, info, model=_Mlp())
  batch = {k: v[:8] for k, v in _batches(1)[0].items() if k in ('image', 'label', 'index')}
  if order is not None:
    batch = {k: v[order] for k, v in batch.items()}
  state, _, _ = exp.compiled_step(False)(
    exp.init_state(), jax.device_put(batch, exp.batch_sharding)
  )
  return jax.device_get(state.params)


def _check_per_device():
  """Run with 2 CPU devices (the test below); raises on a mismatch."""
  assert jax.device_count() == 2, jax.devices()
  # Accumulated inside each device: each device's gradient is its shard's, as without.
  _assert_close(_exp_run('accumulated', 2, 'per_device'), _exp_run('accumulated', 1, 'per_device'))
  # Per micro-batch inside each device: 2 devices x 2 micro-batches perturb alone, the
  # groups {0, 2}, {1, 3}, {4, 6}, {5, 7}: the global scope's 4 micro-batches (rows j::4)
  # of the batch reordered so that they are these groups.
  per_device = _exp_run('per_microbatch', 2, 'per_device')
  reordered = _exp_run('per_microbatch', 4, 'global', order=[0, 1, 4, 5, 2, 3, 6, 7])
  _assert_close(per_device, reordered)
  whole = _exp_run('accumulated', 1, 'global')
  assert _max_diff(jax.tree.leaves(per_device), jax.tree.leaves(whole)) > 1e-5
  print('per-device accumulation OK')


def test_per_device_scope_accumulates_inside_each_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  proc = subprocess.run(
    [sys.executable, '-c', 'from tests import test_accumulation as t; t._check_per_device()'],
    cwd=conftest.REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert 'per-device accumulation OK' in proc.stdout


def _loop_run(accum_steps):
  """SAF through the loop (device table, 2 steps per call), 2 epochs of fake data."""
  config = default.get_config('method=saf,smoke')
  config.input.batch_size = 4
  config.input.accum_steps = accum_steps
  config.input.placement = 'host'
  config.method.saf.table_placement = 'device'
  config.method.saf.E_start, config.method.saf.E_tilde = 1, 1
  config.steps_per_dispatch = 2
  info = data.DatasetInfo(
    name='fake', num_train=NUM_TRAIN, num_test=0, num_classes=3, image_shape=(1, 1, 3)
  )
  exp = experiment.create(config, info, model=_DenseModel())
  state, table, fake = exp.init_state(), exp.new_table(), _FakeDatasets()
  metrics = []
  for epoch in (1, 2):
    batches = fake.train_epoch(epoch, batch_size=4)
    state, step_metrics, _ = train.run_steps(exp, state, batches, epoch=epoch, table=table)
    metrics += step_metrics
  return jax.device_get(state.params), metrics, jax.device_get(table.state_dict())


def test_the_loop_with_a_device_table_trains_as_without_accumulation():
  """Epoch 2 reads the rows epoch 1 wrote: logits written out of order would change it."""
  params_one, metrics_one, table_one = _loop_run(1)
  params_acc, metrics_acc, table_acc = _loop_run(2)
  valid = [float(m['table_valid_fraction']) for m in metrics_acc]
  assert valid == [float(m['table_valid_fraction']) for m in metrics_one]
  assert valid[:2] == [0.0, 0.0] and min(valid[2:]) > 0  # 2 of 10 examples dropped an epoch.
  assert all(m['trajectory_loss'] > 0 for m in metrics_acc[2:])
  _assert_close(params_acc, params_one)
  _assert_close(table_acc, table_one)
  _assert_close(
    [m['loss'] for m in metrics_acc], [m['loss'] for m in metrics_one], rtol=1e-5, atol=1e-6
  )

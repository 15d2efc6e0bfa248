"""saf_jax.methods: every name parsed once, into its trajectory loss and perturbation."""

import jax.numpy as jnp
import ml_collections
import optax
import pytest

from configs import default
from saf_jax import methods, transforms


def test_every_name_and_its_parts():
  parts = {m: (methods.parse(m).trajectory, methods.parse(m).perturbation) for m in methods.NAMES}
  assert parts == {
    'sgd': (None, None),
    'saf': ('saf', None),
    'mesa': ('mesa', None),
    'sam': (None, 'sam'),
    'asam': (None, 'asam'),
    'gsam': (None, 'gsam'),
    'looksam': (None, 'looksam'),
    'esam': (None, 'esam'),
    'msam': (None, 'msam'),
    'rwp': (None, 'rwp'),
    **{f'{t}+{p}': (t, p) for t in ('saf', 'mesa') for p in methods.PERTURBATIONS},
  }
  assert methods.parse('saf+gsam').saf and not methods.parse('saf+gsam').mesa
  assert methods.parse('mesa').mesa and not methods.parse('sgd').saf
  assert methods.parse(methods.parse('mesa+esam')) == methods.parse('mesa+esam')


@pytest.mark.parametrize('name', ['sam+saf', 'SAF', 'saf+mesa', 'sam+asam', '', 'adamw'])
def test_unknown_name_lists_the_known_names(name):
  with pytest.raises(ValueError) as info:
    methods.parse(name)
  assert str(info.value) == (
    f'config.method.name must be one of {list(methods.NAMES)}, got {name!r}.'
  )


def test_method_is_frozen():
  with pytest.raises(AttributeError):
    methods.parse('saf').trajectory = 'mesa'


def _state_type(method: str):
  config = default.get_config(f'method={method}')
  base = optax.sgd(0.1)
  tx = methods.parse(method).optimizer(base, config, schedule=optax.constant_schedule(0.1))
  return tx, type(tx.init({'w': jnp.zeros(3)}))


@pytest.mark.parametrize('method', ['sgd', 'saf', 'mesa'])
def test_without_perturbation_the_optimizer_is_the_base(method):
  config = default.get_config(f'method={method}')
  base = optax.sgd(0.1)
  assert methods.parse(method).optimizer(base, config, schedule=lambda _: 0.1) is base


@pytest.mark.parametrize(
  ('method', 'state'),
  [
    ('sam', transforms.SAMState),
    ('saf+asam', transforms.SAMState),
    ('mesa+looksam', transforms.LookSAMState),
  ],
)
def test_each_perturbation_builds_its_transform(method, state):
  _, state_type = _state_type(method)
  assert state_type is state


def test_each_factory_reads_its_own_hyperparameters():
  # SAM's rho from config.method.sam: one step from w = 0 on the loss sum((w - 1)^2), whose
  # gradient is g = (-2, -2, -2, -2), |g| = 4. The ascent point is w + rho * g / |g| = -0.25
  # each (rho = 0.5; the default 0.05 would give -0.025), the gradient there 2 * (-1.25),
  # and SGD with lr 1 steps by minus that.
  config = default.get_config('method=sam')
  config.method.sam.rho = 0.5
  tx = methods.parse('sam').optimizer(optax.sgd(1.0), config, schedule=lambda _: 1.0)
  params = {'w': jnp.zeros(4)}

  def grad_fn(p):
    return {'w': 2 * (p['w'] - 1)}

  updates, _ = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
  assert jnp.allclose(updates['w'], 2.5)
  assert isinstance(config.method.sam, ml_collections.ConfigDict)

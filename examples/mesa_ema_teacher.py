"""MESA in your own loop: the trajectory loss against an EMA teacher (Eq. 10 and 13).

  python -m examples.mesa_ema_teacher  # from the repository root

``saf_jax.ema_params`` keeps the EMA of the weights as the last link of an optax chain;
``saf_jax.get_ema_params`` reads it back as the teacher.
"""

import jax
import jax.numpy as jnp
import optax

import saf_jax

lam, tau, ema_decay = 0.8, 5.0, 0.9  # Table 4's lam and tau; a short EMA for 50 steps.
key_x, key_w = jax.random.split(jax.random.key(0))
x = jax.random.normal(key_x, (256, 8))
labels = jnp.argmax(x @ jax.random.normal(key_w, (8, 3)), axis=-1)
params = {'w': jnp.zeros((8, 3)), 'b': jnp.zeros(3)}


def apply(params):
  return x @ params['w'] + params['b']


def loss_fn(params, teacher_logits):
  logits = apply(params)
  trajectory = saf_jax.trajectory_loss(logits, teacher_logits, temperature=tau)
  return saf_jax.cross_entropy(logits, labels) + lam * trajectory, trajectory


tx = optax.chain(optax.sgd(0.5, momentum=0.9), saf_jax.ema_params(ema_decay=ema_decay))
opt_state = tx.init(params)


@jax.jit
def step(params, opt_state):
  teacher = jax.lax.stop_gradient(apply(saf_jax.get_ema_params(opt_state)))
  (loss, trajectory), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, teacher)
  updates, opt_state = tx.update(grads, opt_state, params)  # params: the EMA needs them.
  return optax.apply_updates(params, updates), opt_state, trajectory


for _ in range(50):
  params, opt_state, trajectory = step(params, opt_state)
teacher = saf_jax.get_ema_params(opt_state)
gap = float(jnp.abs(teacher['w'] - params['w']).max())
print(f'MESA: trajectory loss {float(trajectory):.4f}, |teacher - student| max {gap:.4f}')
assert 0 < gap and float(trajectory) > 0

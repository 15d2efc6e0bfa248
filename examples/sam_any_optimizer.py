"""SAM around any optax optimizer, in your own loop: a linear classifier on synthetic data.

python -m examples.sam_any_optimizer  # from the repository root
"""

import jax
import jax.numpy as jnp
import optax

import saf_jax

# Data: 256 examples of 8 features, 3 classes from a random linear teacher.
key_x, key_w = jax.random.split(jax.random.key(0))
x = jax.random.normal(key_x, (256, 8))
labels = jnp.argmax(x @ jax.random.normal(key_w, (8, 3)), axis=-1)
params = {'w': jnp.zeros((8, 3)), 'b': jnp.zeros(3)}


def loss_fn(params):
  logits = x @ params['w'] + params['b']
  return saf_jax.cross_entropy(logits, labels)


# SAM wraps the base optimizer; update() takes the clean gradient plus grad_fn, the
# gradient at the perturbed point (optax.contrib.sam's opaque mode).
tx = saf_jax.sam(optax.sgd(0.5, momentum=0.9), rho=0.05)
opt_state = tx.init(params)


@jax.jit
def step(params, opt_state):
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params, grad_fn=jax.grad(loss_fn))
  return optax.apply_updates(params, updates), opt_state, loss


first = float(loss_fn(params))
for _ in range(50):
  params, opt_state, loss = step(params, opt_state)
final = float(loss_fn(params))
print(f'SAM: cross-entropy {first:.4f} -> {final:.4f}')
assert final < 0.5 * first

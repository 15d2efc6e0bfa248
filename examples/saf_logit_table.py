"""SAF in your own loop: a LogitTable of past logits and the masked trajectory loss (Eq. 9).

  python -m examples.saf_logit_table  # from the repository root

Every example carries a stable id. In epoch e its logits from epoch e - E_tilde are the
target; the step's own logits are written back (Algorithm 1, lines 4-5), so SAF needs no
extra forward pass. Rows not written in epoch e - E_tilde are masked out of the loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import saf_jax

lam, tau, E_start, E_tilde = 0.3, 5.0, 1, 2  # Table 4's lam and tau; short epoch counts.
num_examples, batch_size, num_classes = 256, 64, 3
key_x, key_w = jax.random.split(jax.random.key(0))
x = jax.random.normal(key_x, (num_examples, 8))
labels = jnp.argmax(x @ jax.random.normal(key_w, (8, num_classes)), axis=-1)
params = {'w': jnp.zeros((8, num_classes)), 'b': jnp.zeros(num_classes)}
tx = optax.sgd(0.5, momentum=0.9)
opt_state = tx.init(params)
table = saf_jax.LogitTable(num_examples, num_classes, E_tilde=E_tilde)


def loss_fn(params, ids, target_logits, target_mask, active):
  logits = x[ids] @ params['w'] + params['b']
  trajectory = saf_jax.trajectory_loss(logits, target_logits, temperature=tau, mask=target_mask)
  loss = saf_jax.cross_entropy(logits, labels[ids]) + active * lam * trajectory
  return loss, logits


@jax.jit
def step(params, opt_state, ids, target_logits, target_mask, active):
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, logits), grads = grad_fn(params, ids, target_logits, target_mask, active)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, logits


valid = []
for epoch in range(1, 6):
  valid.append(table.valid_fraction(epoch))  # Share of rows from epoch - E_tilde.
  order = np.random.default_rng(epoch).permutation(num_examples)
  for ids in order.reshape(-1, batch_size):
    target_logits, target_mask = table.gather(ids, epoch=epoch)  # Line 5.
    active = float(epoch > E_start)  # Line 10.
    params, opt_state, logits = step(params, opt_state, ids, target_logits, target_mask, active)
    table.write_async(ids, logits, epoch=epoch)  # Line 4: the step's own logits.
  table.flush()  # Before the next epoch reads (E_tilde = 1 would read this epoch's rows).
  print(f'SAF epoch {epoch}: valid targets {valid[-1]:.2f}')
# Epochs 1-2 have no logits from E_tilde = 2 epochs before; from epoch 3 every row does.
assert valid == [0.0, 0.0, 1.0, 1.0, 1.0], valid

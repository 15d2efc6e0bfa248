r"""One call of the compiled training program: ``k`` steps, their batches and SAF's table.

``make_dispatch`` wraps a train step (``train_steps.make_train_step``) into the program
that the loop calls once per ``config.steps_per_dispatch = k`` steps:

.. code-block:: text

  dispatch(state, table, inputs, epoch) -> (state, table, metrics, logits)
    for i in 0..k-1 (jax.lax.scan when k > 1):
      batch  = inputs[i]                                  # host placement: placed batches
             | make_batch(train_set, plan[first + i])     # device placement: gathered here
      batch += table.gather(batch['index'], epoch)         # device table: Algorithm 1, line 5
      state, metrics[i], logits = train_step(state, batch)
      table  = table.write(batch['index'], logits, epoch)  # device table: Algorithm 1, line 4

With the data on the devices (``config.input.placement``) the host sends one scalar per
call, the index of its first batch in the epoch's plan (placed once per epoch); with SAF's
table on the devices (``config.method.saf.table_placement``) the table is donated and
updated in place, and no logits leave the devices. Steps run one after another on the
device, so a row written by one step is read by any later one (``E_tilde = 1`` included).
The per-step metrics stay on the device until the loop reads them.

With ``k = 1`` there is no scan: the program is the step itself plus what the placements
add, so host placement with ``k = 1`` runs exactly the step the loop always ran.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saf_jax import device_input, logit_table

# A host table's targets of the batches, which the host sends with each call.
_HOST_TARGETS = ('target_logits', 'target_mask')


def make_dispatch(
  step: Callable | tuple[Callable, ...],
  *,
  num_steps: int,
  data_on_device: bool,
  table: logit_table.DeviceTable | None = None,
) -> Callable:
  """Builds ``dispatch(state, table_arrays, inputs, epoch)``.

  It returns ``(state, table_arrays, metrics, logits)``.

  Args:
    step: ``train_step(state, batch) -> (state, metrics, logits)``, or a tuple of ``p``
      of them: the ``i``-th step of a call runs ``step[i % p]`` (LookSAM's SAM step and
      its ``p - 1`` reuse steps, when ``p`` divides ``k`` and each call starts at a step
      that ``p`` divides).
    num_steps: ``k >= 1``, the steps of one call; a multiple of ``p``.
    data_on_device: whether ``inputs`` is ``{'train_set': DeviceTrainSet, 'plan': the
      epoch's plan, int32/bool arrays [batches, B, ...], 'first': int32 scalar}``
      (``device_input``) instead of placed batches (float32 ``image`` [B, H, W, C] and
      int32 ``label``/``index`` [B], with a leading [k] axis when ``k > 1``). For a host SAF
      table either carries the batches' float32 ``target_logits`` [(k,) B, K] and
      ``target_mask`` [(k,) B].
    table: the layout of SAF's device table, whose arrays are ``table_arrays``; None when
      the table is on the host or the method has none (then ``table_arrays`` is None).

  Returns:
    A pure function. ``epoch`` is an int32 scalar (traced: one program for every epoch).
    ``metrics`` are the step's float32 scalars, each with a leading [k] axis when
    ``k > 1``; ``logits`` the step's float32 [B, K] logits ([k, B, K]) when the step returns
    them and no device table takes them, else None.
  """

  steps = step if isinstance(step, tuple) else (step,)
  period = len(steps)
  if num_steps % period:
    raise ValueError(f'{period} step programs do not divide {num_steps} steps per call.')

  def one_step(step, state, arrays, inputs, epoch):
    if data_on_device:
      plan = jax.tree.map(lambda x: x[inputs['first']], inputs['plan'])
      batch = device_input.make_batch(inputs['train_set'], plan)
      batch.update({k: v for k, v in inputs.items() if k in _HOST_TARGETS})
    else:
      batch = dict(inputs)
    if table is not None:  # Algorithm 1, line 5.
      batch['target_logits'], batch['target_mask'] = table.gather(arrays, batch['index'], epoch)
    state, metrics, logits = step(state, batch)
    if table is not None:  # Algorithm 1, line 4.
      arrays, logits = table.write(arrays, batch['index'], logits, epoch), None
    return state, arrays, metrics, logits

  def dispatch(state, arrays, inputs, epoch):
    if num_steps == 1:
      return one_step(steps[0], state, arrays, inputs, epoch)
    # Scanned: the host's batches or targets, [k, ...]; shared: the training set and plan.
    scanned = {k: v for k, v in inputs.items() if not data_on_device or k in _HOST_TARGETS}
    shared = {k: v for k, v in inputs.items() if k not in scanned}
    if data_on_device:
      scanned['first'] = inputs['first'] + jnp.arange(num_steps, dtype=jnp.int32)
    # [k / p, p, ...]: each scanned iteration runs the p step programs in order.
    groups = jax.tree.map(lambda x: x.reshape(num_steps // period, period, *x.shape[1:]), scanned)

    def body(carry, group):
      state, arrays = carry
      outputs = []
      for j, step in enumerate(steps):
        step_inputs = {**shared, **jax.tree.map(lambda x, j=j: x[j], group)}
        state, arrays, metrics, logits = one_step(step, state, arrays, step_inputs, epoch)
        outputs.append((metrics, logits))
      return (state, arrays), jax.tree.map(lambda *x: jnp.stack(x), *outputs)

    # Unrolled on CPUs, where XLA's while loops ran the same steps 5-8x slower (measured);
    # a loop elsewhere, which compiles once whatever k.
    unroll = num_steps // period if jax.default_backend() == 'cpu' else 1
    (state, arrays), out = jax.lax.scan(body, (state, arrays), groups, unroll=unroll)
    metrics, logits = jax.tree.map(lambda x: x.reshape(num_steps, *x.shape[2:]), out)
    return state, arrays, metrics, logits

  return dispatch


class TableOnDevice:
  """SAF's table on the devices: a ``DeviceTable`` layout and its sharded arrays.

  It offers what the loop and the checkpoints use of a host ``LogitTable``:
  :meth:`state_dict`, :meth:`load_state_dict`, ``nbytes``. The
  loop passes :attr:`arrays` to each call of the compiled program, which donates them,
  and stores the returned ones back.

  Attributes:
    layout: the ``logit_table.DeviceTable``.
    arrays: ``{name: jax.Array}`` of ``layout.specs()``, rows split over the mesh.
    sharding: the arrays' sharding (rows, axis 1, over 'data').
  """

  def __init__(self, layout: logit_table.DeviceTable, sharding: jax.sharding.NamedSharding):
    self.layout = layout
    self.sharding = sharding
    self.arrays = jax.jit(layout.init, out_shardings=sharding)()

  @property
  def nbytes(self) -> int:
    """Bytes of the table over all devices (``layout.nbytes()``)."""
    return self.layout.nbytes()

  def abstract(self) -> dict[str, jax.ShapeDtypeStruct]:
    return self.layout.abstract(self.sharding)

  def state_dict(self) -> dict[str, jax.Array]:
    """The arrays to checkpoint (global ``jax.Array``\\ s; Orbax saves them sharded)."""
    return self.arrays

  def load_state_dict(self, arrays: dict[str, jax.Array]) -> None:
    self.arrays = dict(arrays)

  def close(self) -> None:
    self.arrays = None


@dataclasses.dataclass
class DeviceFeed:
  """The device placement's inputs for one epoch: the training set and the epoch's plan.

  Attributes:
    train_set: the ``device_input.DeviceTrainSet`` (placed once per run).
    plan: the epoch's global plan on the devices (``device_input.global_plan``: every
      batch of the epoch, rows split over 'data').
    next_batch: the index in ``plan`` of the next batch to train.
    num_batches: the batches of the plan.
    host_index: the plan's ids on the host, int32 [num_batches, B] (for a host SAF table).
  """

  train_set: Any
  plan: dict[str, jax.Array]
  next_batch: int
  num_batches: int
  host_index: np.ndarray | None = None

  def local_index(self, first: int, num_steps: int) -> np.ndarray:
    """This process's ids of batches ``first .. first + num_steps - 1``: int32 [(k,) B / P]."""
    local = self.host_index.shape[1] // jax.process_count()
    p = jax.process_index()
    ids = self.host_index[first : first + num_steps, p * local : (p + 1) * local]
    return ids[0] if num_steps == 1 else ids

  def peek(self) -> dict[str, Any]:
    """The inputs of the next call: the training set, the plan and the first batch."""
    return {'train_set': self.train_set, 'plan': self.plan, 'first': np.int32(self.next_batch)}

  def take(self, num_steps: int) -> dict[str, Any]:
    """The inputs of the next call of ``num_steps`` steps; advances ``next_batch``."""
    if self.next_batch + num_steps > self.num_batches:
      raise ValueError(
        f'{num_steps} steps from batch {self.next_batch} pass the end of the epoch '
        f'({self.num_batches} batches).'
      )
    inputs = self.peek()
    self.next_batch += num_steps
    return inputs


def abstract(tree: Any) -> Any:
  """``jax.ShapeDtypeStruct``\\ s, with shardings, of a pytree of arrays (None stays None)."""

  def spec(x):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, 'sharding', None))

  return jax.tree.map(spec, tree)

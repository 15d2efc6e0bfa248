"""Device mesh and shardings: data parallel over one 'data' axis.

The batch is split along its first dimension over ``data``; params, optimizer state,
EMA weights and batch statistics are replicated. Gradients are therefore averaged over
the global batch, and BatchNorm statistics in the training forward are computed over the
global batch (XLA inserts the cross-device reductions).
"""

import collections
from collections.abc import Iterable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def create_mesh(num_devices: int = -1) -> Mesh:
  """A 1-D mesh with axis 'data' over the first ``num_devices`` devices (-1 = all).

  Devices are ordered by process, so each process's devices hold one contiguous block of
  the global batch: the rows of that process's local batch, in order.
  """
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  if num_devices != -1:
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), ('data',))


def state_shardings(abstract_state, mesh: Mesh, rule: str = 'replicated'):
  """The sharding of every leaf of the train state, by ``config.mesh.param_sharding``.

  Args:
    abstract_state: a pytree of arrays or ``jax.ShapeDtypeStruct``.
    mesh: the device mesh.
    rule: 'replicated' (data parallel: every device holds params, opt_state, EMA and
      batch_stats). A rule that splits large leaves over an axis (FSDP) plugs in here.

  Returns:
    A pytree of ``NamedSharding`` matching ``abstract_state``.

  Raises:
    ValueError: for an unknown rule.
  """
  if rule != 'replicated':
    raise ValueError(f"config.mesh.param_sharding must be 'replicated', got {rule!r}.")
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Places this process's rows of a batch on the mesh, as one global array per key.

  With one process this is ``jax.device_put``. With ``P`` processes each passes its local
  batch (``global batch / P`` rows); the global batch is the processes' local batches in
  process order (``jax.make_array_from_process_local_data``).
  """
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def local_rows(x: jax.Array) -> jax.Array:
  """This process's rows of a global array split over 'data' (no communication).

  The inverse of :func:`to_global` for one array: ``[global rows / P, ...]`` on this
  process's devices. With one process, ``x`` itself.
  """
  if x.is_fully_addressable:
    return x
  return multihost_utils.global_array_to_host_local_array(x, x.sharding.mesh, x.sharding.spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh, axis: int = 0) -> NamedSharding:
  """Splits dimension ``axis`` over 'data': 0 for a batch, 1 for arrays with a leading axis
  before the examples (``k`` steps of batches, an epoch's plan, SAF's table slots)."""
  return NamedSharding(mesh, P(*[None] * axis, 'data'))


def prefetch_to_device(
  batches: Iterable[dict[str, np.ndarray]], *, size: int, sharding: NamedSharding
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, jax.Array]]]:
  """Places up to ``size`` batches on device ahead of their use.

  Each host batch is pulled (and so, for SAF, its targets gathered) only when a slot
  frees, i.e. while earlier steps run asynchronously on the device.

  Yields:
    ``(host_batch, device_batch)``: this process's numpy batch (for host-side bookkeeping
    such as SAF's example ids, without a device-to-host copy) and the global batch on the
    mesh (:func:`to_global`).
  """
  queue = collections.deque()
  for batch in batches:
    queue.append((batch, to_global(batch, sharding)))
    if len(queue) >= size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()

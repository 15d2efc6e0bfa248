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
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def create_mesh(num_devices: int = -1) -> Mesh:
  """A 1-D mesh with axis 'data' over the first ``num_devices`` devices (-1 = all)."""
  devices = jax.devices()
  if num_devices != -1:
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Splits the leading (batch) dimension over 'data'."""
  return NamedSharding(mesh, P('data'))


def prefetch_to_device(
  batches: Iterable[dict[str, np.ndarray]], *, size: int, sharding: NamedSharding
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, jax.Array]]]:
  """Places up to ``size`` batches on device ahead of their use.

  Each host batch is pulled (and so, for SAF, its targets gathered) only when a slot
  frees, i.e. while earlier steps run asynchronously on the device.

  Yields:
    ``(host_batch, device_batch)``: the numpy batch (for host-side bookkeeping such as
    SAF's example ids, without a device-to-host copy) and its sharded device copy.
  """
  queue = collections.deque()
  for batch in batches:
    queue.append((batch, jax.device_put(batch, sharding)))
    if len(queue) >= size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()

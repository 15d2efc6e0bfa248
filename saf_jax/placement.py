"""Where the training set and SAF's logit table live: on the devices, or on the host.

Two fields choose, each ``'auto'`` (the default), ``'device'`` or ``'host'``:

* ``config.input.placement``: ``'device'`` keeps the uint8 training set on every device
  (``saf_jax.device_input``) and assembles each batch inside the jitted program;
  ``'host'`` is the tf.data pipeline. Streamed datasets (ImageNet) are always on the host.
* ``config.method.saf.table_placement``: ``'device'`` keeps SAF's table as ``jax.Array``\\ s
  sharded along the example axis over the mesh (``saf_jax.logit_table.device``), read and
  written inside the jitted step; ``'host'`` is ``saf_jax.logit_table.LogitTable``.

The ``'auto'`` rule: with ``M`` the memory of one device and ``f`` =
``config.mesh.device_memory_fraction``, the training set goes on the devices when its bytes
(held whole by every device) are at most ``f M``; then the table goes on the devices when
its bytes per device (``table_nbytes / devices``), plus the training set's if it is on the
devices, are at most ``f M``. The rest of the memory is the model's: params, optimizer
state, activations. A memory-mapped table (``table_memmap``) stays on the host. ``M`` is
the device's ``bytes_limit`` (GPU, TPU); for CPU devices, which share the host's RAM, the
RAM divided by the local devices. :func:`resolve` logs the rule's figures and choice.

An explicit ``'device'`` is refused before anything is compiled when its bytes per device
exceed ``M`` itself, with both sizes in the message.
"""

import dataclasses
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from saf_jax import device_input, logit_table
from saf_jax.data import base

PLACEMENTS = ('auto', 'device', 'host')


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where one run keeps its training set and SAF table.

  Attributes:
    data: ``'device'`` or ``'host'``.
    table: ``'device'`` or ``'host'`` for SAF; None for other methods.
    summary: the rule's figures and choices, as logged.
  """

  data: str
  table: str | None
  summary: str = ''


def device_memory_bytes() -> tuple[int, str]:
  """``(bytes, what they are)``: the memory of one device, the smallest over the processes.

  Every process must resolve ``'auto'`` alike (the placements change the compiled
  programs and the checkpoint), so with several processes their smallest device decides.
  """
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # Some backends do not implement it (UNIMPLEMENTED); use the RAM rule.
    stats = None
  if stats and stats.get('bytes_limit'):
    memory, what = int(stats['bytes_limit']), f'{device.device_kind} memory'
  else:
    ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    memory, what = ram // jax.local_device_count(), 'host RAM / local CPU devices'
  if jax.process_count() > 1:  # In MiB: JAX's default int32 holds no byte count of GPUs.
    mib = multihost_utils.process_allgather(np.int32(memory // 2**20))
    memory, what = int(np.min(mib)) * 2**20, what + ', smallest over the processes'
  return memory, what


def table_rows(num_train: int, num_devices: int) -> int:
  """Rows of a device table: the example ids, padded up to a multiple of the devices."""
  return -(-num_train // num_devices) * num_devices


def device_table(config: ml_collections.ConfigDict, info, num_devices: int):
  """The ``DeviceTable`` layout of ``config.method.saf`` for ``info``'s training set."""
  saf = config.method.saf
  return logit_table.DeviceTable(
    num_rows=table_rows(info.num_train, num_devices),
    num_classes=info.num_classes,
    E_tilde=saf.E_tilde,
    dtype=saf.table_dtype,
    topk=saf.table_topk,
    tau=saf.tau if saf.table_topk else None,
  )


def _gb(n: int) -> str:
  return f'{n / 1e9:.3g} GB'


def resolve(
  config: ml_collections.ConfigDict,
  info,
  *,
  num_devices: int,
  saf: bool,
  recorded_table: str | None = None,
  memory: tuple[int, str] | None = None,
) -> Placement:
  """Resolves the ``'auto'`` placements of ``config`` (module docstring), and checks the rest.

  Args:
    config: a validated config.
    info: the dataset's ``DatasetInfo`` (``num_train``, ``num_classes``, ``image_shape``).
    num_devices: devices of the mesh.
    saf: whether the run keeps a SAF table.
    recorded_table: the table placement of the workdir's checkpoint, if any: ``'auto'``
      keeps it, so that a resumed run reads the table where it was saved.
    memory: ``(bytes, description)`` of one device; ``device_memory_bytes()`` if None.

  Returns:
    The ``Placement``.

  Raises:
    ValueError: ``'device'`` for a streamed dataset, or for a set or table larger than a
      device's memory (with both sizes); a table placement other than the checkpoint's.
  """
  memory_bytes, memory_what = memory or device_memory_bytes()
  budget = int(config.mesh.device_memory_fraction * memory_bytes)
  streamed = config.input.dataset in base.STREAMED_DATASETS
  data_bytes = 0 if streamed else device_input.nbytes(info)
  wanted = config.input.placement
  if wanted == 'device' and streamed:
    raise ValueError(
      f"config.input.placement must be 'auto' or 'host' for the streamed dataset "
      f"{config.input.dataset!r} (only datasets held in memory fit the devices), got 'device'."
    )
  if wanted == 'device' and data_bytes > memory_bytes:
    raise ValueError(
      f"config.input.placement='device': the training set takes {_gb(data_bytes)} on every "
      f"device, more than the {_gb(memory_bytes)} of {memory_what}; use 'host' or 'auto'."
    )
  data = (
    wanted if wanted != 'auto' else 'device' if not streamed and data_bytes <= budget else 'host'
  )
  used = data_bytes if data == 'device' else 0
  summary = (
    f'training set {_gb(data_bytes)} per device -> {data}; budget {_gb(budget)} '
    f'({config.mesh.device_memory_fraction:g} of {_gb(memory_bytes)}, {memory_what})'
  )
  table = None
  if saf:
    per_device = device_table(config, info, num_devices).nbytes() // num_devices
    table = _resolve_table(
      config, num_devices, per_device, recorded_table, used, budget, memory_bytes
    )
    summary += f'; SAF table {_gb(per_device)} per device -> {table}'
  placement = Placement(data=data, table=table, summary=summary)
  logging.info('Placement: %s.', summary)
  return placement


def _resolve_table(config, num_devices, per_device, recorded, used, budget, memory_bytes) -> str:
  """The table's placement; ``per_device``: its bytes on each of the ``num_devices``."""
  wanted = config.method.saf.table_placement
  if recorded is not None and wanted not in ('auto', recorded):
    raise ValueError(
      f"config.method.saf.table_placement must be 'auto' or {recorded!r} to resume this "
      f'workdir (its checkpoint keeps the SAF table on the {recorded}), got {wanted!r}; or use '
      'a new --workdir.'
    )
  chosen = recorded or wanted
  if chosen == 'device' and used + per_device > memory_bytes:
    field, advice = "config.method.saf.table_placement='device'", "use 'host' or 'auto'"
    if recorded:
      field, advice = 'the checkpoint to resume', 'resume on more devices, or use a new --workdir'
    raise ValueError(
      f'{field}: the SAF table takes {_gb(per_device)} per device (over {num_devices} '
      f'devices), more than the {_gb(memory_bytes - used)} of device memory left; {advice} '
      '(a host table with table_memmap=True holds tables larger than RAM).'
    )
  if chosen != 'auto':
    return chosen
  if config.method.saf.table_memmap or used + per_device > budget:
    return 'host'
  return 'device'

r"""SAF's per-example memory of past logits.

SAF (Algorithm 1 of Du et al. 2022) records the training forward pass's own logits
for every example (line 4) and, :math:`\tilde E` epochs later, reads them back as the
target of the trajectory loss (line 5, Eq. 9). This package is that record. A table holds
the ``num_examples`` example ids ``[first_id, first_id + num_examples)``: the whole
training set (``first_id = 0``), or one process's contiguous block of it in multi-host
training. Row ``r`` of every array belongs to example id ``first_id + r``.

In epoch ``e`` example ``i`` uses slot ``e % E_tilde``: its row is *read* (the logits
written in epoch ``e - E_tilde``) before the same slot is *overwritten* with epoch ``e``'s
logits. Only :math:`\tilde E` slots are needed, not :math:`\tilde E + 1`. A row whose
``written_epoch`` is not exactly ``e - E_tilde`` (never seen, dropped by
``drop_remainder`` in that epoch, or the first epochs) is masked out of the loss: it
is never used as a zero or uniform target.

The modules:

* ``layout``: the storage layouts (full logits in float32, bfloat16 or int8 codes; top-k
  logits with the tail's log-sum-exp), their codecs and the error they bound, and
  :func:`table_nbytes`, a layout's size, and ``check_ids``, a batch's ids against a table's.
* ``host``: :class:`LogitTable`, a layout's arrays on the host (in RAM or memory-mapped),
  written in the background while training runs.
* ``device``: :class:`DeviceTable`, the same arrays as a dict of ``jax.Array`` sharded over
  the devices by row, read and written by pure JAX functions inside the jitted train step
  (the layout's codecs in float32), so the table never leaves the devices.
* ``measure``: :func:`storage_error` and :func:`topk_compression_error`, a layout's effect
  on the trajectory loss and its gradient, measured on real logits.
* ``rows``: ``RowBlocks``, a table array gathered from other processes' saved blocks of
  rows without a copy (a host table resumed on another number of processes).

Wiring::

  table = LogitTable(num_examples=60000, num_classes=10, E_tilde=3)
  for epoch in range(1, num_epochs + 1):
    for batch in batches(epoch):
      batch['target_logits'], batch['target_mask'] = table.gather(batch['index'], epoch=epoch)
      state, metrics, logits = saf_step(state, batch)     # logits: the step's own
      table.write_async(batch['index'], logits, epoch=epoch)  # no device sync here
    table.flush()

References:
  Du et al, `Sharpness-Aware Training for Free <https://arxiv.org/abs/2205.14083>`_, 2022
"""

from saf_jax.logit_table.device import DeviceTable
from saf_jax.logit_table.host import LogitTable
from saf_jax.logit_table.layout import NEVER_WRITTEN, table_nbytes
from saf_jax.logit_table.measure import storage_error, topk_compression_error

__all__ = [
  'NEVER_WRITTEN',
  'DeviceTable',
  'LogitTable',
  'storage_error',
  'table_nbytes',
  'topk_compression_error',
]

"""The inner loop: an epoch's batches, from the host or the devices, through the compiled step.

``epoch_source`` gives an epoch's batches as ``run_steps`` takes them: this process's host
batches (``config.input.placement = 'host'``), or the epoch's plan placed on the devices
(``'device'``). ``run_steps`` calls the compiled program (``saf_jax.dispatch``) once per
``config.steps_per_dispatch`` steps, with SAF's table on the host (gathered as batches are
prefetched, written back asynchronously) or on the devices (inside the program). The
training loop (``saf_jax.train``) and the benchmark (``saf_jax.tools.benchmark``) both run
their steps here, so the benchmark times exactly the loop's work.
"""

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import tqdm

from saf_jax import device_input, dispatch, experiment, logit_table, sharding, train_state

# Steps between a step's dispatch and the progress bar reading its loss: that loss is
# already computed, so reading it does not stall the device queue.
_PROGRESS_LAG_STEPS = 4


def _with_targets(
  batches: Iterator[dict[str, np.ndarray]], table: logit_table.LogitTable, epoch: int
) -> Iterator[dict[str, np.ndarray]]:
  """Adds SAF's targets to each host batch as it is pulled by the prefetcher."""
  for batch in batches:
    batch['target_logits'], batch['target_mask'] = table.gather(batch['index'], epoch=epoch)
    yield batch


def _with_checked_ids(
  batches: Iterator[dict[str, np.ndarray]], num_train: int
) -> Iterator[dict[str, np.ndarray]]:
  """Refuses, before its step, a host batch whose ids a device table cannot take."""
  for batch in batches:
    logit_table.layout.check_ids(batch['index'], 0, num_train)
    yield batch


def _stacked(batches: Iterator[dict[str, np.ndarray]], k: int) -> Iterator[dict[str, np.ndarray]]:
  """Groups host batches by ``k`` into one dict of [k, B, ...] arrays (one dispatch each)."""
  while chunk := list(itertools.islice(batches, k)):
    if len(chunk) < k:
      raise ValueError(
        f'{len(chunk)} batches left, not a multiple of config.steps_per_dispatch={k}.'
      )
    yield {key: np.stack([b[key] for b in chunk]) for key in chunk[0]}


def epoch_source(
  exp: experiment.Experiment, datasets: Any, train_set: Any, epoch: int, *, start_batch: int = 0
) -> Iterator[dict[str, np.ndarray]] | dispatch.DeviceFeed:
  """The batches of ``epoch`` from ``start_batch`` on, as ``run_steps`` takes them.

  Args:
    exp: the experiment.
    datasets: the ``Datasets``.
    train_set: the ``device_input.DeviceTrainSet`` when the data is on the devices, else None.
    epoch: the epoch, from 1.
    start_batch: global batches of the epoch already trained.

  Returns:
    This process's host batches (host placement), or a ``dispatch.DeviceFeed`` of the
    epoch's plan placed on the devices, whose ids were checked distinct within every batch.

  Raises:
    ValueError: (device placement) if a batch of the plan repeats an id or holds one
      outside the training set, before any step.
  """
  if train_set is None:
    return datasets.train_epoch(
      epoch,
      batch_size=exp.local_batch_size,
      start_batch=start_batch,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  plan = device_input.global_plan(
    datasets, epoch, batch_size=exp.config.input.batch_size, process_count=jax.process_count()
  )
  ids = np.sort(plan['index'], axis=1)
  if ids.size and (ids[:, 0].min() < 0 or ids[:, -1].max() >= exp.info.num_train):
    raise ValueError(f'Example ids of epoch {epoch} lie outside [0, {exp.info.num_train}).')
  if np.any(ids[:, 1:] == ids[:, :-1]):
    raise ValueError(f'Example ids within one batch of epoch {epoch} must be distinct.')
  host_index = plan['index']
  plan = jax.device_put(plan, sharding.data_sharded(exp.mesh, axis=1))
  return dispatch.DeviceFeed(train_set, plan, start_batch, len(ids), host_index)


def _device_calls(exp, feed, host_table, epoch, num_calls):
  """``(host ids or None, inputs)`` of each call from a device feed; a host table's targets."""
  k = exp.steps_per_dispatch
  for _ in range(num_calls):
    first = feed.next_batch
    inputs, host_batch = feed.take(k), None
    if host_table is not None:  # Algorithm 1, line 5, on the host.
      ids = feed.local_index(first, k)
      targets, mask = host_table.gather(ids.reshape(-1), epoch=epoch)
      host_batch = {'index': ids}
      placed = {
        'target_logits': targets.reshape(*ids.shape, -1),
        'target_mask': mask.reshape(ids.shape),
      }
      inputs.update(sharding.to_global(placed, exp.targets_sharding))
    yield host_batch, inputs


def run_steps(
  exp: experiment.Experiment,
  state: train_state.TrainState,
  source: Iterator[dict[str, np.ndarray]] | dispatch.DeviceFeed,
  *,
  epoch: int,
  table: logit_table.LogitTable | dispatch.TableOnDevice | None,
  num_steps: int | None = None,
  desc: str | None = None,
  stop: Callable[[int], bool] | None = None,
) -> tuple[train_state.TrainState, list[dict[str, np.ndarray]], float]:
  """Runs up to ``num_steps`` steps of epoch ``epoch``, ``exp.steps_per_dispatch`` per call.

  With host placement each batch comes from ``source`` (this process's batches); for a
  host SAF table its targets are gathered when the prefetcher pulls it (Algorithm 1,
  line 5) and the step's own logits (this process's rows) are written back
  asynchronously (line 4), the table flushed before returning. With a device feed or a
  device table, those happen inside the compiled program (``saf_jax.dispatch``), and a
  device table's arrays are replaced by the program's. The training loop and
  ``saf_jax.tools.benchmark`` both run their steps here, so the benchmark times exactly
  the loop's work.

  Args:
    exp: the experiment.
    state: the train state (donated to the first call).
    source: ``epoch_source``'s: host batches, or the epoch's ``dispatch.DeviceFeed``.
    epoch: the epoch (picks the step with or without the trajectory loss).
    table: SAF's logit table (host or device), or None.
    num_steps: at most this many steps, a multiple of ``steps_per_dispatch``; all of
      ``source`` if None.
    desc: a progress bar's label; no bar if None.
    stop: asked after each call with the number of steps taken; True ends the run early
      (a preemption request) with the steps run so far.

  Returns:
    ``(state, per-step metrics as numpy scalars, seconds)``, where the time runs from the
    first batch request until the last step's results are ready (compilation excluded).

  Raises:
    ValueError: for ``num_steps`` that is not a multiple of ``steps_per_dispatch`` or is
      more than a device feed holds, or a ``source`` of the other placement (all before
      any step); for host batches whose ids a device table cannot take (out of range,
      repeated in a batch), before their step (a device feed's ids are checked by
      ``epoch_source``).
  """
  k = exp.steps_per_dispatch
  first_step = int(jax.device_get(state.step))
  on_device = isinstance(table, dispatch.TableOnDevice)
  host_table = table if isinstance(table, logit_table.LogitTable) else None
  if isinstance(source, dispatch.DeviceFeed) != exp.data_on_device:
    raise ValueError(
      f'run_steps got {type(source).__name__} for config.input.placement resolved to '
      f"{exp.placement.data!r}: pass epoch_source's batches."
    )
  if num_steps is not None and num_steps % k:
    raise ValueError(f'num_steps={num_steps} is not a multiple of config.steps_per_dispatch={k}.')
  if isinstance(source, dispatch.DeviceFeed):
    left = source.num_batches - source.next_batch
    if num_steps is not None and num_steps > left:
      raise ValueError(f'num_steps={num_steps} is more than the {left} batches left in the epoch.')
    num_calls = (source.num_batches - source.next_batch if num_steps is None else num_steps) // k
    inputs_spec = dispatch.abstract(source.peek())
    if host_table is not None:
      spec = exp.host_inputs_spec()
      inputs_spec.update({name: spec[name] for name in ('target_logits', 'target_mask')})
    calls = _device_calls(exp, source, host_table, epoch, num_calls)
  else:
    inputs_spec = exp.host_inputs_spec()
    if num_steps is not None:
      source = itertools.islice(source, num_steps)
    if on_device:
      source = _with_checked_ids(source, exp.info.num_train)
    if host_table is not None:
      source = _with_targets(source, host_table, epoch)
    if k > 1:
      source = _stacked(source, k)
    calls = sharding.prefetch_to_device(
      source, size=exp.config.input.prefetch, sharding=exp._inputs_sharding()
    )
  fns = exp.dispatch_for(epoch, inputs_spec)  # Compiled outside the timed loop.
  epoch_arg = np.int32(epoch)
  outputs = []
  start = time.perf_counter()
  bar = None
  if desc is not None:
    bar = tqdm.tqdm(total=num_steps or exp.steps_per_epoch, desc=desc, leave=False)
  lag = -(-_PROGRESS_LAG_STEPS // k)  # Calls.
  for i, (host_batch, inputs) in enumerate(calls):
    step = first_step + i * k
    arrays = table.arrays if on_device else None
    state, arrays, step_out, logits = fns(step)(state, arrays, inputs, epoch_arg)
    if on_device:
      table.arrays = arrays
    if host_table is not None:  # Algorithm 1, line 4.
      local = sharding.local_rows(logits)
      host_table.write_async(
        host_batch['index'].reshape(-1), local.reshape(-1, local.shape[-1]), epoch=epoch
      )
    outputs.append(step_out)
    if bar is not None:
      bar.update(k)
      if (i + 1) * k % exp.config.log_every_steps < k and i >= lag:
        bar.set_postfix(loss=f'{float(np.mean(outputs[-1 - lag]["loss"])):.4f}')
    if stop is not None and stop(step + k):
      break
  if bar is not None:
    bar.close()
  if host_table is not None:
    host_table.flush()
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  return state, _per_step(jax.device_get(outputs), k), seconds


def _per_step(outputs: list[dict[str, np.ndarray]], k: int) -> list[dict[str, np.ndarray]]:
  """Each call's metrics ([k] arrays when k > 1) as one dict of scalars per step."""
  if k == 1:
    return outputs
  return [{key: v[j] for key, v in out.items()} for out in outputs for j in range(k)]

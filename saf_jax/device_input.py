"""The in-memory training set held on the devices; each batch is assembled inside the jitted step.

With ``config.input.placement = 'device'`` the uint8 train split of an in-memory dataset
(``saf_jax.data.memory``: Fashion-MNIST, CIFAR, image folders) is copied once to every device
(:func:`place`), and the train program builds each step's batch itself (:func:`make_batch`):
gather by id, zero-pad and crop, flip left-right, normalise. No pixels cross from the host per
step.

What the program is given is the epoch's plan (:func:`global_plan`): the permutation of the ids
and the per-id flip and crop-offset draws. It is computed once per epoch on the host, by the
same stateless TF ops as the host path (``InMemoryDatasets.epoch_plan``, which
``InMemoryDatasets.train_epoch`` uses too): O(num_train) small integers per epoch, not per step.
So both paths put the same ids in every batch and the same pixels in every image (cropped and
flipped by exact integer gathers of the uint8 pixels, then normalised to the same float32
values, bit for bit), and a run with device data trains like one with host data. The gather,
crop, flip and normalisation of every batch run inside the jitted program.

Example::

  train_set = device_input.place(datasets, sharding.replicated(mesh))
  plan = device_input.global_plan(
    datasets, epoch, batch_size=config.input.batch_size, process_count=jax.process_count()
  )

  @jax.jit
  def step(state, train_set, plan_batch):
    batch = device_input.make_batch(train_set, plan_batch)  # batch['image']: float32 [B, H, W, C]
    ...

  for b in range(len(plan['index'])):
    state = step(state, train_set, {key: rows[b] for key, rows in plan.items()})

Placing ``plan_batch`` with ``sharding.data_sharded(mesh)`` lets each device gather only its
own rows of the global batch.
"""

import math
from typing import TYPE_CHECKING

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from saf_jax.data import base

if TYPE_CHECKING:
  from saf_jax.data import memory


def nbytes(info: base.DatasetInfo) -> int:
  """Bytes of the device copy of the train split: uint8 images and int32 labels (per device).

  Args:
    info: the in-memory dataset's sizes (``num_train``, ``image_shape``).

  Returns:
    ``num_train * (H * W * C + 4)``, what one device holds once :func:`place` has run.
  """
  return info.num_train * (math.prod(info.image_shape) + np.dtype(np.int32).itemsize)


@flax.struct.dataclass
class DeviceTrainSet:
  """The train split on the devices, and the constants :func:`make_batch` needs.

  Attributes:
    images: uint8 [num_train, H, W, C], indexed by example id (a pytree leaf).
    labels: int32 [num_train] (a pytree leaf).
    mean: per-channel pixel mean, in [0, 1] units, length C (static).
    std: per-channel pixel standard deviation, in [0, 1] units, length C (static).
    padding: zero pixels added on each side before cropping; 0 (no crop) unless the dataset's
      augment is ``'crop_flip'`` (static).
  """

  images: jax.Array
  labels: jax.Array
  mean: tuple[float, ...] = flax.struct.field(pytree_node=False)
  std: tuple[float, ...] = flax.struct.field(pytree_node=False)
  padding: int = flax.struct.field(pytree_node=False)


def place(datasets: 'memory.InMemoryDatasets', sharding: NamedSharding) -> DeviceTrainSet:
  """Puts the whole train split of ``datasets`` on the devices, replicated.

  With several processes every process holds the whole split (so that it can build any
  process's rows of a global batch); each passes the same arrays, read from its own copy of the
  dataset.

  Args:
    datasets: in-memory datasets (``saf_jax.data.memory.InMemoryDatasets``).
    sharding: a fully replicated sharding, e.g. ``saf_jax.sharding.replicated(mesh)``.

  Returns:
    The :class:`DeviceTrainSet`, :func:`nbytes` per device.

  Raises:
    ValueError: if ``sharding`` is not fully replicated, or ``datasets`` is not held in memory
      (a streamed dataset has no ``epoch_plan``).
  """
  if not sharding.is_fully_replicated:
    raise ValueError(f'The train set on the devices must be replicated, got {sharding}.')
  if not hasattr(datasets, 'epoch_plan'):
    raise ValueError(
      f'{type(datasets).__name__} is not held in memory: only in-memory datasets '
      '(Fashion-MNIST, CIFAR, image folders) can be placed on the devices.'
    )
  images, labels = datasets.train_arrays()
  return DeviceTrainSet(
    images=_replicate(images, sharding),
    labels=_replicate(labels, sharding),
    mean=tuple(datasets.mean),
    std=tuple(datasets.std),
    padding=datasets.crop_padding if datasets.augment == 'crop_flip' else 0,
  )


def _replicate(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """``x`` on every device of ``sharding``; with several processes, each gives its own copy."""
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def global_plan(
  datasets: 'memory.InMemoryDatasets',
  epoch: int,
  *,
  batch_size: int,
  process_count: int,
  start_batch: int = 0,
) -> dict[str, np.ndarray]:
  """The plan of an epoch's global batches, as the host path forms them.

  Global batch ``b`` is the local batches ``b`` of processes ``0 .. P-1`` concatenated in
  process order, each from ``datasets.epoch_plan(epoch, batch_size=batch_size // P,
  start_batch=start_batch, process_index=p, process_count=P)``: the rows
  ``saf_jax.sharding.to_global`` makes of each process's ``train_epoch`` batch. Any process
  can compute it (the draws are stateless); it costs ``P`` host plans.

  Args:
    datasets: in-memory datasets (``saf_jax.data.memory.InMemoryDatasets``).
    epoch: epoch number, counting from 1.
    batch_size: examples per global batch, a multiple of ``process_count``.
    process_count: processes ``P`` of the run, >= 1.
    start_batch: batches of the epoch to skip (already trained before a resume).

  Returns:
    With ``n = (num_train // P) // (batch_size // P) - start_batch`` batches: ``'index'``
    int32 [n, batch_size], the example ids; ``'flip'`` bool [n, batch_size]; ``'offset'``
    int32 [n, batch_size, 2], crop top-left (row, column) in the padded image, in
    ``[0, 2 * padding]`` (see ``InMemoryDatasets.epoch_plan``).

  Raises:
    ValueError: if ``process_count < 1`` or ``batch_size`` is not a positive multiple of it,
      or for arguments ``epoch_plan`` refuses.
  """
  if process_count < 1 or batch_size < 1 or batch_size % process_count:
    raise ValueError(
      f'batch_size must be a positive multiple of process_count >= 1, got batch_size='
      f'{batch_size} and process_count={process_count}.'
    )
  plans = [
    datasets.epoch_plan(
      epoch,
      batch_size=batch_size // process_count,
      start_batch=start_batch,
      process_index=p,
      process_count=process_count,
    )
    for p in range(process_count)
  ]
  return {key: np.concatenate([plan[key] for plan in plans], axis=1) for key in plans[0]}


def make_batch(train_set: DeviceTrainSet, plan_batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Assembles one train batch from the devices' train set (pure jnp; call it inside jit).

  Each image is the crop at ``offset`` of the example zero-padded by ``train_set.padding``
  pixels per side, mirrored left-right if ``flip``: one exact integer gather of the uint8
  pixels (as ``saf_jax.data.memory``'s crop and flip), then ``(x / 255 - mean) / std`` per
  channel in float32, rounded as its normalisation (looked up in a [256, C] table computed
  at trace time), so the image equals the host path's bit for bit.

  Args:
    train_set: the train split on the devices (:func:`place`).
    plan_batch: one batch of a plan (:func:`global_plan`, or ``epoch_plan``): ``'index'`` int32
      [B], example ids in ``[0, num_train)``; ``'flip'`` bool [B]; ``'offset'`` int32 [B, 2],
      crop top-left (row, column) in the padded image, each in ``[0, 2 * padding]``.

  Returns:
    ``'image'`` float32 [B, H, W, C], normalised; ``'label'`` int32 [B]; ``'index'`` int32 [B],
    the ids. Ids and offsets are not checked: out of range, they give wrong pixels.
  """
  index = jnp.asarray(plan_batch['index'])
  offset = jnp.asarray(plan_batch['offset'])
  _, height, width, channels = train_set.images.shape
  pad = train_set.padding
  # Pixel (i, j) of the crop is pixel (dy + i - pad, dx + j' - pad) of the stored image, with
  # j' = W - 1 - j when flipped: outside the image it is the zero border.
  rows = offset[:, :1] + jnp.arange(height) - pad  # [B, H]
  columns = jnp.where(
    jnp.asarray(plan_batch['flip'])[:, None], jnp.arange(width - 1, -1, -1), jnp.arange(width)
  )
  columns = columns + offset[:, 1:] - pad  # [B, W]
  rows, columns = rows[:, :, None], columns[:, None, :]
  pixels = train_set.images[
    index[:, None, None], jnp.clip(rows, 0, height - 1), jnp.clip(columns, 0, width - 1)
  ]  # uint8 [B, H, W, C]
  if pad:
    inside = (rows >= 0) & (rows < height) & (columns >= 0) & (columns < width)  # [B, H, W]
    pixels = jnp.where(inside[..., None], pixels, jnp.zeros((), pixels.dtype))
  # The normalised value of each (uint8 value, channel), looked up: XLA would round the
  # divisions differently (it multiplies by reciprocals) and lose bit equality.
  table = np.broadcast_to(_normalisation_table(train_set.mean, train_set.std), (256, channels))
  flat = pixels.astype(jnp.int32) * channels + jnp.arange(channels)  # [B, H, W, C]
  return {
    'image': jnp.asarray(table.reshape(-1))[flat],
    'label': train_set.labels[index],
    'index': index,
  }


def _normalisation_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
  """float32 [256, C]: ``(x / 255 - mean) / std`` for every uint8 ``x`` and channel.

  Computed with numpy's IEEE float32 operations in the order of the host path's TF
  normalisation (``saf_jax.data.memory``), so each value is rounded the same way.
  """
  x = np.arange(256, dtype=np.float32)[:, None]
  return (x / np.float32(255.0) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)

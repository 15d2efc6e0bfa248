"""One config's static half, built once: mesh, model, optimizer, shardings, compiled steps.

``create`` derives from a validated config and the dataset's metadata a frozen
``Experiment``. The training loop (``saf_jax.train``), the benchmark and the analysis tools
all read it; none of them changes it. Nothing here loads data or touches a workdir.
"""

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import PartitionSpec as P

from saf_jax import (
  dispatch,
  logit_table,
  methods,
  models,
  optimizers,
  placement,
  sharding,
  train_state,
  train_steps,
)
from saf_jax.data import partition


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything static that one config derives.

  Attributes:
    config: the run's config.
    method: ``config.method.name``, parsed (``methods.Method``).
    info: the dataset's metadata (``num_train``, ``num_classes``, ``image_shape``, ...).
    model: the Flax module.
    tx: the run's optimizer (``optimizers.create_optimizer``).
    steps_per_epoch: global batches per epoch: each of the ``P`` processes reads
      ``num_train // P`` examples (``partition.process_partition``) in local batches of
      ``batch_size / P``, dropping the remainder.
    mesh: the device mesh, one axis 'data'.
    abstract_state: ``jax.ShapeDtypeStruct`` tree of the ``TrainState``, with shardings.
    placement: where the training set and SAF's table live (``saf_jax.placement``).
  """

  config: ml_collections.ConfigDict
  method: methods.Method
  info: Any
  model: Any
  tx: optax.GradientTransformation
  steps_per_epoch: int
  mesh: jax.sharding.Mesh
  abstract_state: Any
  placement: placement.Placement
  # Compiled programs, keyed by (trajectory active, LookSAM program) for the single steps
  # of compiled_step and ('dispatch', active, LookSAM program) for compiled_dispatch:
  # built on first use, since a run needs only some of them (a resumed run past E_start,
  # the analysis tools none).
  _compiled: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  @property
  def per_device(self) -> bool:
    """Whether the SAM-family perturbation is per device (``jax.shard_map``)."""
    per_device = self.config.method.perturbation_scope == 'per_device'
    return self.method.perturbation is not None and per_device

  @property
  def replicated_sharding(self) -> jax.sharding.NamedSharding:
    return sharding.replicated(self.mesh)

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    """Arrays whose leading (example) axis is split over the mesh's 'data' axis."""
    return sharding.data_sharded(self.mesh)

  @property
  def state_shardings(self) -> Any:
    """The train state's shardings (``config.mesh.param_sharding``; replicated)."""
    return jax.tree.map(lambda x: x.sharding, self.abstract_state)

  @property
  def table_sharding(self) -> jax.sharding.NamedSharding:
    """A device table's arrays [E_tilde, rows, ...]: rows split over 'data'."""
    return sharding.data_sharded(self.mesh, axis=1)

  @property
  def steps_per_dispatch(self) -> int:
    """``config.steps_per_dispatch``: train steps per call of the compiled program."""
    return self.config.steps_per_dispatch

  @property
  def data_on_device(self) -> bool:
    return self.placement.data == 'device'

  @property
  def local_batch_size(self) -> int:
    """Examples per step that this process reads: the global batch over processes."""
    return self.config.input.batch_size // jax.process_count()

  @property
  def model_ema_decay(self) -> float:
    """``config.eval.ema_decay``: the evaluation-only model EMA's decay; 0 = off."""
    return self.config.eval.ema_decay

  def trajectory_active(self, epoch: int) -> bool:
    """Algorithm 1, line 10: the trajectory loss is added in epochs ``> E_start``."""
    trajectory = self.method.trajectory
    return trajectory is not None and epoch > self.config.method[trajectory].E_start

  def init_state(self) -> train_state.TrainState:
    """The initial state, created already sharded on the mesh (never on one device first)."""
    init = _state_init_fn(self.config, self.model, self.tx, self.info, self.method)
    return jax.jit(init, out_shardings=self.state_shardings)(_init_rng(self.config))

  def new_table(
    self, workdir: str | None = None
  ) -> logit_table.LogitTable | dispatch.TableOnDevice | None:
    """An empty SAF logit table (None for other methods), where ``placement.table`` says.

    On the devices (``dispatch.TableOnDevice``) it holds every example's rows, split over
    the mesh. On the host (``LogitTable``) it holds the rows of this process's partition
    of the training set (``partition.process_partition``): exactly the examples this
    process reads every epoch.

    Args:
      workdir: where a memory-mapped table (``config.method.saf.table_memmap``) keeps its
        files, under ``saf_table/process_<p>``; unused otherwise.

    Raises:
      ValueError: if ``config.method.saf.table_topk`` is not 0 or in [1, num_classes).
    """
    if not self.method.saf:
      return None
    if self.placement.table == 'device':
      return dispatch.TableOnDevice(self._device_table(), self.table_sharding)
    num_ids, kwargs = self._table_layout()
    memmap_dir = None
    if self.config.method.saf.table_memmap:
      memmap_dir = os.path.join(workdir, 'saf_table', f'process_{jax.process_index()}')
    return logit_table.LogitTable(num_ids, self.info.num_classes, **kwargs, memmap_dir=memmap_dir)

  def check_table(self) -> None:
    """Raises ``ValueError`` where ``new_table`` would (``table_topk``), creating nothing."""
    if self.method.saf and self.placement.table == 'device':
      self._device_table()
    elif self.method.saf:
      num_ids, kwargs = self._table_layout()
      layout = logit_table.layout
      layout.check_layout(
        num_ids, self.info.num_classes, kwargs['E_tilde'], kwargs['dtype'], kwargs['topk']
      )

  def _device_table(self) -> logit_table.DeviceTable:
    return placement.device_table(self.config, self.info, self.mesh.size)

  def _table_layout(self) -> tuple[int, dict[str, Any]]:
    """This process's number of table rows, and the table's other arguments."""
    saf = self.config.method.saf
    first_id, num_ids = partition.process_partition(
      self.info.num_train, jax.process_index(), jax.process_count()
    )
    kwargs = {
      'E_tilde': saf.E_tilde,
      'dtype': saf.table_dtype,
      'first_id': first_id,
      'topk': saf.table_topk,
      'tau': saf.tau,
    }
    return num_ids, kwargs

  def _batch_spec(self, targets: bool = True) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch a train step takes: shapes, dtypes and shardings (SAF: with
    ``target_logits`` and ``target_mask`` if ``targets``)."""
    batch_size, split = self.config.input.batch_size, self.batch_sharding
    vec = functools.partial(jax.ShapeDtypeStruct, (batch_size,), sharding=split)
    image_shape = (batch_size, *self.info.image_shape)
    spec = {
      'image': jax.ShapeDtypeStruct(image_shape, jnp.float32, sharding=split),
      'label': vec(jnp.int32),
      'index': vec(jnp.int32),
    }
    if self.method.saf and targets:
      logits_shape = (batch_size, self.info.num_classes)
      spec['target_logits'] = jax.ShapeDtypeStruct(logits_shape, jnp.float32, sharding=split)
      spec['target_mask'] = vec(jnp.float32)
    return spec

  def compiled_step(self, active: bool, sam_step: bool | None = None) -> Callable:
    """The train step for epochs with (``active``) or without the trajectory loss.

    Compiled ahead of time with explicit shardings (state by ``state_shardings``, batch
    split over 'data') and the old state donated. For LookSAM, ``sam_step`` picks the full
    SAM step (True) or the reuse step (False): two programs chosen on the host by step
    number (see ``transforms.looksam``).

    Returns:
      ``step(state, batch) -> (state, metrics, logits)`` (``train_steps.make_train_step``).
    """
    key = (active, sam_step)
    if key not in self._compiled:
      jitted = jax.jit(
        self._step_fn(active, sam_step),
        in_shardings=(self.state_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, self.replicated_sharding, self.batch_sharding),
        donate_argnums=0,
      )
      self._compiled[key] = jitted.lower(self.abstract_state, self._batch_spec()).compile()
    return self._compiled[key]

  def _step_fn(self, active: bool, sam_step: bool | None) -> Callable:
    hparams = {}
    if self.method.trajectory is not None:
      hp = self.config.method[self.method.trajectory]
      hparams = {'lam': hp.lam, 'tau': hp.tau}
      if self.method.mesa:
        hparams['ema_decay'] = hp.ema_decay
    step = train_steps.make_train_step(
      model=self.model,
      tx=self.tx,
      method=self.method,
      trajectory_active=active,
      batch_axis_name='data' if self.per_device else None,
      sam_step=sam_step,
      label_smoothing=self.config.label_smoothing,
      model_ema_decay=self.model_ema_decay,
      accum_steps=self.config.input.accum_steps,
      accum_scope=self.config.method.accum_scope,
      **hparams,
    )
    if self.per_device:
      # Each device perturbs with its own shard's gradient (m-sharpness); the step
      # averages the final gradient, batch_stats and metrics over 'data'. With
      # input.accum_steps > 1 each device accumulates over its own rows' micro-batches.
      step = jax.shard_map(
        step, mesh=self.mesh, in_specs=(P(), P('data')), out_specs=(P(), P(), P('data'))
      )
    return step

  @property
  def targets_sharding(self) -> jax.sharding.NamedSharding:
    """Per-step arrays of one call, [B, ...] or [k, B, ...]: the batch rows over 'data'."""
    if self.steps_per_dispatch == 1:
      return self.batch_sharding
    return sharding.data_sharded(self.mesh, axis=1)

  def _inputs_sharding(self) -> Any:
    """The sharding (a pytree prefix) of a dispatch's ``inputs``."""
    if not self.data_on_device:
      return self.targets_sharding
    plan = sharding.data_sharded(self.mesh, axis=1)
    replicated = self.replicated_sharding
    spec = {'train_set': replicated, 'plan': plan, 'first': replicated}
    if self.method.saf and self.placement.table == 'host':
      spec.update(target_logits=self.targets_sharding, target_mask=self.targets_sharding)
    return spec

  def host_inputs_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The placed host batches of one dispatch: ``_batch_spec``, stacked [k] if k > 1."""
    spec, k = self._batch_spec(targets=self.placement.table == 'host'), self.steps_per_dispatch
    if k == 1:
      return spec
    return {
      name: jax.ShapeDtypeStruct((k, *x.shape), x.dtype, sharding=self.targets_sharding)
      for name, x in spec.items()
    }

  def compiled_dispatch(self, active: bool, sam_step: bool | None, inputs: Any) -> Callable:
    """The program of ``steps_per_dispatch`` steps (``dispatch.make_dispatch``), compiled.

    Args:
      active: whether the trajectory loss is on (``trajectory_active``).
      sam_step: LookSAM with one step per call: True for its SAM step, False for a reuse
        step; ``'pattern'`` for a call of whole periods of its ``k`` steps (SAM, then
        ``k - 1`` reuse steps); None otherwise (LookSAM then decides in the graph).
      inputs: the abstract inputs of one call (``dispatch.abstract``), for device placement
        (``host_inputs_spec()`` otherwise).

    Returns:
      ``f(state, table_arrays, inputs, epoch) -> (state, table_arrays, metrics, logits)``,
      the state and table donated.
    """
    key = ('dispatch', active, sam_step)
    if key in self._compiled:
      return self._compiled[key]
    device_table = self.method.saf and self.placement.table == 'device'
    layout = self._device_table() if device_table else None
    step = self._step_fn(active, sam_step)
    if sam_step == 'pattern':  # LookSAM's SAM step, then its k - 1 reuse steps.
      step = tuple(self._step_fn(active, j == 0) for j in range(self.config.method.looksam.k))
    fn = dispatch.make_dispatch(
      step,
      num_steps=self.steps_per_dispatch,
      data_on_device=self.data_on_device,
      table=layout,
    )
    table_sharding = self.table_sharding if device_table else None
    logits_sharding = None
    if self.method.saf and not device_table:  # [B, K], or [k, B, K].
      logits_sharding = self.targets_sharding
    jitted = jax.jit(
      fn,
      in_shardings=(
        self.state_shardings,
        table_sharding,
        self._inputs_sharding(),
        self.replicated_sharding,
      ),
      out_shardings=(
        self.state_shardings,
        table_sharding,
        self.replicated_sharding,
        logits_sharding,
      ),
      donate_argnums=(0, 1),
    )
    table_spec = layout.abstract(self.table_sharding) if device_table else None
    epoch = jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated_sharding)
    compiled = jitted.lower(self.abstract_state, table_spec, inputs, epoch).compile()
    self._compiled[key] = compiled
    return compiled

  def dispatch_for(self, epoch: int, inputs: Any) -> Callable[[int], Callable]:
    """``step_number -> compiled dispatch`` for ``epoch``; compiles what the epoch needs.

    LookSAM with one step per call alternates two programs by step number (its SAM step
    when ``step % k == 0``). With several steps per call it runs one program: its SAM and reuse
    steps in place when its ``k`` divides the steps per call (each call then starts at a
    multiple of ``k``), else deciding each step in the graph (``jax.lax.cond``).
    """
    active = self.trajectory_active(epoch)
    looksam_k = self.config.method.looksam.k if self.method.perturbation == 'looksam' else 1
    if looksam_k > 1 and self.steps_per_dispatch == 1:
      sam = self.compiled_dispatch(active, True, inputs)
      reuse = self.compiled_dispatch(active, False, inputs)
      return lambda step: sam if step % looksam_k == 0 else reuse
    if looksam_k > 1 and self.steps_per_dispatch % looksam_k == 0:
      # Every call starts at a multiple of k: the SAM steps sit at fixed places in it.
      fn = self.compiled_dispatch(active, 'pattern', inputs)
      return lambda step: fn
    fn = self.compiled_dispatch(active, None, inputs)
    return lambda step: fn


def _init_rng(config: ml_collections.ConfigDict) -> jax.Array:
  return jax.random.fold_in(jax.random.key(config.seed), 0)


def _state_init_fn(config, model, tx, info, method) -> Callable[[jax.Array], Any]:
  """``rng -> TrainState``: the function that ``init_state`` jits and ``create`` traces."""
  model_ema = config.eval.ema_decay > 0

  def init(rng: jax.Array) -> train_state.TrainState:
    return train_state.create_train_state(
      model, tx, rng=rng, image_shape=info.image_shape, method=method, model_ema=model_ema
    )

  return init


def _create_model(config: ml_collections.ConfigDict, num_classes: int) -> Any:
  kwargs = {k: v for k, v in config.model.items() if k != 'name'}
  # Mixed precision: the computation dtype; params, opt_state, EMA and losses stay float32.
  kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
  return models.get_model(config.model.name, num_classes=num_classes, **kwargs)


def create(
  config: ml_collections.ConfigDict,
  info: Any,
  *,
  model: Any = None,
  recorded_table: str | None = None,
) -> Experiment:
  """Derives the model, optimizer, mesh, state shapes and placements of a validated ``config``.

  Args:
    config: a validated config (``validation.validate_config``).
    info: the dataset's ``DatasetInfo``.
    model: a Flax module to use instead of ``config.model`` (tests, custom models).
    recorded_table: the SAF table placement of the checkpoint to resume, if any
      (``placement.resolve``).

  Raises:
    ValueError: if the batch size exceeds the number of training examples, if
      ``steps_per_dispatch`` does not divide the steps per epoch, or for a placement that
      ``placement.resolve`` refuses.
  """
  batch_size = config.input.batch_size
  if info.num_train < batch_size:
    raise ValueError(
      f'config.input.batch_size={batch_size} is larger than the {info.num_train} training '
      f'examples of {config.input.dataset}: use a batch size of at most {info.num_train}.'
    )
  num_processes = jax.process_count()
  steps_per_epoch = (info.num_train // num_processes) // (batch_size // num_processes)
  if steps_per_epoch % config.steps_per_dispatch:
    divisors = [d for d in range(1, min(steps_per_epoch, 64) + 1) if steps_per_epoch % d == 0]
    raise ValueError(
      f'config.steps_per_dispatch must divide the {steps_per_epoch} steps per epoch (one of '
      f'{divisors}{" ..." if steps_per_epoch > 64 else ""}), got {config.steps_per_dispatch}.'
    )
  mesh = sharding.create_mesh(config.mesh.data)
  model = model if model is not None else _create_model(config, info.num_classes)
  method = methods.parse(config.method.name)
  per_device = config.method.perturbation_scope == 'per_device'
  tx = optimizers.create_optimizer(
    config, steps_per_epoch=steps_per_epoch, batch_axis_name='data' if per_device else None
  )
  shapes = jax.eval_shape(_state_init_fn(config, model, tx, info, method), _init_rng(config))
  abstract_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    shapes,
    sharding.state_shardings(shapes, mesh, config.mesh.param_sharding),
  )
  return Experiment(
    config=config,
    method=method,
    info=info,
    model=model,
    tx=tx,
    steps_per_epoch=steps_per_epoch,
    mesh=mesh,
    abstract_state=abstract_state,
    placement=placement.resolve(
      config, info, num_devices=mesh.size, saf=method.saf, recorded_table=recorded_table
    ),
  )

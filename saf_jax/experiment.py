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

from saf_jax import logit_table, methods, models, optimizers, sharding, train_state, train_steps
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
  """

  config: ml_collections.ConfigDict
  method: methods.Method
  info: Any
  model: Any
  tx: optax.GradientTransformation
  steps_per_epoch: int
  mesh: jax.sharding.Mesh
  abstract_state: Any
  # Compiled train steps by (trajectory active, LookSAM program): built on first use, since
  # a run needs only some of them (a resumed run past E_start, the analysis tools none).
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

  def new_table(self, workdir: str | None = None) -> logit_table.LogitTable | None:
    """This process's empty SAF logit table (None for other methods).

    It holds the rows of this process's partition of the training set
    (``partition.process_partition``): exactly the examples this process reads every epoch.

    Args:
      workdir: where a memory-mapped table (``config.method.saf.table_memmap``) keeps its
        files, under ``saf_table/process_<p>``; unused otherwise.

    Raises:
      ValueError: if ``config.method.saf.table_topk`` is not 0 or in [1, num_classes).
    """
    if not self.method.saf:
      return None
    num_ids, kwargs = self._table_layout()
    memmap_dir = None
    if self.config.method.saf.table_memmap:
      memmap_dir = os.path.join(workdir, 'saf_table', f'process_{jax.process_index()}')
    return logit_table.LogitTable(num_ids, self.info.num_classes, **kwargs, memmap_dir=memmap_dir)

  def check_table(self) -> None:
    """Raises ``ValueError`` where ``new_table`` would (``table_topk``), creating nothing."""
    if self.method.saf:
      num_ids, kwargs = self._table_layout()
      layout = logit_table.layout
      layout.check_layout(
        num_ids, self.info.num_classes, kwargs['E_tilde'], kwargs['dtype'], kwargs['topk']
      )

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

  def _batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch a train step takes: shapes, dtypes and shardings."""
    batch_size, split = self.config.input.batch_size, self.batch_sharding
    vec = functools.partial(jax.ShapeDtypeStruct, (batch_size,), sharding=split)
    image_shape = (batch_size, *self.info.image_shape)
    spec = {
      'image': jax.ShapeDtypeStruct(image_shape, jnp.float32, sharding=split),
      'label': vec(jnp.int32),
      'index': vec(jnp.int32),
    }
    if self.method.saf:
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
      **hparams,
    )
    if self.per_device:
      # Each device perturbs with its own shard's gradient (m-sharpness); the step
      # averages the final gradient, batch_stats and metrics over 'data'.
      step = jax.shard_map(
        step, mesh=self.mesh, in_specs=(P(), P('data')), out_specs=(P(), P(), P('data'))
      )
    return step

  def step_for(self, epoch: int) -> Callable[[int], Callable]:
    """``step_number -> compiled step`` for ``epoch``; compiles what the epoch needs."""
    active = self.trajectory_active(epoch)
    if self.method.perturbation == 'looksam' and self.config.method.looksam.k > 1:
      k = self.config.method.looksam.k
      sam, reuse = self.compiled_step(active, True), self.compiled_step(active, False)
      return lambda step: sam if step % k == 0 else reuse
    step_fn = self.compiled_step(active)
    return lambda step: step_fn


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


def create(config: ml_collections.ConfigDict, info: Any, *, model: Any = None) -> Experiment:
  """Derives the model, optimizer, mesh and state shapes of a validated ``config``.

  Args:
    config: a validated config (``validation.validate_config``).
    info: the dataset's ``DatasetInfo``.
    model: a Flax module to use instead of ``config.model`` (tests, custom models).

  Raises:
    ValueError: if the batch size exceeds the number of training examples.
  """
  batch_size = config.input.batch_size
  if info.num_train < batch_size:
    raise ValueError(
      f'config.input.batch_size={batch_size} is larger than the {info.num_train} training '
      f'examples of {config.input.dataset}: use a batch size of at most {info.num_train}.'
    )
  num_processes = jax.process_count()
  steps_per_epoch = (info.num_train // num_processes) // (batch_size // num_processes)
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
  )

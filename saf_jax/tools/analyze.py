r"""Sharpness, Hessian, loss landscape and curves of trained runs, from their workdirs.

  python -m saf_jax.tools.analyze --workdir runs/saf
  python -m saf_jax.tools.analyze --workdir runs/sgd,runs/sam,runs/saf,runs/mesa --out_dir docs

Each tool reads the workdir's ``config.json`` and its latest checkpoint (or ``--epoch``),
and writes into ``<workdir>/analysis/``:

* ``sharpness``: ``sharpness.json``, SAM's sharpness (Eq. 3-4 of Du et al. 2022, Fig. 4b)
  on the training loop's fixed batches (``config.analysis``), so it equals the
  ``train/sam_sharpness`` logged at the checkpoint's epoch (if that epoch measured it with
  the same ``config.analysis``).
* ``hessian``: ``hessian.json``, the top eigenvalue(s) of the training-loss Hessian by
  Lanczos, with the iterations and residuals reached, and optionally Hutchinson's trace.
* ``landscape``: ``landscape.npz`` (grid, loss and top-1 accuracy, settings) and
  ``landscape.png`` (contours and 3D surface), with two filter-normalised Gaussian
  directions (Li et al. 2018; Figs. 2 and 5 of Du et al. 2022).
* ``curves``: ``curves.png``, training CE, test accuracy, trajectory loss and SAM
  sharpness per epoch from ``metrics.jsonl``.

With several workdirs, ``--out_dir`` also receives ``curves.png`` with every run overlaid
and ``landscapes.png`` with the landscapes side by side on one scale (from each workdir's
``analysis/landscape.npz``, computed now or by an earlier call).

Every loss is the cross-entropy of the eval-mode forward: BatchNorm uses the checkpoint's
running statistics, which stay frozen; the trajectory loss is not included. The Hessian and
landscape use a fixed, unaugmented subset of the training set (``--num_examples``, the same
examples for every run with the same ``--subset_seed``).
"""

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from absl import app, flags
from jax.flatten_util import ravel_pytree

from saf_jax import checkpoint, methods
from saf_jax.analysis import landscape, plots, sharpness

TOOLS = ('sharpness', 'hessian', 'landscape', 'curves')
WEIGHTS = ('params', 'ema')
# Subdirectory of a workdir that receives the outputs.
ANALYSIS_DIR = 'analysis'

FLAGS = flags.FLAGS


@dataclasses.dataclass
class Run:
  """A trained run restored from its workdir.

  Attributes:
    workdir: the run's directory.
    config: its ``config.json`` (mesh reset to all local devices).
    datasets: its ``saf_jax.data.Datasets``.
    experiment: its ``train.Experiment`` (model, mesh, shardings).
    state: the restored ``TrainState``.
    epoch: the checkpoint's epoch.
    step: the checkpoint's step.
  """

  workdir: str
  config: ml_collections.ConfigDict
  datasets: Any
  experiment: Any
  state: Any
  epoch: int
  step: int

  @property
  def method(self) -> str:
    return self.config.method.name

  def weights(self, which: str = 'params') -> tuple[Any, Any]:
    """``(params, batch_stats)``, or MESA's ``(ema_params, ema_batch_stats)`` for 'ema'.

    Raises:
      ValueError: if ``which`` is not in ``WEIGHTS`` or the run has no EMA weights.
    """
    if which not in WEIGHTS:
      raise ValueError(f'weights must be one of {list(WEIGHTS)}, got {which!r}.')
    if which == 'params':
      return self.state.params, self.state.batch_stats
    if self.state.ema_params is None:
      raise ValueError(
        f"weights='ema' needs MESA's EMA weights; the run in {self.workdir!r} trained "
        f'{self.method!r}, which has none.'
      )
    return self.state.ema_params, self.state.ema_batch_stats

  def subset(self, *, num_examples: int, batch_size: int, seed: int) -> list[dict]:
    """The fixed training subset as device batches (see ``train_subset_batches``).

    Raises:
      ValueError: if ``num_examples < batch_size`` or either exceeds the training set, or
        ``batch_size`` does not divide over the devices.
    """
    devices = self.experiment.mesh.size
    if batch_size < 1 or batch_size % devices:
      raise ValueError(
        f'batch_size must be a positive multiple of {devices} devices, got {batch_size}.'
      )
    if num_examples < batch_size:
      raise ValueError(f'num_examples must be >= batch_size={batch_size}, got {num_examples}.')
    batches = self.datasets.train_subset_batches(
      num_batches=num_examples // batch_size, batch_size=batch_size, seed=seed
    )
    data = self.experiment.data
    return [jax.device_put({k: b[k] for k in ('image', 'label')}, data) for b in batches]


def _with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with the values of fields added after older runs were trained."""
  defaults = {
    'analysis': {
      'sharpness_every_epochs': 0,
      'rho': sharpness.DEFAULT_RHO,
      'sharpness_num_batches': 8,
      'subset_seed': 0,
    },
    'mesh': {'param_sharding': 'replicated'},
    'checkpoint': {'every_steps': 0},
  }
  for section, fields in defaults.items():
    config[section] = ml_collections.ConfigDict({**fields, **config.get(section, {})})
  saf = config.method.get('saf')
  if saf is not None:
    config.method.saf = ml_collections.ConfigDict(
      {'table_topk': 0, 'table_memmap': False, **saf.to_dict()}
    )
  return config


def load_run(workdir: str, *, epoch: int | None = None, data_dir: str | None = None) -> Run:
  """Restores the checkpoint of ``workdir`` (the latest, or ``epoch``) with its config.

  Args:
    workdir: a directory written by ``main.py``.
    epoch: restore the checkpoint saved at the end of this epoch; None for the latest.
    data_dir: TFDS data_dir to read the dataset from, instead of the config's.

  Returns:
    The :class:`Run`, its state replicated over all local devices (checkpoints are not tied
    to the device count).

  Raises:
    ValueError: if ``workdir`` has no ``config.json`` or no checkpoint, ``epoch`` was not
      saved, the config is invalid, or the checkpoint does not match the config (another
      model, width or number of classes).
  """
  # Imported here: TensorFlow (the data) loads only when a run is analysed.
  from saf_jax import data, train, validation

  check_workdir(workdir, epoch=epoch)
  config = ml_collections.ConfigDict(_read_config(workdir))
  config.mesh.data = -1
  config = _with_defaults(config)
  if data_dir is not None:
    config.input.data_dir = data_dir
  try:
    validation.validate_config(config, num_devices=jax.device_count())
  except ValueError as e:
    raise ValueError(f'The config.json of {workdir!r} is invalid: {e}') from e
  # check_workdir found a checkpoint first: the manager would create the directory.
  saved = checkpoint.saved_epochs(workdir)
  epoch = max(saved) if epoch is None else epoch
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep)
  try:
    datasets = data.create_datasets(config.input, seed=config.seed)
    experiment = train.build_experiment(config, datasets.info)
    try:
      state, _, meta = ckpt.restore(saved[epoch], experiment.abstract_state, None)
    except (ValueError, TypeError, KeyError) as e:
      raise ValueError(
        f'The checkpoint of epoch {epoch} in {workdir!r} does not match its config.json '
        f'(model {config.model.to_dict()}, {datasets.info.num_classes} classes): '
        + '\n'.join(str(e).splitlines()[:3])  # Orbax appends pages of tree diff and advice.
      ) from e
  finally:
    ckpt.close()
  return Run(workdir, config, datasets, experiment, state, epoch, meta['step'])


def _suffixed(name: str, weights: str) -> str:
  stem, ext = os.path.splitext(name)
  return name if weights == 'params' else f'{stem}_{weights}{ext}'


def _output(run: Run, name: str, weights: str) -> str:
  out_dir = os.path.join(run.workdir, ANALYSIS_DIR)
  os.makedirs(out_dir, exist_ok=True)
  return os.path.join(out_dir, _suffixed(name, weights))


def _write_json(path: str, record: dict[str, Any]) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, path)


def _describe(run: Run, weights: str) -> dict[str, Any]:
  return {
    'workdir': run.workdir,
    'method': run.method,
    'epoch': run.epoch,
    'step': run.step,
    'weights': weights,
  }


def run_sharpness(
  run: Run, *, weights: str = 'params', rho: float | None = None, subset_seed: int | None = None
) -> dict[str, Any]:
  """SAM's sharpness of the checkpoint on the training loop's fixed batches.

  The batches are ``config.analysis.sharpness_num_batches`` of ``config.input.batch_size``
  examples picked by ``subset_seed`` (default ``config.analysis.subset_seed``), exactly the
  training loop's, so with the same ``rho`` the value equals ``train/sam_sharpness`` of the
  checkpoint's epoch, if that epoch measured it. Writes ``analysis/sharpness.json``.

  Returns:
    ``{'sam_sharpness', 'loss', 'grad_norm', 'rho', 'num_batches', 'batch_size',
    'subset_seed', 'seconds', ...}``.
  """
  analysis = run.config.analysis
  rho = analysis.rho if rho is None else rho
  subset_seed = analysis.subset_seed if subset_seed is None else subset_seed
  batch_size = run.config.input.batch_size
  batches = run.subset(
    num_examples=analysis.sharpness_num_batches * batch_size,
    batch_size=batch_size,
    seed=subset_seed,
  )
  params, batch_stats = run.weights(weights)
  start = time.perf_counter()
  fn = sharpness.model_sam_sharpness_fn(run.experiment.model, rho=rho)
  measured = sharpness.batch_mean(lambda batch: fn(params, batch_stats, batch), batches)
  record = _describe(run, weights) | {
    'sam_sharpness': measured['sharpness'],
    'loss': measured['loss'],
    'grad_norm': measured['grad_norm'],
    'rho': rho,
    'num_batches': len(batches),
    'batch_size': batch_size,
    'subset_seed': subset_seed,
    'seconds': time.perf_counter() - start,
  }
  _write_json(_output(run, 'sharpness.json', weights), record)
  return record


def run_hessian(
  run: Run,
  *,
  weights: str = 'params',
  num_examples: int = 1024,
  batch_size: int = 256,
  subset_seed: int | None = None,
  k: int = 1,
  max_iterations: int = 100,
  tol: float = 1e-4,
  trace_samples: int = 0,
  seed: int = 0,
) -> dict[str, Any]:
  """Top Hessian eigenvalue(s) (Lanczos) and optionally the trace (Hutchinson).

  Writes ``analysis/hessian.json``.

  Returns:
    ``{'eigenvalues': [<= k], 'residuals': [<= k], 'iterations', 'converged', 'trace',
    'trace_stderr', 'num_examples', 'seconds', ...}`` (trace fields None when
    ``trace_samples == 0``).
  """
  subset_seed = run.config.analysis.subset_seed if subset_seed is None else subset_seed
  batches = run.subset(num_examples=num_examples, batch_size=batch_size, seed=subset_seed)
  params, batch_stats = run.weights(weights)
  loss_fn = sharpness.model_loss_fn(run.experiment.model, batch_stats)
  start = time.perf_counter()
  top = sharpness.hessian_top_eigenvalues(
    loss_fn, params, batches, k=k, max_iterations=max_iterations, tol=tol, seed=seed
  )
  eigen_seconds = time.perf_counter() - start
  trace = None
  if trace_samples:
    trace = sharpness.hessian_trace(loss_fn, params, batches, num_samples=trace_samples, seed=seed)
  record = _describe(run, weights) | {
    'eigenvalues': top.eigenvalues.tolist(),
    'residuals': top.residuals.tolist(),
    'iterations': top.iterations,
    'converged': top.converged,
    'tol': tol,
    'trace': trace['trace'] if trace else None,
    'trace_stderr': trace['stderr'] if trace else None,
    'trace_samples': trace_samples,
    'num_examples': len(batches) * batch_size,
    'subset_seed': subset_seed,
    'eigen_seconds': eigen_seconds,
    'seconds': time.perf_counter() - start,
  }
  _write_json(_output(run, 'hessian.json', weights), record)
  return record


def run_landscape(
  run: Run,
  *,
  weights: str = 'params',
  grid: int = 51,
  extent: float = 1.0,
  direction_seed: int = 0,
  num_examples: int = 1024,
  batch_size: int = 256,
  subset_seed: int | None = None,
  chunk_size: int = 1,
) -> dict[str, Any]:
  """The 2D loss landscape around the checkpoint; writes ``landscape.npz`` and ``.png``.

  Returns:
    The ``.npz`` contents: ``xs``, ``ys`` float64 [grid], ``loss`` and ``accuracy`` float64
    [grid, grid] (row ``i`` is ``ys[i]``), ``cosine`` of the two directions, and ``meta``
    (a JSON string: method, epoch, subset, seeds, seconds).

  Raises:
    ValueError: if ``grid < 3`` or ``direction_seed`` is not an integer.
  """
  coords = landscape.grid_coordinates(grid, extent)
  if isinstance(direction_seed, bool) or not isinstance(direction_seed, int | np.integer):
    raise ValueError(f'direction_seed must be an integer, got {direction_seed!r}.')
  subset_seed = run.config.analysis.subset_seed if subset_seed is None else subset_seed
  batches = run.subset(num_examples=num_examples, batch_size=batch_size, seed=subset_seed)
  params, batch_stats = run.weights(weights)
  start = time.perf_counter()
  directions = landscape.random_directions(jax.random.key(direction_seed), params)
  flat = [np.asarray(ravel_pytree(d)[0], np.float64) for d in directions]
  cosine = float(flat[0] @ flat[1] / (np.linalg.norm(flat[0]) * np.linalg.norm(flat[1])))
  with tqdm.tqdm(total=grid * grid, desc='landscape grid points', leave=False) as bar:
    values = landscape.loss_surface(
      landscape.model_metrics_fn(run.experiment.model, batch_stats),
      params,
      directions,
      coords,
      coords,
      batches,
      chunk_size=chunk_size,
      progress=bar.update,
    )
  meta = _describe(run, weights) | {
    'grid': grid,
    'extent': extent,
    'direction_seed': direction_seed,
    'num_examples': len(batches) * batch_size,
    'subset_seed': subset_seed,
    'seconds': time.perf_counter() - start,
  }
  surface = {
    'xs': coords,
    'ys': coords,
    'loss': values['loss'],
    'accuracy': values['accuracy'],
    'cosine': np.float64(cosine),
    'meta': np.str_(json.dumps(meta)),
  }
  path = _output(run, 'landscape.npz', weights)
  with open(path + '.tmp', 'wb') as f:
    np.savez(f, **surface)
  os.replace(path + '.tmp', path)
  plots.plot_landscape(surface, _output(run, 'landscape.png', weights), title=_title(meta))
  return surface


def _short_title(meta: dict[str, Any]) -> str:
  weights = ' (EMA weights)' if meta['weights'] == 'ema' else ''
  name = os.path.basename(os.path.normpath(meta['workdir']))
  return f'{meta["method"]}{weights}, {name} epoch {meta["epoch"]}'


def _title(meta: dict[str, Any]) -> str:
  return (
    f'{_short_title(meta)}; {meta["num_examples"]} train examples (subset seed '
    f'{meta["subset_seed"]}), directions seed {meta["direction_seed"]}'
  )


def load_landscape(path: str) -> dict[str, Any]:
  """Reads an ``analysis/landscape.npz``; ``meta`` is decoded from JSON."""
  with np.load(path) as data:
    surface = {k: data[k] for k in data.files}
  surface['meta'] = json.loads(str(surface['meta']))
  return surface


def _labels(workdirs: Sequence[str], methods: Sequence[str]) -> list[str]:
  """Method names, with the workdir's name added where two runs share a method."""
  return [
    m if methods.count(m) == 1 else f'{m} ({os.path.basename(os.path.normpath(w))})'
    for w, m in zip(workdirs, methods, strict=True)
  ]


def _read_config(workdir: str) -> dict[str, Any]:
  """The workdir's ``config.json`` as a dict; ValueError if it has none."""
  path = checkpoint.config_path(workdir)
  if not os.path.exists(path):
    raise ValueError(f'{workdir!r} has no config.json: not a saf_jax workdir (main.py writes one).')
  with open(path) as f:
    return json.load(f)


def _method_of(workdir: str) -> str:
  return _read_config(workdir)['method']['name']


def write_curves(workdirs: Sequence[str], path: str) -> None:
  """Plots the per-epoch curves of ``workdirs`` (overlaid) into the PNG ``path``.

  Raises:
    ValueError: if a workdir has no ``config.json``.
    FileNotFoundError: if a workdir has no ``metrics.jsonl``.
  """
  labels = _labels(workdirs, [_method_of(w) for w in workdirs])
  runs = [(label, plots.read_metrics(w)) for label, w in zip(labels, workdirs, strict=True)]
  plots.plot_curves(runs, path)


def check_workdir(
  workdir: str,
  *,
  epoch: int | None = None,
  weights: str = 'params',
  num_examples: int | None = None,
) -> None:
  """Cheap checks of a workdir before any run is loaded or measured.

  Raises:
    ValueError: if ``workdir`` has no ``config.json`` or no checkpoint, ``epoch`` was not
      saved, ``weights='ema'`` and the run's method has no EMA weights, or
      ``num_examples`` exceeds the run's ``config.input.num_train_examples``.
  """
  config = _read_config(workdir)
  method = config['method']['name']
  num_train = config['input'].get('num_train_examples', -1)
  if num_examples is not None and 0 < num_train < num_examples:
    raise ValueError(
      f'--num_examples={num_examples} exceeds the {num_train} training examples of the run '
      f'in {workdir!r} (config.input.num_train_examples); pass --num_examples={num_train} or '
      'fewer.'
    )
  saved = sorted(checkpoint.saved_epochs(workdir))
  if not saved and checkpoint.saved_steps(workdir):
    raise ValueError(
      f'{workdir!r} has checkpoints only from the middle of an epoch (steps '
      f'{checkpoint.saved_steps(workdir)}); the tools read one taken at the end of an epoch: '
      'resume the run until an epoch ends.'
    )
  if not saved:
    raise ValueError(f'{workdir!r} has no checkpoint in checkpoints/: train it first.')
  if epoch is not None and epoch not in saved:
    raise ValueError(f'No checkpoint of epoch {epoch} in {workdir!r}; saved epochs: {saved}.')
  if weights == 'ema' and not methods.parse(method).mesa:
    raise ValueError(
      f"weights='ema' needs MESA's EMA weights; the run in {workdir!r} trained "
      f'{method!r}, which has none.'
    )


def _check_flags() -> None:
  """Refuses bad flag values before any data is loaded or anything compiled."""
  unknown = [t for t in FLAGS.tools if t not in TOOLS]
  if unknown or not FLAGS.tools:
    raise app.UsageError(f'--tools must be a subset of {list(TOOLS)}, got {FLAGS.tools}.')
  try:
    landscape.grid_coordinates(FLAGS.grid, FLAGS.extent)
  except ValueError as e:
    raise app.UsageError(f'{e} (--grid={FLAGS.grid}, --extent={FLAGS.extent})') from e
  if len(FLAGS.workdir) > 1 and FLAGS.out_dir is None:
    raise app.UsageError('Several --workdir values need --out_dir for the combined figures.')
  for name in ('num_examples', 'batch_size', 'hessian_k', 'hessian_iterations', 'chunk_size'):
    if getattr(FLAGS, name) < 1:
      raise app.UsageError(f'--{name} must be >= 1, got {getattr(FLAGS, name)}.')
  if FLAGS.hessian_iterations < FLAGS.hessian_k:
    raise app.UsageError(
      f'--hessian_iterations must be >= --hessian_k={FLAGS.hessian_k}, got '
      f'{FLAGS.hessian_iterations}.'
    )
  if FLAGS.num_examples < FLAGS.batch_size:
    raise app.UsageError(
      f'--num_examples must be >= --batch_size={FLAGS.batch_size}, got {FLAGS.num_examples}.'
    )
  if not FLAGS.hessian_tol > 0:
    raise app.UsageError(f'--hessian_tol must be > 0, got {FLAGS.hessian_tol}.')
  if FLAGS.trace_samples != 0 and FLAGS.trace_samples < 2:
    raise app.UsageError(f'--trace_samples must be 0 (off) or >= 2, got {FLAGS.trace_samples}.')
  if FLAGS.rho is not None and not FLAGS.rho > 0:
    raise app.UsageError(f'--rho must be > 0, got {FLAGS.rho}.')
  for workdir in FLAGS.workdir:
    if not os.path.isdir(workdir):
      raise app.UsageError(f'--workdir {workdir!r} does not exist.')
    if set(FLAGS.tools) - {'curves'}:
      # Every workdir before any work: a bad last one must not fail after hours of grids.
      needs_subset = {'hessian', 'landscape'} & set(FLAGS.tools)
      check_workdir(
        workdir,
        epoch=FLAGS.epoch,
        weights=FLAGS.weights,
        num_examples=FLAGS.num_examples if needs_subset else None,
      )
    else:
      _method_of(workdir)  # Raises without config.json.


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from saf_jax.data import tf_runtime  # TensorFlow, quietly; and a quiet console.

  tf_runtime.quiet_console()
  _check_flags()
  tools, workdirs = FLAGS.tools, FLAGS.workdir
  subset = {'subset_seed': FLAGS.subset_seed}
  data = {'num_examples': FLAGS.num_examples, 'batch_size': FLAGS.batch_size} | subset
  for workdir in workdirs:
    if set(tools) - {'curves'}:
      run = load_run(workdir, epoch=FLAGS.epoch, data_dir=FLAGS.data_dir)
      ema = ' (EMA weights)' if FLAGS.weights == 'ema' else ''
      prefix = f'{workdir}: {run.method}{ema} epoch {run.epoch}'
    if 'sharpness' in tools:
      r = run_sharpness(run, weights=FLAGS.weights, rho=FLAGS.rho, **subset)
      print(
        f'{prefix} SAM sharpness (rho={r["rho"]}) '
        f'{r["sam_sharpness"]:.5f} over {r["num_batches"]}x{r["batch_size"]} examples, '
        f'loss {r["loss"]:.4f}, {r["seconds"]:.1f} s',
        flush=True,
      )
    if 'hessian' in tools:
      r = run_hessian(
        run,
        weights=FLAGS.weights,
        k=FLAGS.hessian_k,
        max_iterations=FLAGS.hessian_iterations,
        tol=FLAGS.hessian_tol,
        trace_samples=FLAGS.trace_samples,
        seed=FLAGS.seed,
        **data,
      )
      trace = f', trace {r["trace"]:.2f} ± {r["trace_stderr"]:.2f}' if r['trace'] else ''
      print(
        f'{prefix} Hessian top eigenvalues '
        f'{[round(v, 4) for v in r["eigenvalues"]]} (residuals '
        f'{[float(f"{v:.2g}") for v in r["residuals"]]}, {r["iterations"]} Lanczos '
        f'iterations, converged={r["converged"]}){trace}, {r["num_examples"]} examples, '
        f'{r["seconds"]:.1f} s',
        flush=True,
      )
    if 'landscape' in tools:
      surface = run_landscape(
        run,
        weights=FLAGS.weights,
        grid=FLAGS.grid,
        extent=FLAGS.extent,
        direction_seed=FLAGS.direction_seed,
        chunk_size=FLAGS.chunk_size,
        **data,
      )
      meta = json.loads(str(surface['meta']))
      loss = surface['loss']
      centre = f'loss at θ {loss[FLAGS.grid // 2, FLAGS.grid // 2]:.4f}, ' if FLAGS.grid % 2 else ''
      print(
        f'{prefix} landscape {FLAGS.grid}x{FLAGS.grid} '
        f'{centre}range [{np.nanmin(loss):.4f}, {np.nanmax(loss):.4f}], direction '
        f'cosine {float(surface["cosine"]):.4f}, {meta["seconds"]:.1f} s',
        flush=True,
      )
    if 'curves' in tools:
      write_curves([workdir], os.path.join(workdir, ANALYSIS_DIR, 'curves.png'))
  if len(workdirs) > 1:
    if 'curves' in tools:
      write_curves(workdirs, os.path.join(FLAGS.out_dir, 'curves.png'))
    paths = [
      os.path.join(w, ANALYSIS_DIR, _suffixed('landscape.npz', FLAGS.weights)) for w in workdirs
    ]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
      print(f'landscapes.png not drawn: no {", ".join(missing)}.', flush=True)
    else:
      surfaces = [load_landscape(p) for p in paths]
      titles = [_short_title(s['meta']) for s in surfaces]
      plots.plot_landscapes(
        list(zip(titles, surfaces, strict=True)), os.path.join(FLAGS.out_dir, 'landscapes.png')
      )
    print(f'Combined figures in {FLAGS.out_dir}.', flush=True)


def _define_flags() -> None:
  """Defines the CLI's flags; called only when this module runs as a program.

  Importing the module for its functions (tests, notebooks, ``saf_jax.tools.compare`` in the
  same process) must not claim flag names such as ``--workdir`` that others define.
  """
  flags.DEFINE_list('workdir', None, 'Workdir(s) of trained runs, comma separated.')
  flags.DEFINE_list('tools', list(TOOLS), f'Tools to run, any of {list(TOOLS)}.')
  flags.DEFINE_string('out_dir', None, 'Where the combined figures of several workdirs go.')
  flags.DEFINE_integer('epoch', None, 'Checkpoint epoch to analyse (default: the latest).')
  flags.DEFINE_enum('weights', 'params', WEIGHTS, "'params', or MESA's 'ema' weights.")
  flags.DEFINE_string('data_dir', None, "TFDS data_dir, if not the run's config.input.data_dir.")
  flags.DEFINE_integer('num_examples', 1024, 'Training examples for the Hessian and landscape.')
  flags.DEFINE_integer('batch_size', 256, 'Batch size for the Hessian and landscape.')
  flags.DEFINE_integer('subset_seed', None, 'Seed of the example subset (default: config).')
  flags.DEFINE_float('rho', None, 'Radius of the SAM sharpness (default: config, 0.05).')
  flags.DEFINE_integer('hessian_k', 1, 'Number of top Hessian eigenvalues.')
  flags.DEFINE_integer('hessian_iterations', 100, 'Most Lanczos iterations.')
  flags.DEFINE_float('hessian_tol', 1e-4, 'Relative residual at which Lanczos stops.')
  flags.DEFINE_integer('trace_samples', 0, "Hutchinson probes for the Hessian's trace; 0 = off.")
  flags.DEFINE_integer('grid', 51, 'Landscape grid points per axis (>= 3, odd keeps the centre).')
  flags.DEFINE_float('extent', 1.0, 'Landscape coordinates span [-extent, extent].')
  flags.DEFINE_integer('direction_seed', 0, 'Seed of the two landscape directions.')
  flags.DEFINE_integer('chunk_size', 1, 'Landscape grid points per vectorised call.')
  flags.DEFINE_integer('seed', 0, 'Seed of the Lanczos start vector and Hutchinson probes.')
  flags.mark_flag_as_required('workdir')


if __name__ == '__main__':
  _define_flags()
  app.run(main)

"""Trained runs restored from their workdirs, and the measurements of them.

The library behind ``python -m saf_jax.tools.analyze``: :func:`load_run` restores a
workdir's checkpoint with its ``config.json``; :func:`run_sharpness`, :func:`run_hessian`
and :func:`run_landscape` measure it and write their results into ``<workdir>/analysis/``;
:func:`write_curves` and :func:`write_landscapes` draw one or several runs. Every loss is
the cross-entropy of the eval-mode forward (BatchNorm's running statistics, frozen),
without the trajectory loss.
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
from jax.flatten_util import ravel_pytree

from saf_jax import checkpoint, config_upgrade, guard, methods
from saf_jax.analysis import landscape, plots, sharpness

WEIGHTS = ('params', 'ema')
# Subdirectory of a workdir that receives the outputs.
ANALYSIS_DIR = 'analysis'


@dataclasses.dataclass
class Run:
  """A trained run restored from its workdir.

  Attributes:
    workdir: the run's directory.
    config: its ``config.json`` (mesh reset to all local devices).
    datasets: its ``saf_jax.data.Datasets``.
    experiment: its ``experiment.Experiment`` (model, mesh, shardings).
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
    sharding = self.experiment.batch_sharding
    return [jax.device_put({k: b[k] for k in ('image', 'label')}, sharding) for b in batches]


def load_run(workdir: str, *, epoch: int | None = None, data_dir: str | None = None) -> Run:
  """Restores the checkpoint of ``workdir`` (the latest, or ``epoch``) with its config.

  Args:
    workdir: a directory written by ``main.py``, by any saf_jax version (its config is
      upgraded, see :func:`read_config`).
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
  from saf_jax import data, experiment, validation

  check_loadable(workdir, epoch=epoch)
  config = ml_collections.ConfigDict(read_config(workdir))
  config.mesh.data = -1
  # Analysis reads host batches and no table: nothing to place on the devices.
  config.input.placement = config.method.saf.table_placement = 'host'
  if data_dir is not None:
    config.input.data_dir = data_dir
  try:
    validation.validate_config(config, num_devices=jax.device_count())
  except ValueError as e:
    raise ValueError(f'The config.json of {workdir!r} is invalid: {e}') from e
  # check_loadable found a checkpoint first: the manager would create the directory.
  saved = checkpoint.saved_epochs(workdir)
  epoch = max(saved) if epoch is None else epoch
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep)
  try:
    datasets = data.create_datasets(config.input, seed=config.seed)
    exp = experiment.create(config, datasets.info)
    try:
      state, _, meta = ckpt.restore(saved[epoch], exp.abstract_state, None)
    except (ValueError, TypeError, KeyError) as e:
      raise ValueError(
        f'The checkpoint of epoch {epoch} in {workdir!r} does not match its config.json '
        f'(model {config.model.to_dict()}, {datasets.info.num_classes} classes): '
        + '\n'.join(str(e).splitlines()[:3])  # Orbax appends pages of tree diff and advice.
      ) from e
  finally:
    ckpt.close()
  return Run(workdir, config, datasets, exp, state, epoch, meta['step'])


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
  fields = {'workdir': run.workdir, 'method': run.method, 'epoch': run.epoch, 'step': run.step}
  return fields | {'weights': weights}


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


def write_landscapes(workdirs: Sequence[str], path: str, *, weights: str = 'params') -> list[str]:
  """Draws the landscapes of ``workdirs`` side by side, on one scale, into the PNG ``path``.

  Each is read from the workdir's ``analysis/landscape.npz`` (``landscape_<weights>.npz``
  for other weights), written by :func:`run_landscape` now or earlier.

  Returns:
    The ``.npz`` paths that do not exist; nothing is drawn unless this is empty.
  """
  paths = [os.path.join(w, ANALYSIS_DIR, _suffixed('landscape.npz', weights)) for w in workdirs]
  missing = [p for p in paths if not os.path.exists(p)]
  if not missing:
    surfaces = [load_landscape(p) for p in paths]
    titles = [_short_title(s['meta']) for s in surfaces]
    plots.plot_landscapes(list(zip(titles, surfaces, strict=True)), path)
  return missing


def _labels(workdirs: Sequence[str], names: Sequence[str]) -> list[str]:
  """Method names, with the workdir's name added where two runs share a method."""
  return [
    m if names.count(m) == 1 else f'{m} ({os.path.basename(os.path.normpath(w))})'
    for w, m in zip(workdirs, names, strict=True)
  ]


def read_config(workdir: str) -> dict[str, Any]:
  """The workdir's ``config.json`` as a dict, upgraded to the current fields.

  A config written by an earlier saf_jax gets each field added since, with the value its
  run used (``config_upgrade.upgrade_config``).

  Raises:
    ValueError: if ``workdir`` has no ``config.json``.
  """
  path = guard.config_path(workdir)
  if not os.path.exists(path):
    raise ValueError(f'{workdir!r} has no config.json: not a saf_jax workdir (main.py writes one).')
  return config_upgrade.upgrade_config(guard.read_recorded(path)[0])


def write_curves(workdirs: Sequence[str], path: str) -> None:
  """Plots the per-epoch curves of ``workdirs`` (overlaid) into the PNG ``path``.

  Raises:
    ValueError: if a workdir has no ``config.json``.
    FileNotFoundError: if a workdir has no ``metrics.jsonl``.
  """
  labels = _labels(workdirs, [read_config(w)['method']['name'] for w in workdirs])
  curves = [(label, plots.read_metrics(w)) for label, w in zip(labels, workdirs, strict=True)]
  plots.plot_curves(curves, path)


def check_loadable(
  workdir: str,
  *,
  epoch: int | None = None,
  weights: str = 'params',
  num_examples: int | None = None,
) -> None:
  """Refuses a workdir that :func:`load_run` or a measurement cannot use, without loading it.

  Cheap: reads ``config.json`` and lists the checkpoints. A tool that measures several
  runs checks them all first, so that a bad last one does not fail after hours of work.

  Raises:
    ValueError: if ``workdir`` has no ``config.json`` or no checkpoint, ``epoch`` was not
      saved, ``weights='ema'`` and the run's method has no EMA weights, or
      ``num_examples`` exceeds the run's ``config.input.num_train_examples``.
  """
  config = read_config(workdir)
  method = config['method']['name']
  num_train = config['input']['num_train_examples']
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

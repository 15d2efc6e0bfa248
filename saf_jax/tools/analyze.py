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
examples for every run with the same ``--subset_seed``). The library behind this tool is
``saf_jax.analysis.runs``.
"""

import json
import os
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from saf_jax.analysis import landscape, runs

TOOLS = ('sharpness', 'hessian', 'landscape', 'curves')

FLAGS = flags.FLAGS


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
      runs.check_loadable(
        workdir,
        epoch=FLAGS.epoch,
        weights=FLAGS.weights,
        num_examples=FLAGS.num_examples if needs_subset else None,
      )
    else:
      runs.read_config(workdir)  # Raises without config.json.


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
      run = runs.load_run(workdir, epoch=FLAGS.epoch, data_dir=FLAGS.data_dir)
      ema = ' (EMA weights)' if FLAGS.weights == 'ema' else ''
      prefix = f'{workdir}: {run.method}{ema} epoch {run.epoch}'
    if 'sharpness' in tools:
      r = runs.run_sharpness(run, weights=FLAGS.weights, rho=FLAGS.rho, **subset)
      print(
        f'{prefix} SAM sharpness (rho={r["rho"]}) '
        f'{r["sam_sharpness"]:.5f} over {r["num_batches"]}x{r["batch_size"]} examples, '
        f'loss {r["loss"]:.4f}, {r["seconds"]:.1f} s',
        flush=True,
      )
    if 'hessian' in tools:
      r = runs.run_hessian(
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
      surface = runs.run_landscape(
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
      runs.write_curves([workdir], os.path.join(workdir, runs.ANALYSIS_DIR, 'curves.png'))
  if len(workdirs) > 1:
    if 'curves' in tools:
      runs.write_curves(workdirs, os.path.join(FLAGS.out_dir, 'curves.png'))
    path = os.path.join(FLAGS.out_dir, 'landscapes.png')
    missing = runs.write_landscapes(workdirs, path, weights=FLAGS.weights)
    if missing:
      print(f'landscapes.png not drawn: no {", ".join(missing)}.', flush=True)
    print(f'Combined figures in {FLAGS.out_dir}.', flush=True)


def _define_flags() -> None:
  """Defines the CLI's flags; called only when this module runs as a program.

  Importing the module (tests import every tool in one process) must not claim flag names
  such as ``--workdir`` that other tools define.
  """
  flags.DEFINE_list('workdir', None, 'Workdir(s) of trained runs, comma separated.')
  flags.DEFINE_list('tools', list(TOOLS), f'Tools to run, any of {list(TOOLS)}.')
  flags.DEFINE_string('out_dir', None, 'Where the combined figures of several workdirs go.')
  flags.DEFINE_integer('epoch', None, 'Checkpoint epoch to analyse (default: the latest).')
  flags.DEFINE_enum('weights', 'params', runs.WEIGHTS, "'params', or MESA's 'ema' weights.")
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

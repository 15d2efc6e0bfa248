"""Pictures: training curves of one or several runs, and 2D loss landscapes (matplotlib).

Figures are ``matplotlib.figure.Figure`` objects rendered straight to PNG files of a fixed
pixel size (no pyplot, no global backend or state), so the functions run on machines
without a display (CI, Colab, servers) and leave a notebook's own plotting alone. Inputs
are what the training loop and ``saf_jax.tools.analyze`` write: ``metrics.jsonl`` records and
``analysis/landscape.npz`` files.
"""

import json
import os
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

# Pixels per inch of every PNG written here.
DPI = 100
# Inches: 1200 x 800 px for curves, 1200 x 500 px per landscape, 350 x 700 px per column of
# a side-by-side landscape figure.
CURVES_SIZE = (12, 8)
LANDSCAPE_SIZE = (12, 5)
LANDSCAPES_COLUMN_SIZE = (3.5, 7)

_NUM_LEVELS = 21
# (metrics.jsonl key, panel title, y label) of the four curve panels.
_CURVE_PANELS = (
  ('train/ce_loss', 'Training loss (cross-entropy, without the trajectory loss)', 'nats'),
  ('test/accuracy', 'Test top-1 accuracy (dashed: MESA EMA weights)', 'top-1 accuracy'),
  ('train/trajectory_loss', 'Trajectory loss (SAF/MESA, epochs > E_start)', 'nats (tau^2 KL)'),
  ('train/sam_sharpness', "SAM sharpness (Eq. 3-4, Fig. 4b; rho: each run's config)", 'nats'),
)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of ``workdir/metrics.jsonl``, in file order.

  Raises:
    FileNotFoundError: if the file does not exist.
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'No metrics.jsonl in {workdir!r}: is it a saf_jax workdir?')
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:  # A line cut short by a crash.
        continue
  return records


def _series(records: list[dict[str, Any]], key: str, *, only_active: bool = False):
  points = [
    (r['epoch'], r[key])
    for r in records
    if r.get(key) is not None and (not only_active or r.get('train/trajectory_active', 1))
  ]
  return [p[0] for p in points], [p[1] for p in points]


def plot_curves(runs: Sequence[tuple[str, list[dict[str, Any]]]], path: str) -> None:
  """Four panels per epoch, every run overlaid: training CE, test accuracy, trajectory loss
  and SAM sharpness (Figs. 4a and 4b of Du et al. 2022).

  Args:
    runs: ``(label, metrics records)`` per run, e.g. ``('saf', read_metrics(workdir))``.
    path: the PNG written, 1200 x 800 px.

  Raises:
    ValueError: if ``runs`` is empty.
  """
  if not runs:
    raise ValueError('plot_curves needs at least one run.')
  fig = Figure(figsize=CURVES_SIZE, dpi=DPI)
  axes = fig.subplots(2, 2)
  colors = matplotlib.rcParams['axes.prop_cycle'].by_key()['color']
  for ax, (key, title, ylabel) in zip(axes.flat, _CURVE_PANELS, strict=True):
    drawn = False
    for i, (label, records) in enumerate(runs):
      color = colors[i % len(colors)]
      epochs, values = _series(records, key, only_active=key == 'train/trajectory_loss')
      if key == 'train/trajectory_loss' and not any(values):
        continue  # Methods without a trajectory loss log zeros.
      if epochs:
        ax.plot(epochs, values, marker='o', markersize=3, color=color, label=label)
        drawn = True
      if key == 'test/accuracy':
        epochs, values = _series(records, 'test_ema/accuracy')
        if epochs:
          ax.plot(epochs, values, linestyle='--', color=color, label=f'{label} (EMA)')
    _style_epoch_axes(ax, title, ylabel, drawn)
  fig.tight_layout()
  _save(fig, path)


def _style_epoch_axes(ax, title: str, ylabel: str, drawn: bool) -> None:
  """Title, integer epoch axis, grid, and a legend (or 'not logged' when nothing was drawn)."""
  ax.set_title(title, fontsize=10)
  ax.set_xlabel('epoch')
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  if drawn:
    ax.legend(fontsize=8)
  else:
    ax.text(0.5, 0.5, 'not logged', ha='center', va='center', transform=ax.transAxes)


def plot_comparison(runs: dict[str, Sequence[list[dict[str, Any]]]], path: str) -> None:
  """Fig. 4b of Du et al. 2022 over seeds: SAM sharpness and test top-1 per epoch, per method.

  Each method's line is the mean over its seeds at the epochs every seed logged, with a band
  of ± one sample std (none for one seed).

  Args:
    runs: method -> the metrics records of each of its seeds' runs.
    path: the PNG written, 1200 x 500 px.

  Raises:
    ValueError: if ``runs`` is empty.
  """
  if not runs:
    raise ValueError('plot_comparison needs at least one method.')
  fig = Figure(figsize=LANDSCAPE_SIZE, dpi=DPI)
  panels = (
    ('train/sam_sharpness', 'SAM sharpness (rho 0.05, fixed train batches; Fig. 4b)', 'nats'),
    ('test/accuracy', 'Test top-1 (trained weights)', 'top-1 accuracy'),
  )
  colors = matplotlib.rcParams['axes.prop_cycle'].by_key()['color']
  for ax, (key, title, ylabel) in zip(fig.subplots(1, 2), panels, strict=True):
    drawn = False
    for i, (method, seeds) in enumerate(runs.items()):
      epochs, mean, std = mean_over_seeds(seeds, key)
      if not epochs:
        continue
      color = colors[i % len(colors)]
      label = f'{method} (n={len(seeds)})'
      ax.plot(epochs, mean, marker='o', markersize=3, color=color, label=label)
      if len(seeds) > 1:
        ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
      drawn = True
    _style_epoch_axes(ax, title, ylabel, drawn)
  fig.tight_layout()
  _save(fig, path)


def mean_over_seeds(seeds: Sequence[list[dict[str, Any]]], key: str):
  """``(epochs, mean, std)`` of ``key`` over runs, at the epochs that every run logged.

  Returns:
    A list of epochs and two float64 arrays; std is the sample std (0 for one run).
  """
  series = [dict(zip(*_series(records, key), strict=True)) for records in seeds]
  epochs = sorted(set.intersection(*(set(s) for s in series))) if series else []
  values = np.asarray([[s[e] for e in epochs] for s in series], np.float64)
  if not epochs:
    return [], np.zeros(0), np.zeros(0)
  std = values.std(axis=0, ddof=1) if len(series) > 1 else np.zeros(len(epochs))
  return epochs, values.mean(axis=0), std


def plot_landscape(surface: dict[str, Any], path: str, *, title: str) -> None:
  """One loss landscape: contour lines (left) and the 3D surface (right).

  Args:
    surface: ``xs`` float [nx], ``ys`` float [ny] and ``loss`` float [ny, nx] (nats), as in
      ``analysis/landscape.npz``.
    path: the PNG written, 1200 x 500 px.
    title: the figure title (method, checkpoint, data subset).
  """
  fig = Figure(figsize=LANDSCAPE_SIZE, dpi=DPI)
  levels = _levels([surface['loss']])
  _contour(fig.add_subplot(1, 2, 1), surface, levels)
  _surface3d(fig.add_subplot(1, 2, 2, projection='3d'), surface, levels)
  fig.suptitle(f'{title}\n{_cap_note(levels)}', fontsize=10)
  fig.tight_layout()
  _save(fig, path)


def plot_landscapes(surfaces: Sequence[tuple[str, dict[str, Any]]], path: str) -> None:
  """Several loss landscapes side by side on one color and height scale (Figs. 2 and 5).

  Args:
    surfaces: ``(title, surface)`` per column; ``surface`` as in :func:`plot_landscape`.
    path: the PNG written, ``350 * len(surfaces)`` x 700 px: 3D surfaces on top, contour
      lines below.

  Raises:
    ValueError: if ``surfaces`` is empty.
  """
  if not surfaces:
    raise ValueError('plot_landscapes needs at least one surface.')
  n = len(surfaces)
  width, height = LANDSCAPES_COLUMN_SIZE
  fig = Figure(figsize=(width * n, height), dpi=DPI)
  levels = _levels([s['loss'] for _, s in surfaces])
  for i, (title, surface) in enumerate(surfaces):
    ax3d = fig.add_subplot(2, n, i + 1, projection='3d')
    _surface3d(ax3d, surface, levels, zlabel=i == 0)  # One z label: the last would be cut.
    ax3d.set_title(title, fontsize=9)
    _contour(fig.add_subplot(2, n, n + i + 1), surface, levels)
  fig.suptitle(_cap_note(levels), fontsize=9)
  fig.tight_layout()
  _save(fig, path)


def _levels(losses: Sequence[np.ndarray]) -> np.ndarray:
  """21 contour levels from the lowest loss to the 90th percentile of all the losses.

  A landscape rises steeply far from the minimum (the default CNN: 0.23 nats at the centre,
  up to 180 at the corners); linear levels up to the maximum would leave the basin, the
  part that differs between methods, without lines. So the top level is the 90th
  percentile (higher values are drawn at it: a flat cap on the 3D surface) and the levels
  are spaced geometrically when every loss is positive, dense near the minimum.
  """
  values = np.concatenate([np.ravel(z) for z in losses])
  values = values[np.isfinite(values)]  # A diverged grid point is left blank, not fatal.
  if not values.size:
    raise ValueError('Every loss of the landscape is NaN or infinite; nothing to draw.')
  low, high = float(np.min(values)), float(np.quantile(values, 0.9))
  high = high if high > low else low + 1e-6
  if low > 0:
    return np.geomspace(low, high, _NUM_LEVELS)
  return np.linspace(low, high, _NUM_LEVELS)


def _cap_note(levels: np.ndarray) -> str:
  return (
    f'eval-mode cross-entropy; {len(levels)} contour levels from {levels[0]:.3f} to '
    f'{levels[-1]:.3f} nats, {"geometric" if levels[0] > 0 else "linear"} '
    '(the top is the 90th percentile; higher values are drawn at it)'
  )


def _contour(ax, surface: dict[str, Any], levels: np.ndarray) -> None:
  xs, ys, loss = surface['xs'], surface['ys'], surface['loss']
  lines = ax.contour(xs, ys, loss, levels=levels, cmap='viridis', linewidths=0.8)
  ax.clabel(lines, lines.levels[::4], fontsize=7, fmt='%.2f')
  ax.plot([0], [0], marker='+', color='red', markersize=8)
  ax.set_xlabel('direction 1 (filter-normalised)')
  ax.set_ylabel('direction 2')
  ax.set_aspect('equal')


def _surface3d(ax, surface: dict[str, Any], levels: np.ndarray, *, zlabel: bool = True) -> None:
  xs, ys = surface['xs'], surface['ys']
  loss = np.minimum(surface['loss'], levels[-1])
  grid_x, grid_y = np.meshgrid(xs, ys)
  ax.plot_surface(
    grid_x,
    grid_y,
    loss,
    rcount=len(ys),  # Every grid point (matplotlib samples 50 per axis by default).
    ccount=len(xs),
    cmap='viridis',
    vmin=levels[0],
    vmax=levels[-1],
    linewidth=0,
  )
  ax.view_init(elev=40, azim=-60)
  ax.set_zlim(levels[0], levels[-1])
  ax.set_xlabel('dir. 1', fontsize=8)
  ax.set_ylabel('dir. 2', fontsize=8)
  if zlabel:
    ax.set_zlabel('loss (nats)', fontsize=8)
  ax.tick_params(labelsize=7)


def _save(fig, path: str) -> None:
  """Writes ``fig`` to ``path`` atomically (a partial PNG never replaces a good one)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp.png'
  try:
    fig.savefig(tmp, dpi=DPI)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)

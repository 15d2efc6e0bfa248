"""PNG figures of training curves and loss landscapes: sizes, content, atomic writes."""

import glob
import json
import os

import numpy as np
import pytest
from matplotlib import image as mpimg
from matplotlib.figure import Figure

from saf_jax.analysis import plots


def _sgd():
  """No EMA, no trajectory loss (logged as zeros, never active)."""
  return [
    {
      'epoch': e,
      'train/ce_loss': 2.0 / e,
      'train/trajectory_loss': 0.0,
      'train/trajectory_active': 0,
      'test/accuracy': 0.5 + 0.1 * e,
      'train/sam_sharpness': 0.01 * e,
    }
    for e in range(1, 5)
  ]


def _saf():
  """Trajectory loss from epoch 3 on (zeros before, while inactive)."""
  return [
    {
      'epoch': e,
      'train/ce_loss': 1.8 / e,
      'train/trajectory_loss': 0.3 / e if e >= 3 else 0.0,
      'train/trajectory_active': int(e >= 3),
      'test/accuracy': 0.55 + 0.1 * e,
      'train/sam_sharpness': 0.02 * e,
    }
    for e in range(1, 5)
  ]


def _mesa():
  """EMA test accuracy, no SAM sharpness logged."""
  return [
    {
      'epoch': e,
      'train/ce_loss': 1.7 / e,
      'train/trajectory_loss': 0.2 / e,
      'train/trajectory_active': 1,
      'test/accuracy': 0.6 + 0.05 * e,
      'test_ema/accuracy': 0.62 + 0.05 * e,
    }
    for e in range(1, 5)
  ]


def _runs():
  return [('sgd', _sgd()), ('saf', _saf()), ('mesa', _mesa())]


def _read_png(path):
  pixels = mpimg.imread(path)
  assert pixels.std() > 0, 'blank image'
  return pixels


def _no_temporaries(directory):
  return not glob.glob(os.path.join(directory, '**', '*.tmp.png'), recursive=True)


@pytest.fixture
def captured(monkeypatch):
  """The figures passed to plots._save, which still writes them."""
  figures = []
  save = plots._save

  def capture(fig, path):
    figures.append(fig)
    save(fig, path)

  monkeypatch.setattr(plots, '_save', capture)
  return figures


def test_plot_curves_png(tmp_path):
  """1200 x 800 RGBA, not blank, in a directory it creates, with no temporary left behind."""
  path = tmp_path / 'new' / 'dir' / 'curves.png'
  plots.plot_curves(_runs(), str(path))
  assert _read_png(path).shape == (800, 1200, 4)
  assert _no_temporaries(str(tmp_path))


def _lines(ax):
  return {line.get_label(): line for line in ax.get_lines()}


def test_plot_curves_content(tmp_path, captured):
  """Each panel draws what its key holds: EMA dashed, only active trajectory epochs, no zeros."""
  plots.plot_curves(_runs(), str(tmp_path / 'curves.png'))
  (fig,) = captured
  ce, accuracy, trajectory, sharp = fig.axes
  assert set(_lines(ce)) == {'sgd', 'saf', 'mesa'}
  np.testing.assert_allclose(_lines(ce)['saf'].get_ydata(), [1.8 / e for e in range(1, 5)])
  acc = _lines(accuracy)
  assert set(acc) == {'sgd', 'saf', 'mesa', 'mesa (EMA)'}
  assert acc['mesa (EMA)'].get_linestyle() == '--'
  assert acc['mesa (EMA)'].get_color() == acc['mesa'].get_color()
  np.testing.assert_allclose(acc['mesa (EMA)'].get_ydata(), [0.62 + 0.05 * e for e in range(1, 5)])
  traj = _lines(trajectory)
  assert set(traj) == {'saf', 'mesa'}  # sgd logs only zeros.
  np.testing.assert_array_equal(traj['saf'].get_xdata(), [3, 4])
  np.testing.assert_allclose(traj['saf'].get_ydata(), [0.1, 0.075])
  assert set(_lines(sharp)) == {'sgd', 'saf'}  # mesa has no train/sam_sharpness.
  assert not any(t.get_text() == 'not logged' for ax in fig.axes for t in ax.texts)


def test_plot_curves_unlogged_panels(tmp_path, captured):
  """A single run lacking sharpness and trajectory: those panels say 'not logged'."""
  plots.plot_curves(
    [('sgd', [{k: v for k, v in r.items() if k != 'train/sam_sharpness'} for r in _sgd()])],
    str(tmp_path / 'c.png'),
  )
  texts = [[t.get_text() for t in ax.texts] for ax in captured[0].axes]
  assert texts == [[], [], ['not logged'], ['not logged']]
  assert _read_png(tmp_path / 'c.png').shape == (800, 1200, 4)


def test_plot_curves_rejects_no_runs(tmp_path):
  with pytest.raises(ValueError):
    plots.plot_curves([], str(tmp_path / 'x.png'))
  assert not os.path.exists(tmp_path / 'x.png')


def test_read_metrics_round_trip_and_truncated_line(tmp_path):
  """Records in file order; a last line cut short by a crash is skipped, not an error."""
  records = _saf()
  text = ''.join(json.dumps(r) + '\n' for r in records)
  (tmp_path / 'metrics.jsonl').write_text(text + json.dumps(_saf()[0])[:25])
  assert plots.read_metrics(str(tmp_path)) == records


def test_read_metrics_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError):
    plots.read_metrics(str(tmp_path))


def _surface(nx=21, ny=15, scale=1.0):
  xs = np.linspace(-1.0, 1.0, nx)
  ys = np.linspace(-0.5, 0.5, ny)
  grid_x, grid_y = np.meshgrid(xs, ys)
  return {'xs': xs, 'ys': ys, 'loss': scale * (grid_x**2 + 3 * grid_y**2) + 0.2}


def test_plot_landscape_png(tmp_path):
  path = tmp_path / 'landscape.png'
  plots.plot_landscape(_surface(), str(path), title='saf, epoch 10')
  assert _read_png(path).shape == (500, 1200, 4)
  assert _no_temporaries(str(tmp_path))


@pytest.mark.parametrize('n', [1, 3])
def test_plot_landscapes_png(tmp_path, n):
  path = tmp_path / 'landscapes.png'
  surfaces = [(f'run {i}', _surface(scale=1.0 + i)) for i in range(n)]
  plots.plot_landscapes(surfaces, str(path))
  assert _read_png(path).shape == (700, 350 * n, 4)
  assert _no_temporaries(str(tmp_path))


def test_plot_landscapes_shared_scale(tmp_path, captured):
  """All columns share one z range: lowest loss to the 90th percentile of all losses."""
  surfaces = [('a', _surface(scale=1.0)), ('b', _surface(scale=4.0))]
  plots.plot_landscapes(surfaces, str(tmp_path / 'l.png'))
  all_losses = np.concatenate([s['loss'].ravel() for _, s in surfaces])
  expected = (all_losses.min(), np.quantile(all_losses, 0.9))
  zlims = [ax.get_zlim() for ax in captured[0].axes if hasattr(ax, 'get_zlim')]
  assert len(zlims) == 2
  for zlim in zlims:
    np.testing.assert_allclose(zlim, expected, rtol=1e-9)


def test_plot_landscapes_rejects_empty(tmp_path):
  with pytest.raises(ValueError):
    plots.plot_landscapes([], str(tmp_path / 'x.png'))


def test_flat_surface(tmp_path):
  """All losses equal (no range for contour levels) still draws both kinds of figure."""
  flat = {'xs': np.linspace(-1, 1, 5), 'ys': np.linspace(-1, 1, 5), 'loss': np.full((5, 5), 0.7)}
  plots.plot_landscape(flat, str(tmp_path / 'flat.png'), title='flat')
  plots.plot_landscapes([('flat', flat), ('flat2', flat)], str(tmp_path / 'flats.png'))
  assert _read_png(tmp_path / 'flat.png').shape == (500, 1200, 4)
  assert _read_png(tmp_path / 'flats.png').shape == (700, 700, 4)


def test_failed_save_keeps_previous_png(tmp_path, monkeypatch):
  """A crash while rendering leaves the previous file as it was (the write goes to a temporary)."""
  path = tmp_path / 'landscape.png'
  plots.plot_landscape(_surface(), str(path), title='good')
  before = path.read_bytes()

  def broken_savefig(self, fname, **kwargs):
    with open(fname, 'wb') as f:
      f.write(b'\x89PNG partial')
    raise OSError('disk full')

  monkeypatch.setattr(Figure, 'savefig', broken_savefig)
  with pytest.raises(OSError):
    plots.plot_landscape(_surface(scale=2.0), str(path), title='bad')
  assert path.read_bytes() == before


def test_nan_grid_point_is_left_blank(tmp_path):
  """One diverged (NaN) grid point must not stop the figure; all-NaN is a clear error."""
  xs = np.linspace(-1.0, 1.0, 5)
  loss = np.add.outer(xs**2, xs**2)
  loss[0, 0] = np.nan
  surface = {'xs': xs, 'ys': xs, 'loss': loss}
  path = str(tmp_path / 'nan.png')
  plots.plot_landscape(surface, path, title='nan')
  assert mpimg.imread(path).shape == (500, 1200, 4)
  with pytest.raises(ValueError, match='NaN or infinite'):
    plots.plot_landscape({**surface, 'loss': np.full((5, 5), np.nan)}, path, title='nan')

"""Filter-normalised directions, grid coordinates and loss surfaces (Li et al. 2018)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saf_jax import models
from saf_jax.analysis import landscape

pytestmark = pytest.mark.usefixtures('fast_compile')


@pytest.fixture(scope='module')
def cnn():
  """Width-4 CNN, its params, non-trivial running statistics and 2 batches of 4 images."""
  model = models.get_model('cnn', num_classes=10, width=4)
  init = jax.jit(lambda key, x: model.init(key, x, train=False))
  variables = init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)))
  rng = np.random.default_rng(0)
  batch_stats = jax.tree.map(
    lambda x: x + jnp.float32(rng.uniform(0.1, 0.5)), variables['batch_stats']
  )
  variables = {'params': variables['params'], 'batch_stats': batch_stats}
  batches = []
  for num_correct in (3, 1):  # Accuracies 3/4 and 1/4: the mean is 1/2.
    images = jnp.asarray(rng.normal(size=(4, 28, 28, 1)), jnp.float32)
    predicted = np.asarray(model.apply(variables, images, train=False)).argmax(-1)
    labels = np.where(np.arange(4) < num_correct, predicted, (predicted + 1) % 10)
    batches.append({'image': images, 'label': jnp.asarray(labels, jnp.int32)})
  return model, variables['params'], batch_stats, batches


def _filter_norms(x):
  """Norm of each slice [..., j], float64 [out]."""
  x = np.asarray(x, np.float64)
  return np.sqrt(np.sum(x.reshape(-1, x.shape[-1]) ** 2, axis=0))


def _hand_tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
    'conv': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 2, 5)) * 0.2, jnp.float32)},
    'dense': {
      'kernel': jnp.asarray(rng.normal(size=(7, 4)) * 3.0, jnp.float32),
      'bias': jnp.asarray(rng.normal(size=(4,)), jnp.float32),
    },
  }


def _assert_filter_normalised(direction, params, raw=None):
  """Every >= 2-D filter has the norm of theta's filter; 1-D leaves are exactly zero."""
  for path, d in jax.tree_util.tree_leaves_with_path(direction):
    p = _get(params, path)
    assert d.shape == p.shape and d.dtype == jnp.float32
    if p.ndim <= 1:
      assert np.all(np.asarray(d) == 0.0), path
      continue
    np.testing.assert_allclose(_filter_norms(d), _filter_norms(p), rtol=1e-5, err_msg=str(path))
    if raw is not None:  # Rescaled, not rotated: each filter is a positive multiple of the raw one.
      r, dd = np.asarray(_get(raw, path), np.float64), np.asarray(d, np.float64)
      ratio = _filter_norms(dd) / _filter_norms(r)
      np.testing.assert_allclose(dd, r * ratio, rtol=1e-5, atol=1e-7, err_msg=str(path))


def _get(tree, path):
  for entry in path:
    tree = tree[entry.key]
  return tree


def test_filter_normalize_hand_tree():
  """Conv [kh, kw, in, out] and dense [in, out] filters are slices along the last axis."""
  params = _hand_tree(0)
  raw = jax.tree.map(lambda x: 10.0 * x + 1.0, _hand_tree(1))
  out = landscape.filter_normalize(raw, params)
  _assert_filter_normalised(out, params, raw)
  # Per filter, not per leaf: the filters of theta have different norms.
  assert np.ptp(_filter_norms(params['conv']['kernel'])) > 0.1


def test_filter_normalize_cnn_params(cnn):
  _, params, _, _ = cnn
  raw = jax.tree.map(lambda x: 5.0 * jax.random.normal(jax.random.key(1), x.shape), params)
  _assert_filter_normalised(landscape.filter_normalize(raw, params), params, raw)


def test_filter_normalize_zero_filter_stays_zero():
  """A direction filter of zeros has no direction to rescale: zeros, not NaN."""
  params = _hand_tree(0)
  raw = _hand_tree(2)
  raw['dense']['kernel'] = raw['dense']['kernel'].at[:, 2].set(0.0)
  raw['conv']['kernel'] = raw['conv']['kernel'].at[..., 0].set(0.0)
  out = landscape.filter_normalize(raw, params)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))
  assert np.all(np.asarray(out['dense']['kernel'][:, 2]) == 0.0)
  assert np.all(np.asarray(out['conv']['kernel'][..., 0]) == 0.0)
  norms = _filter_norms(out['dense']['kernel'])
  np.testing.assert_allclose(
    np.delete(norms, 2), np.delete(_filter_norms(params['dense']['kernel']), 2), rtol=1e-5
  )


def test_random_directions(cnn):
  """Deterministic per key, new for a new key, num of them, each filter-normalised."""
  _, params, _, _ = cnn
  first = landscape.random_directions(jax.random.key(3), params, num=3)
  again = landscape.random_directions(jax.random.key(3), params, num=3)
  other = landscape.random_directions(jax.random.key(4), params, num=3)
  assert len(first) == 3
  for d, d_again, d_other in zip(first, again, other, strict=True):
    _assert_filter_normalised(d, params)
    jax.tree.map(np.testing.assert_array_equal, d, d_again)
    kernel = d['conv0_0']['kernel']
    assert not np.allclose(kernel, d_other['conv0_0']['kernel'])
  # The directions of one key are independent of each other.
  assert not np.allclose(first[0]['head']['kernel'], first[1]['head']['kernel'])


@pytest.mark.parametrize('size', [3, 5, 11, 101])
def test_grid_coordinates_odd(size):
  """Centre exactly 0, exactly symmetric, endpoints +-extent, evenly spaced."""
  xs = landscape.grid_coordinates(size, 0.75)
  assert xs.shape == (size,)
  assert xs[size // 2] == 0.0
  for i in range(size):
    assert xs[i] == -xs[size - 1 - i]
  np.testing.assert_allclose([xs[0], xs[-1]], [-0.75, 0.75], rtol=1e-12)
  np.testing.assert_allclose(np.diff(xs), 1.5 / (size - 1), rtol=1e-12)


def test_grid_coordinates_even_and_numpy_int():
  xs = landscape.grid_coordinates(np.int64(4))
  np.testing.assert_allclose(xs, [-1.0, -1 / 3, 1 / 3, 1.0], rtol=1e-12)


@pytest.mark.parametrize(
  'size, extent', [(2, 1.0), (1, 1.0), (3.5, 1.0), (3.0, 1.0), (True, 1.0), (5, 0.0), (5, -1.0)]
)
def test_grid_coordinates_rejects(size, extent):
  with pytest.raises(ValueError):
    landscape.grid_coordinates(size, extent)


def _pytree_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    'k': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
    'v': jnp.asarray(rng.normal(size=(6,)), jnp.float32),
  }


def _flat(tree):
  return np.concatenate([np.asarray(tree['k'], np.float64).ravel(), np.asarray(tree['v'])])


def test_loss_surface_quadratic_closed_form():
  """f(a, b) = 1/2 (a d1 + b d2)^T A (a d1 + b d2) around the centre, point-symmetric grid."""
  params = _pytree_params(0)
  d1, d2 = _pytree_params(1), _pytree_params(2)
  rng = np.random.default_rng(3)
  m = rng.normal(size=(18, 18))
  a = m @ m.T / 18 + np.eye(18)
  a32 = jnp.asarray(a, jnp.float32)
  theta = jnp.concatenate([params['k'].ravel(), params['v']])

  def loss_fn(p, batch):
    del batch
    x = jnp.concatenate([p['k'].ravel(), p['v']]) - theta
    return 0.5 * x @ a32 @ x

  xs = landscape.grid_coordinates(5, 1.0)
  grid = landscape.loss_surface(loss_fn, params, [d1, d2], xs, xs, [None])
  assert grid.shape == (5, 5) and grid.dtype == np.float64
  v1, v2 = _flat(d1), _flat(d2)
  for i, b in enumerate(xs):
    for j, alpha in enumerate(xs):
      x = alpha * v1 + b * v2
      np.testing.assert_allclose(grid[i, j], 0.5 * x @ a @ x, rtol=1e-5, atol=1e-5)
  assert grid[2, 2] == 0.0
  np.testing.assert_allclose(grid, grid[::-1, ::-1], rtol=1e-6, atol=1e-6)


def test_loss_surface_orientation():
  """Entry [i, j] is at (a, b) = (xs[j], ys[i]): a linear f tells a from b and rows from columns."""
  params = _pytree_params(0)
  d1, d2 = _pytree_params(1), _pytree_params(2)
  w = jnp.asarray(np.random.default_rng(4).normal(size=18), jnp.float32)

  def linear(p, batch):
    return jnp.concatenate([p['k'].ravel(), p['v']]) @ w + batch

  xs = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
  ys = np.array([-2.0, 0.0, 3.0])
  grid = landscape.loss_surface(linear, params, [d1, d2], xs, ys, [jnp.float32(0.0)])
  assert grid.shape == (3, 5)
  w64 = np.asarray(w, np.float64)
  g1, g2, g0 = _flat(d1) @ w64, _flat(d2) @ w64, _flat(params) @ w64
  assert abs(g1 - g2) > 0.5  # So swapping the directions would show.
  expected = g0 + xs[None, :] * g1 + ys[:, None] * g2
  np.testing.assert_allclose(grid, expected, rtol=1e-5, atol=1e-5)


def test_loss_surface_averages_over_batches_pytree_output():
  """A pytree of metrics comes back as the same pytree of [ny, nx] batch means."""
  params = _pytree_params(0)
  d1, d2 = _pytree_params(1), _pytree_params(2)

  def fn(p, batch):
    return {'s': jnp.sum(p['v']) * batch, 'c': batch}

  xs = landscape.grid_coordinates(3)
  out = landscape.loss_surface(fn, params, [d1, d2], xs, xs, [jnp.float32(1.0), jnp.float32(4.0)])
  assert set(out) == {'s', 'c'}
  np.testing.assert_allclose(out['c'], np.full((3, 3), 2.5))
  v = lambda t: np.sum(np.asarray(t['v'], np.float64))  # noqa: E731
  expected = 2.5 * (v(params) + xs[None, :] * v(d1) + xs[:, None] * v(d2))
  np.testing.assert_allclose(out['s'], expected, rtol=1e-5, atol=1e-5)


def test_loss_surface_cnn_centre_is_theta(cnn):
  """model_metrics_fn: the grid centre is the loss and accuracy at theta, mean of 2 batches."""
  model, params, batch_stats, batches = cnn
  directions = landscape.random_directions(jax.random.key(0), params)
  metrics_fn = landscape.model_metrics_fn(model, batch_stats)
  xs = landscape.grid_coordinates(3, 0.5)
  out = landscape.loss_surface(metrics_fn, params, directions, xs, xs, batches)
  variables = {'params': params, 'batch_stats': batch_stats}
  per_batch = []
  for batch in batches:
    logits = np.asarray(model.apply(variables, batch['image'], train=False), np.float64)
    labels = np.asarray(batch['label'])
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    per_batch.append((-log_p[np.arange(4), labels].mean(), np.mean(logits.argmax(-1) == labels)))
  loss, accuracy = np.mean(per_batch, axis=0)
  assert out['loss'].shape == (3, 3) and out['accuracy'].shape == (3, 3)
  np.testing.assert_allclose(out['loss'][1, 1], loss, rtol=1e-6)
  assert accuracy == 0.5
  np.testing.assert_allclose(out['accuracy'][1, 1], accuracy, atol=1e-6)
  # model_metrics_fn itself: CE and top-1 of the eval forward.
  direct = metrics_fn(params, batches[0])
  np.testing.assert_allclose(direct['loss'], per_batch[0][0], rtol=1e-5)
  assert float(direct['accuracy']) == per_batch[0][1]
  # Moving off the centre changes the loss.
  assert np.all(np.abs(np.delete(out['loss'].ravel(), 4) - loss) > 1e-6)


@pytest.mark.parametrize('chunk_size', [4, 7])
def test_loss_surface_chunk_size_does_not_change_grid(chunk_size):
  """Chunks that do not divide the 9 points (padding) give the chunk_size=1 grid."""
  params = _pytree_params(0)
  d1, d2 = _pytree_params(1), _pytree_params(2)

  def fn(p, batch):
    x = jnp.concatenate([p['k'].ravel(), p['v']])
    return {'loss': jnp.sum(jnp.sin(x) * batch), 'norm': jnp.sum(x**2)}

  xs = landscape.grid_coordinates(3)
  batches = [jnp.linspace(-1.0, 2.0, 18), jnp.linspace(0.5, 1.0, 18)]
  reference = landscape.loss_surface(fn, params, [d1, d2], xs, xs, batches, chunk_size=1)
  done = []
  got = landscape.loss_surface(
    fn, params, [d1, d2], xs, xs, batches, chunk_size=chunk_size, progress=done.append
  )
  # Progress adds up to the grid (the padded last chunk counts only its real points).
  assert sum(done) == len(xs) ** 2 and len(done) == -(-(len(xs) ** 2) // chunk_size)
  for key in reference:
    assert got[key].shape == (3, 3)
    np.testing.assert_allclose(got[key], reference[key], rtol=1e-6, atol=1e-7, err_msg=key)
  # Nine distinct values, so a point evaluated at the wrong place (e.g. padding) would show.
  assert len(np.unique(np.round(reference['norm'], 5))) == 9


def test_loss_surface_cnn_chunked(cnn):
  """The vmapped CNN (grouped convs on CPU) matches the per-point grid at chunk_size 4."""
  model, params, batch_stats, batches = cnn
  directions = landscape.random_directions(jax.random.key(1), params)
  metrics_fn = landscape.model_metrics_fn(model, batch_stats)
  xs = landscape.grid_coordinates(3, 0.3)
  one = landscape.loss_surface(metrics_fn, params, directions, xs, xs, batches[:1])
  four = landscape.loss_surface(metrics_fn, params, directions, xs, xs, batches[:1], chunk_size=4)
  np.testing.assert_allclose(four['loss'], one['loss'], rtol=1e-5)
  np.testing.assert_array_equal(four['accuracy'], one['accuracy'])


@pytest.mark.parametrize(
  'num_directions, batches, chunk_size',
  [(1, [None], 1), (3, [None], 1), (2, [], 1), (2, [None], 0)],
)
def test_loss_surface_rejects(num_directions, batches, chunk_size):
  params = _pytree_params(0)
  directions = [params] * num_directions
  xs = landscape.grid_coordinates(3)
  with pytest.raises(ValueError):
    landscape.loss_surface(
      lambda p, b: jnp.sum(p['v']), params, directions, xs, xs, batches, chunk_size=chunk_size
    )

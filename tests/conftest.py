"""Shared fixtures: a TFDS data dir holding real Fashion-MNIST, built once per session."""

import os
import shutil

import jax
import pytest

FASHION_MNIST_IDX = '/usr/share/datasets/fashion-mnist'
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def fashion_mnist_data_dir(tmp_path_factory):
  """A data dir with Fashion-MNIST prepared from Debian's IDX files (skips without them)."""
  if not os.path.isdir(FASHION_MNIST_IDX):
    pytest.skip(f'{FASHION_MNIST_IDX} missing: apt-get install -y dataset-fashion-mnist')
  cached = os.environ.get('SAF_JAX_TEST_DATA_DIR')
  if cached:  # Reuse a prepared dir across sessions (set it to skip the ~30 s conversion).
    yield cached
    return
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  yield data_dir
  shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope='module')
def fast_compile():
  """Compile speed over run speed, for modules whose programs each run only a few times.

  Use with ``pytestmark = pytest.mark.usefixtures('fast_compile')``; scoped to the module
  and restored, so other modules keep their own setting.
  """
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)

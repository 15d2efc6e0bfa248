"""saf_jax installs as a package: only saf_jax at top level, core import without TensorFlow."""

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib

import pytest

from .conftest import REPO_ROOT

# Imported by the core (transforms, losses, LogitTable) and nothing heavier.
_CHECK = """
import sys
import saf_jax
saf_jax.sam, saf_jax.trajectory_loss, saf_jax.LogitTable, saf_jax.TrainState
heavy = sorted({'tensorflow', 'tensorflow_datasets', 'matplotlib', 'orbax'} & set(sys.modules))
assert not heavy, heavy
print(saf_jax.__file__)
"""


def _copy_project(dest):
  """The files a build reads, so that building writes nothing into the repository."""
  os.makedirs(dest)
  for name in ('pyproject.toml', 'README.md', 'LICENSE'):
    shutil.copy(os.path.join(REPO_ROOT, name), dest)
  shutil.copytree(
    os.path.join(REPO_ROOT, 'saf_jax'),
    os.path.join(dest, 'saf_jax'),
    ignore=shutil.ignore_patterns('__pycache__'),
  )
  return str(dest)


def _pip(python, *args):
  cmd = [python, '-m', 'pip', 'install', '-q', '--no-deps', '--no-index', '--no-build-isolation']
  proc = subprocess.run([*cmd, *args], capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]


def _import_from(python, cwd, env=None):
  proc = subprocess.run(
    [python, '-c', _CHECK], cwd=cwd, capture_output=True, text=True, check=False, env=env
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout.strip()


def test_pyproject_declares_the_package_its_extras_and_bounds():
  with open(os.path.join(REPO_ROOT, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)
  assert project['build-system']['build-backend'] == 'setuptools.build_meta'
  meta = project['project']
  assert meta['version'] == '0.1.0'
  assert all('>=' in d for d in meta['dependencies'])
  assert {d.split('>=')[0] for d in meta['dependencies']} == {'jax', 'flax', 'optax', 'numpy'}
  assert set(meta['optional-dependencies']) == {'train', 'analysis', 'test'}
  assert project['tool']['setuptools']['packages']['find']['include'] == ['saf_jax', 'saf_jax.*']


def test_pip_install_target_holds_saf_jax_alone_and_imports_without_tensorflow(tmp_path):
  source = _copy_project(tmp_path / 'src')
  target = tmp_path / 'site'
  _pip(sys.executable, '--target', str(target), source)
  top = {n for n in os.listdir(target) if not n.endswith(('.dist-info', '.egg-info'))}
  assert top == {'saf_jax'}, top
  assert os.path.isdir(target / 'saf_jax' / 'models')  # Subpackages come along.
  env = {**os.environ, 'PYTHONPATH': str(target)}
  where = _import_from(sys.executable, str(tmp_path), env)
  assert where == str(target / 'saf_jax' / '__init__.py')


@pytest.mark.parametrize('editable', [False, True])
def test_install_into_a_fresh_venv(tmp_path, editable):
  """``pip install .`` and ``pip install -e .`` in a new venv (dependencies from this one)."""
  source = _copy_project(tmp_path / 'src')
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  purelib = subprocess.run(
    [python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  # jax, flax, optax, numpy: this environment's, without the network.
  with open(os.path.join(purelib, 'outer.pth'), 'w') as f:
    f.write(sysconfig.get_paths()['purelib'] + '\n')
  _pip(python, *(['-e', source] if editable else [source]))
  where = _import_from(python, str(tmp_path))
  if editable:
    assert where == os.path.join(source, 'saf_jax', '__init__.py')
  else:
    assert where.startswith(purelib)

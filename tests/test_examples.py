"""The README's "Use it in your own loop" snippets, as examples/*.py, run as they stand."""

import os
import re
import subprocess
import sys

import pytest

from .conftest import REPO_ROOT

EXAMPLES = ('sam_any_optimizer.py', 'mesa_ema_teacher.py', 'saf_logit_table.py')


@pytest.mark.parametrize('name', EXAMPLES)
def test_example_runs_and_its_checks_pass(name, tmp_path):
  # From another directory, as a user would run a copy of it (saf_jax from this checkout).
  env = {**os.environ, 'PYTHONPATH': REPO_ROOT}
  path = os.path.join(REPO_ROOT, 'examples', name)
  proc = subprocess.run(
    [sys.executable, path], cwd=tmp_path, capture_output=True, text=True, env=env, check=False
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip()


@pytest.mark.parametrize('name', EXAMPLES)
def test_readme_holds_each_example_verbatim(name):
  with open(os.path.join(REPO_ROOT, 'README.md')) as f:
    readme = f.read()
  with open(os.path.join(REPO_ROOT, 'examples', name)) as f:
    code = f.read()
  body = code.split('"""', 2)[2].strip()  # Without the module docstring.
  blocks = re.findall(r'```python\n(.*?)```', readme, flags=re.S)
  assert any(body in block for block in blocks), f'README lacks examples/{name}'

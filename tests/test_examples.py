"""The README's "Use it in your own loop" snippets, as examples/*.py, run as they stand."""

import os
import re
import subprocess
import sys

import pytest

from .conftest import REPO_ROOT

EXAMPLES = ('sam_any_optimizer.py', 'mesa_ema_teacher.py', 'saf_logit_table.py')


@pytest.mark.parametrize('name', EXAMPLES)
def test_example_runs_as_its_docstring_says_and_its_checks_pass(name):
  """The documented command, from the repository root, with saf_jax not installed."""
  with open(os.path.join(REPO_ROOT, 'examples', name)) as f:
    command = re.search(
      r'^\s*(python -m examples\.\w+)  # from the repository root$', f.read(), re.M
    )
  assert command, f'examples/{name} does not say how to run it'
  assert command.group(1) == f'python -m examples.{name[: -len(".py")]}'
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  args = [sys.executable, *command.group(1).split()[1:]]
  proc = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, env=env, check=False)
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

"""The package's shape: short modules, no import cycle, tools apart, moved tools say where."""

import ast
import os
import subprocess
import sys

import pytest

from tests import conftest

PACKAGE = os.path.join(conftest.REPO_ROOT, 'saf_jax')
TOOLS = ('analyze', 'benchmark', 'compare', 'table_report', 'prepare_data')
MAX_MODULE_LINES = 450  # A module longer than this is split by what its parts do.


def _module_name(path: str) -> str:
  relative = os.path.relpath(path, conftest.REPO_ROOT)[: -len('.py')].split(os.sep)
  return '.'.join(relative[:-1] if relative[-1] == '__init__' else relative)


def _top_level_names(tree: ast.Module) -> set[str]:
  """The names a module defines or imports outside functions (in with/try/if blocks too)."""
  names, body = set(), list(tree.body)
  while body:
    node = body.pop()
    if isinstance(node, ast.With | ast.If | ast.Try):
      body += node.body + getattr(node, 'orelse', []) + getattr(node, 'finalbody', [])
      body += [stmt for handler in getattr(node, 'handlers', []) for stmt in handler.body]
    if isinstance(node, ast.FunctionDef | ast.ClassDef):
      names.add(node.name)
    elif isinstance(node, ast.Assign | ast.AnnAssign):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      names |= {t.id for t in targets if isinstance(t, ast.Name)}
    elif isinstance(node, ast.Import | ast.ImportFrom):
      names |= {(a.asname or a.name).split('.')[0] for a in node.names}
  return names


def _imports(unresolved: list[str] | None = None) -> dict[str, set[str]]:
  """{module: the saf_jax modules it imports anywhere in its code (lazy imports too)}.

  An import of a saf_jax name that is neither a module nor defined in its module is
  appended to ``unresolved`` as ``'importer: target'``.
  """
  paths = [
    os.path.join(root, name)
    for root, _, names in os.walk(PACKAGE)
    for name in names
    if name.endswith('.py')
  ]
  modules = {_module_name(p): p for p in paths}
  trees = {}
  for module, path in modules.items():
    with open(path) as f:
      trees[module] = ast.parse(f.read())
  graph = {}
  for module, path in modules.items():
    tree = trees[module]
    package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
    targets = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:  # Relative: from . import x.
          base = '.'.join(package.split('.')[: len(package.split('.')) - node.level + 1] + [base])
        for alias in node.names:
          full = f'{base}.{alias.name}'.strip('.')
          targets.add(full if full in modules else base)
          known = full in modules or (
            base in modules and alias.name in _top_level_names(trees[base])
          )
          if base.split('.')[0] == 'saf_jax' and not known and unresolved is not None:
            unresolved.append(f'{module}: {full}')
    # A module, not its package: importing saf_jax.data.x runs saf_jax.data too (kept).
    graph[module] = {t for t in targets if t in modules and t != module}
  return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_every_saf_jax_import_names_a_module_or_its_name():
  unresolved = []
  _imports(unresolved)
  assert unresolved == []


def test_no_import_cycle_among_the_packages_modules():
  graph = _imports()
  assert 'saf_jax.train' in graph and 'saf_jax.experiment' in graph['saf_jax.train']
  assert _cycle(graph) is None, ' -> '.join(_cycle(graph))


def test_no_module_is_longer_than_max_module_lines():
  lengths = {}
  for root, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith('.py'):
        with open(os.path.join(root, name)) as f:
          lengths[os.path.relpath(os.path.join(root, name), PACKAGE)] = len(f.readlines())
  assert len(lengths) > 40 and lengths['train.py'] > 100  # It read the package.
  assert {m: n for m, n in lengths.items() if n > MAX_MODULE_LINES} == {}


def test_the_cycle_finder_finds_a_cycle():
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b'}, 'b': set(), 'c': {'a', 'b'}}) is None


def test_tools_import_together_without_defining_flags():
  code = (
    'from absl import flags\n'
    + ''.join(f'from saf_jax.tools import {tool}\n' for tool in TOOLS)
    + 'print(sorted(n for n in ("workdir", "config", "dataset", "methods") if n in flags.FLAGS))'
  )
  proc = subprocess.run(
    [sys.executable, '-c', code], cwd=conftest.REPO_ROOT, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == '[]'


@pytest.mark.parametrize('tool', TOOLS)
def test_a_tools_old_path_says_where_it_moved(tool):
  proc = subprocess.run(
    [sys.executable, '-m', f'saf_jax.{tool}', '--workdir=runs/x'],
    cwd=conftest.REPO_ROOT,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 1
  assert proc.stderr.strip() == (
    f'error: saf_jax.{tool} moved to saf_jax.tools.{tool}: run python -m saf_jax.tools.{tool} '
    '(same flags).'
  )
  with pytest.raises(ImportError, match=f'saf_jax.{tool} moved to saf_jax.tools.{tool}'):
    __import__(f'saf_jax.{tool}')

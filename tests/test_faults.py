"""Kill anywhere: a run SIGKILLed at random moments, restarted each time, ends bit-exactly.

One `python main.py` smoke run (SAF, its table and data on the host, a model EMA, a
checkpoint every 2 steps) is killed at drawn moments of its training, restarted with the
same command after each kill, and finally left to finish. It must end where a run that
never stopped ends, bit for bit: params, batch_stats, opt_state, EMA, SAF's table and every
metrics record but its times. The kill moments are keyed on the run's progress as seen in
its workdir (committed checkpoints, the temporary directories of saves in progress, the
metrics records), not on wall seconds, so a slow or busy machine kills at the same places.

All runs share a persistent JAX compilation cache, filled by the uninterrupted run: a
restart then loads its programs instead of compiling them, as the same executables.
"""

import math
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from saf_jax import checkpoint
from saf_jax.analysis import runs
from tests import conftest
from tests.test_main import _records

STEPS_PER_EPOCH = 8  # configs/default.py:smoke: 512 examples in batches of 64.
EPOCHS = 4
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
EVERY_STEPS = 2
RUN = (
  '--config.analysis.sharpness_every_epochs=0',
  f'--config.checkpoint.every_steps={EVERY_STEPS}',
  '--config.input.placement=host',
  '--config.method.saf.table_placement=host',  # Table files, then the state: 2 saves.
  '--config.eval.ema_decay=0.9',  # The model EMA, restored with the state.
)
# The kill moments: one drawn in each fifth of training (a fraction of its steps), each
# of a kind: 'steps' kills between saves (a drawn delay after a checkpoint is committed;
# before the first checkpoint for a moment under EVERY_STEPS); 'table' and 'state' the
# moment a save of that step or later starts writing the table's files or the state's
# Orbax checkpoint (its temporary directory appears); 'record' the moment the epoch's
# metrics record is written, before the epoch's own checkpoint.
SEED = 11
KINDS = ('steps', 'table', 'record', 'state', 'steps')
_SAVES = {'state': 'checkpoints', 'table': os.path.join('checkpoints_table', 'process_0')}
MAX_DELAY = 0.1  # Seconds, for 'steps': about 2 steps here.
# A kill meant for a save that missed it (the save committed before the process died) is
# tried again at the next save of the restarted process, this many times in all at most.
SAVE_RETRIES = 3
# Time-dependent fields: everything else in a record must match exactly.
_TIMES = ('train/images_per_sec', 'train/epoch_time_sec', 'eval_time_sec')
_POLL = 0.001
_TIMEOUT = 600


def _command(workdir, data_dir):
  return [
    sys.executable,
    'main.py',
    '--config=configs/default.py:method=saf,smoke',
    f'--workdir={workdir}',
    f'--config.input.data_dir={data_dir}',
    *RUN,
  ]


def _env(cache_dir):
  return dict(
    os.environ,
    TF_CPP_MIN_LOG_LEVEL='3',
    JAX_COMPILATION_CACHE_DIR=cache_dir,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
  )


def _schedule():
  """``[(kind, target step, delay)]``: the drawn kills, in order."""
  rng = np.random.default_rng(SEED)
  fractions = (np.arange(len(KINDS)) + rng.uniform(size=len(KINDS))) / len(KINDS)
  delays = rng.uniform(0, MAX_DELAY, size=len(KINDS))
  return [
    (kind, float(f * TOTAL_STEPS), float(d))
    for kind, f, d in zip(KINDS, fractions, delays, strict=True)
  ]


def _unfinished_saves(directory):
  """``{path: step}`` of the saves in progress in ``directory``: Orbax's temporary
  checkpoint directories (``checkpoints/<step>.orbax-checkpoint-tmp``), or the host table's
  ``<step>.tmp``."""
  try:
    names = os.listdir(directory)
  except FileNotFoundError:
    return {}
  found = {}
  for name in names:
    match = re.match(r'(\d+)\..*tmp', name)
    if match:
      found[os.path.join(directory, name)] = int(match[1])
  return found


def _stat(path):
  try:
    s = os.stat(path)
  except FileNotFoundError:
    return None
  return s.st_ino, s.st_size, s.st_mtime_ns


def _num_lines(path):
  try:
    with open(path) as f:
      return f.read().count('\n')
  except FileNotFoundError:
    return 0


def _trigger(kind, target, workdir):
  """A function that returns what happened once the kill is due, else None."""
  committed = set(checkpoint.saved_steps(workdir))
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  config_path = os.path.join(workdir, 'config.json')
  metrics_before, config_before = _stat(metrics_path), _stat(config_path)
  if kind in _SAVES:
    directory = os.path.join(workdir, _SAVES[kind])

    def due():
      for path, step in _unfinished_saves(directory).items():
        if step >= target:
          return path
      return None

  elif kind == 'record':
    # Epochs before the newest checkpoint have their record already; a record of a later
    # epoch left by an earlier kill is dropped when the run starts (the file changes).
    epoch = max(
      math.ceil(target / STEPS_PER_EPOCH), max(committed, default=0) // STEPS_PER_EPOCH + 1
    )

    def due():
      if _stat(metrics_path) != metrics_before and _num_lines(metrics_path) >= epoch:
        return f'record of epoch {epoch}'
      return None

  else:  # 'steps': after the last checkpoint at or before the target step.
    step = int(target) // EVERY_STEPS * EVERY_STEPS

    def due():
      if step == 0:  # Before any checkpoint: once the run has written its config.
        return 'config written' if _stat(config_path) != config_before else None
      new = set(checkpoint.saved_steps(workdir)) - committed
      return f'checkpoint {max(new)} committed' if any(s >= step for s in new) else None

  return due


def _start(workdir, data_dir, env, log_path):
  with open(log_path, 'w') as log:
    return subprocess.Popen(
      _command(workdir, data_dir),
      cwd=conftest.REPO_ROOT,
      env=env,
      stdout=log,
      stderr=subprocess.STDOUT,
      text=True,
    )


def _run_and_kill(workdir, data_dir, env, log_path, kind, target, delay):
  """Runs the command until the kill is due, then SIGKILLs it.

  Returns:
    ``(return code, what triggered the kill or None, whether it landed during a save)``.
  """
  due = _trigger(kind, target, workdir)
  proc = _start(workdir, data_dir, env, log_path)
  try:
    deadline = time.monotonic() + _TIMEOUT
    fired = None
    while fired is None and proc.poll() is None and time.monotonic() < deadline:
      fired = due()
      if fired is None:
        time.sleep(_POLL)
    if fired is not None:
      if kind == 'steps':
        time.sleep(delay)
      proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=_TIMEOUT)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  # The temporary directory seen is still there: the process died before its commit.
  landed = kind in _SAVES and fired is not None and os.path.exists(fired)
  return proc.returncode, fired, landed


def _strip_times(records):
  return [{k: v for k, v in r.items() if k not in _TIMES} for r in records]


def _assert_same_state(workdir, reference):
  got, want = runs.load_run(workdir).state, runs.load_run(reference).state
  leaves_got, tree_got = jax.tree.flatten(got)
  leaves_want, tree_want = jax.tree.flatten(want)
  assert tree_got == tree_want
  for a, b in zip(leaves_got, leaves_want, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigkill_anywhere_then_restart_is_bit_exact(fashion_mnist_data_dir, tmp_path):
  env = _env(str(tmp_path / 'jax_cache'))
  reference = str(tmp_path / 'reference')
  log = str(tmp_path / 'reference.log')
  proc = _start(reference, fashion_mnist_data_dir, env, log)
  assert proc.wait(timeout=_TIMEOUT) == 0, _tail(log)

  workdir = str(tmp_path / 'killed')
  schedule, kills, retries = _schedule(), [], 0
  while schedule:
    kind, target, delay = schedule.pop(0)
    saved = checkpoint.saved_steps(workdir)
    log = str(tmp_path / f'run_{len(kills)}.log')
    returncode, fired, landed = _run_and_kill(
      workdir, fashion_mnist_data_dir, env, log, kind, target, delay
    )
    if fired and fired.startswith(workdir):
      fired = os.path.relpath(fired, workdir)
    kill = dict(kind=kind, target=round(target, 1), fired=fired, landed=landed, saved=saved)
    assert returncode == -signal.SIGKILL, f'{kill} exited with {returncode}: {_tail(log)}'
    kill['resumed'] = _resumed(log, saved)
    kills.append(kill)
    if kind in _SAVES and not landed and retries < SAVE_RETRIES:
      retries += 1
      schedule.insert(0, (kind, 0, 0.0))  # The next save of the restarted run.
  print('kills:', *kills, sep='\n  ')
  assert len(kills) >= len(KINDS)
  assert any(kill['landed'] for kill in kills), 'no kill landed during a save'

  saved = checkpoint.saved_steps(workdir)
  log = str(tmp_path / 'final.log')
  proc = _start(workdir, fashion_mnist_data_dir, env, log)
  assert proc.wait(timeout=_TIMEOUT) == 0, _tail(log)
  _resumed(log, saved)
  assert _strip_times(_records(workdir)) == _strip_times(_records(reference))
  _assert_same_state(workdir, reference)
  (_, table), (_, want) = checkpoint.saved_table(workdir), checkpoint.saved_table(reference)
  assert sorted(table) == sorted(want)
  for name, array in table.items():
    np.testing.assert_array_equal(array, want[name], err_msg=name)


def _tail(log):
  with open(log) as f:
    return f.read()[-4000:]


def _resumed(log, saved):
  """The step a run resumed at, checked: one saved when it started, if any was."""
  with open(log) as f:
    resumed = re.search(r'Resumed at step (\d+)', f.read())
  if not saved:
    assert resumed is None, f'resumed with no checkpoint: {_tail(log)}'
    return None
  assert resumed, f'started over, not from the checkpoints {saved}: {_tail(log)}'
  assert int(resumed[1]) in saved, (resumed[0], saved)
  return int(resumed[1])

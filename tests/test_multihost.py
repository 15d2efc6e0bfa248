"""Multi-host training for real: 2 JAX processes on localhost with ``jax.distributed``.

Each process is `python main.py` with one CPU device, joined by JAX's coordination service
and Gloo collectives, as on 2 hosts. The SAF run is checked against a single-process
replay of the same global batches: process ``p`` reads the fixed partition ``p`` of the
training set, so the global batch of a step is process 0's local batch followed by process
1's, and a single table over all ids must give the same targets as the two per-process
tables of ``num_train / 2`` rows.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default
from saf_jax import checkpoint, data, experiment, logit_table, resume, table_files, train
from saf_jax.analysis import runs
from saf_jax.data import partition
from tests import conftest
from tests.test_main import _main, _records

NUM_TRAIN = 512  # configs/default.py:smoke; batch 64: 32 per process, 8 steps per epoch.
EPOCHS = 4
# 3 checkpoints kept: the epoch 2, 3 and 4 ends (a host table resumed on 1 process after epoch 2).
OVERRIDES = ('--config.analysis.sharpness_every_epochs=0', '--config.checkpoint.max_to_keep=3')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _run_2_processes(workdir: str, data_dir: str, where: str) -> list[tuple[str, str]]:
  """Runs the SAF smoke config by 2 processes in ``workdir``; ``[(stdout, stderr)]``."""
  address = f'localhost:{_free_port()}'
  env = dict(
    os.environ,
    TF_CPP_MIN_LOG_LEVEL='3',
    JAX_PLATFORMS='cpu',
    XLA_FLAGS='--xla_force_host_platform_device_count=1',
  )
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        'main.py',
        '--config=configs/default.py:method=saf,smoke',
        f'--workdir={workdir}',
        f'--config.input.data_dir={data_dir}',
        '--config.distributed.enabled=True',
        f'--config.distributed.coordinator_address={address}',
        '--config.distributed.num_processes=2',
        f'--config.distributed.process_id={p}',
        f'--config.input.placement={where}',
        f'--config.method.saf.table_placement={where}',
        *OVERRIDES,
      ],
      cwd=conftest.REPO_ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for p in range(2)
  ]
  outputs = [proc.communicate(timeout=900) for proc in procs]
  for proc, (_, stderr) in zip(procs, outputs, strict=True):
    assert proc.returncode == 0, stderr[-4000:]
  return outputs


@pytest.fixture(scope='module', params=['host', 'device'])
def two_process_run(request, fashion_mnist_data_dir, tmp_path_factory):
  """A SAF smoke run by 2 processes, its data and table on the host or on the devices.

  Returns:
    ``(workdir, [stdout of each process], placement)``.
  """
  where = request.param
  workdir = str(tmp_path_factory.mktemp(f'two_processes_{where}'))
  outputs = _run_2_processes(workdir, fashion_mnist_data_dir, where)
  return workdir, [stdout for stdout, _ in outputs], where


def test_each_process_owns_a_fixed_half_and_its_table_is_exact(two_process_run):
  workdir, stdouts, where = two_process_run
  # Both processes end with the same (replicated) result; only process 0 writes metrics.
  summaries = [next(x for x in out.splitlines() if x.startswith('method=')) for out in stdouts]
  assert summaries[0].split('images/s')[0] == summaries[1].split('images/s')[0]
  records = _records(workdir)
  assert [r['epoch'] for r in records] == list(range(1, EPOCHS + 1))
  # E_tilde = 2: from epoch 3 on every target is the example's own logits of 2 epochs ago,
  # because each process reads back exactly the rows it wrote (host), or the one table
  # holds every row (device).
  assert [r['train/table_valid_fraction'] for r in records] == [0.0, 0.0, 1.0, 1.0]
  step = records[-1]['step']
  if where == 'host':
    written = []
    for p in range(2):
      saved = os.path.join(workdir, 'checkpoints_table', f'process_{p}', str(step))
      written.append(np.load(os.path.join(saved, 'written_epoch.npy')))
      assert written[-1].shape == (2, NUM_TRAIN // 2)  # E_tilde slots of N / P rows.
    written = np.concatenate(written, axis=1)
  else:  # One table of every row, sharded over both processes' devices, saved by Orbax.
    assert not os.path.exists(os.path.join(workdir, 'checkpoints_table'))
    _, arrays = checkpoint.saved_table(workdir)
    written = arrays['written_epoch']
    assert written.shape == (2, NUM_TRAIN)
  # Every row was written in each of the last two epochs (slot e % 2).
  assert np.all(written[EPOCHS % 2] == EPOCHS)
  assert np.all(written[(EPOCHS - 1) % 2] == EPOCHS - 1)


def test_partition_covers_every_id_once_and_never_moves(fashion_mnist_data_dir):
  config = default.get_config('method=saf,smoke')
  config.input.data_dir = fashion_mnist_data_dir
  datasets = data.create_datasets(config.input, seed=config.seed)
  seen = {}
  for epoch in (1, 2, 3):
    for p in range(4):
      ids = np.concatenate(
        [
          b['index']
          for b in datasets.train_epoch(epoch, batch_size=16, process_index=p, process_count=4)
        ]
      )
      first_id, num_ids = partition.process_partition(NUM_TRAIN, p, 4)
      assert sorted(ids) == list(range(first_id, first_id + num_ids))  # 128 / 16: no remainder.
      for i in ids:
        assert seen.setdefault(int(i), p) == p  # Always the same owner.
  assert sorted(seen) == list(range(NUM_TRAIN))


def test_matches_a_single_process_replay_of_the_same_global_batches(
  two_process_run, fashion_mnist_data_dir
):
  workdir, _, _ = two_process_run
  config = default.get_config('method=saf,smoke')
  config.input.data_dir = fashion_mnist_data_dir
  config.analysis.sharpness_every_epochs = 0
  config.input.placement = config.method.saf.table_placement = 'host'  # Host batches here.
  datasets = data.create_datasets(config.input, seed=config.seed)
  exp = experiment.create(config, datasets.info)
  state = exp.init_state()
  table = logit_table.LogitTable(NUM_TRAIN, 10, E_tilde=config.method.saf.E_tilde)
  losses = []
  for epoch in range(1, EPOCHS + 1):
    local = [
      datasets.train_epoch(epoch, batch_size=32, process_index=p, process_count=2) for p in (0, 1)
    ]
    merged = ({k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*local, strict=True))
    state, step_metrics, _ = train.run_steps(exp, state, merged, epoch=epoch, table=table)
    losses.append(float(np.mean([m['loss'] for m in step_metrics])))
  records = _records(workdir)
  # One device here, one per process there: only the float summation order differs.
  np.testing.assert_allclose([r['train/loss'] for r in records], losses, rtol=1e-4)
  restored = runs.load_run(workdir).state
  for got, want in zip(
    jax.tree.leaves(restored.params), jax.tree.leaves(state.params), strict=True
  ):
    # Summation order again, amplified over 3 epochs: with the versions of
    # requirements-lock.txt entries of size ~1e-2 differed by up to 3.2e-4 between runs.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=1e-3)


def test_saf_checkpoint_of_2_processes_on_1(
  two_process_run, fashion_mnist_data_dir, tmp_path, request
):
  """One process resumes a 2-process SAF run at an epoch's end, with every target in place:
  a host table's rows gathered from both processes' files, a device table whole."""
  workdir = str(tmp_path / 'copy')
  source, _, where = two_process_run
  shutil.copytree(source, workdir)
  placed = _placed(where)
  if where == 'host':
    _check_host_table_of_2_processes_on_1(source, workdir, request.getfixturevalue('host_run_on_1'))
    return
  last = max(checkpoint.saved_steps(workdir))  # As if the 2 processes stopped after epoch 3.
  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(last)))
  proc = _main(workdir, 'method=saf,smoke', fashion_mnist_data_dir, *OVERRIDES, *placed)
  assert f'Resumed at step {last - 8} (epoch 3, batch 8)' in proc.stderr
  records, before = _records(workdir), _records(source)
  assert [r['epoch'] for r in records] == list(range(1, EPOCHS + 1))
  assert records[-1]['train/table_valid_fraction'] == 1.0
  # One process reads epoch 4 in another order than two (each process shuffles its own
  # partition), so the last epoch differs as another data order does: by 0.5% (measured).
  for key in ('train/loss', 'test/loss'):
    np.testing.assert_allclose(records[-1][key], before[-1][key], rtol=0.05, err_msg=key)


def _placed(where: str) -> tuple[str, str]:
  return (f'--config.input.placement={where}', f'--config.method.saf.table_placement={where}')


# The steps of the epoch ends in the smoke runs: 8 steps per epoch.
EPOCH_2, EPOCH_3, EPOCH_4 = 16, 24, 32


@pytest.fixture(scope='module')
def host_run_on_1(two_process_run, fashion_mnist_data_dir, tmp_path_factory):
  """The host-table run of ``two_process_run`` resumed after epoch 2 by 1 process, which
  trains epochs 3 and 4 (checkpoints of epochs 3 and 4 saved by it, of epoch 2 by both).

  Returns:
    ``(workdir, the resume's stderr)``.
  """
  source, _, where = two_process_run
  if where != 'host':
    pytest.skip('A device table holds every row: test_saf_checkpoint_of_2_processes_on_1.')
  workdir = str(tmp_path_factory.mktemp('two_processes_on_1') / 'run')
  shutil.copytree(source, workdir)
  for step in (EPOCH_3, EPOCH_4):  # As if the 2 processes stopped after epoch 2.
    shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
  proc = _main(workdir, 'method=saf,smoke', fashion_mnist_data_dir, *OVERRIDES, *_placed(where))
  return workdir, proc.stderr


def _check_host_table_of_2_processes_on_1(source, copy, resumed):
  # The library: 1 process restores the table of the epoch 2 end, both blocks gathered.
  for step in (EPOCH_3, EPOCH_4):  # Their table files stay, as after a kill before the state.
    shutil.rmtree(os.path.join(copy, 'checkpoints', str(step)))
  saved = [table_files.TableFiles(source, p).load(EPOCH_2) for p in range(2)]
  ckpt = checkpoint.Checkpointer(copy, max_to_keep=3, with_table=True, num_train=NUM_TRAIN)
  try:
    assert ckpt.latest_step() == EPOCH_2
    assert (ckpt.meta(EPOCH_2)['num_processes'], ckpt.meta(EPOCH_2)['epoch']) == (2, 2)
  finally:
    ckpt.close()
  files = table_files.TableFiles(copy, num_train=NUM_TRAIN)  # Process 0 of this 1.
  assert files.steps() == [EPOCH_2, EPOCH_3, EPOCH_4]  # Complete: the state decides (above).
  table = logit_table.LogitTable(NUM_TRAIN, 10, E_tilde=2)
  table.load_state_dict(files.restore(EPOCH_2, table.state_dict()))
  for name, array in table.state_dict().items():
    np.testing.assert_array_equal(array, np.concatenate([s[name] for s in saved], axis=1))
  written = np.concatenate([s['written_epoch'] for s in saved], axis=1)
  assert table.valid_fraction(3) == np.mean(written[1] == 1) == 1.0
  assert table.valid_fraction(4) == np.mean(written[0] == 2) == 1.0
  # The run: 1 process trains epochs 3 and 4 with every target in place, as 2 did.
  workdir, stderr = resumed
  assert f'Resumed at step {EPOCH_2} (epoch 2, batch 8)' in stderr
  records = _records(workdir)
  assert [r['epoch'] for r in records] == list(range(1, EPOCHS + 1))
  valid = [r['train/table_valid_fraction'] for r in records]
  assert valid == [r['train/table_valid_fraction'] for r in _records(source)] == [0, 0, 1, 1]
  # Epoch 3 wrote slot 1: slot 0 of its checkpoint still holds both processes' epoch 2 rows.
  after = table_files.TableFiles(workdir, 0).load(EPOCH_3)
  for name, array in after.items():
    np.testing.assert_array_equal(array[0], np.concatenate([s[name][0] for s in saved], axis=0))
  # process_1's steps of epochs 3 and 4 were another run's: rotated out; epoch 2's stays.
  tables = os.path.join(workdir, 'checkpoints_table')
  assert sorted(os.listdir(os.path.join(tables, 'process_1'))) == [str(EPOCH_2)]
  assert sorted(map(int, os.listdir(os.path.join(tables, 'process_0')))) == [16, 24, 32]


def test_saf_host_table_of_1_process_on_2(host_run_on_1, fashion_mnist_data_dir, tmp_path):
  """2 processes resume a host table saved by 1 at an epoch's end: each takes its half."""
  workdir = str(tmp_path / 'copy')
  shutil.copytree(host_run_on_1[0], workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(EPOCH_4)))  # Stopped after epoch 3.
  outputs = _run_2_processes(workdir, fashion_mnist_data_dir, 'host')
  for _, stderr in outputs:
    assert f'Resumed at step {EPOCH_3} (epoch 3, batch 8)' in stderr
  records = _records(workdir)
  assert [r['epoch'] for r in records] == list(range(1, EPOCHS + 1))
  assert [r['train/table_valid_fraction'] for r in records] == [0, 0, 1, 1]
  one = table_files.TableFiles(workdir, 0).load(EPOCH_3)  # The 1 process's: every row.
  assert one['written_epoch'].shape == (2, NUM_TRAIN)
  half = NUM_TRAIN // 2
  for p in range(2):
    block = slice(p * half, (p + 1) * half)
    # The library: process p restores its block of the 1-process table, every array.
    files = table_files.TableFiles(workdir, p, process_count=2, num_train=NUM_TRAIN)
    assert files.steps() == [EPOCH_2, EPOCH_3, EPOCH_4]
    table = logit_table.LogitTable(half, 10, E_tilde=2, first_id=p * half)
    table.load_state_dict(files.restore(EPOCH_3, table.state_dict()))
    for name, array in table.state_dict().items():
      np.testing.assert_array_equal(array, one[name][:, block])
    assert table.valid_fraction(4) == 1.0
    # The run: epoch 4 wrote slot 0; slot 1 still holds the rows of epoch 3, as restored.
    after = table_files.TableFiles(workdir, p).load(EPOCH_4)
    assert np.all(after['written_epoch'][0] == 4)
    for name, array in after.items():
      np.testing.assert_array_equal(array[1], one[name][1, block])


def _save_as(workdir, step, process, count, num_train, table):
  """Saves ``table`` at ``step`` as process ``process`` of ``count`` would."""
  files = table_files.TableFiles(workdir, process, process_count=count, num_train=num_train)
  files.save(step, table.state_dict())


def _write_meta(workdir, step, **meta):
  """A state checkpoint's meta file, as Orbax writes it (``checkpoint.table_placement``)."""
  os.makedirs(os.path.join(workdir, 'checkpoints', str(step), 'meta'))
  with open(os.path.join(workdir, 'checkpoints', str(step), 'meta', 'metadata'), 'w') as f:
    json.dump(meta, f)


@pytest.mark.parametrize(
  'layout',
  [{}, {'dtype': 'bfloat16'}, {'dtype': 'int8', 'topk': 2, 'tau': 2.0}],
  ids=['float32', 'bfloat16', 'int8_topk'],
)
@pytest.mark.parametrize('before, after', [(2, 1), (1, 2), (2, 3), (3, 2), (4, 5)])
def test_host_table_gathered_on_another_process_count_is_exact(before, after, layout, tmp_path):
  """Every new block equals the same rows of one table written as the old processes did."""
  num_train, num_classes, step = 11, 4, 7  # 2 -> 1, 3 -> 2: old leftover ids in a new block.
  workdir, rng = str(tmp_path), np.random.default_rng(before * 10 + after)
  whole = logit_table.LogitTable(num_train, num_classes, E_tilde=2, **layout)
  for q in range(before):
    first_id, rows = partition.process_partition(num_train, q, before)
    table = logit_table.LogitTable(rows, num_classes, E_tilde=2, first_id=first_id, **layout)
    for epoch in (1, 2, 3):
      ids = np.arange(first_id, first_id + rows)[rng.random(rows) < 0.8]  # Some never.
      logits = rng.normal(size=(ids.size, num_classes)).astype(np.float32)
      table.write(ids, logits, epoch=epoch)
      whole.write(ids, logits, epoch=epoch)
    _save_as(workdir, step, q, before, num_train, table)
  want = whole.state_dict()
  for p in range(after):
    first_id, rows = partition.process_partition(num_train, p, after)
    files = table_files.TableFiles(workdir, p, process_count=after, num_train=num_train)
    assert files.steps() == [step]
    memmap_dir = str(tmp_path / f'scratch_{p}')
    table = logit_table.LogitTable(
      rows, num_classes, E_tilde=2, first_id=first_id, memmap_dir=memmap_dir, **layout
    )
    restored = files.restore(step, table.state_dict())
    # Read from the saved files in place: memory-mapped, never loaded whole.
    saved_ids = min(first_id + rows, before * (num_train // before)) - first_id
    for array in restored.values():
      blocks = getattr(array, 'blocks', [array])
      assert sum(b.shape[1] for b in blocks if isinstance(b, np.memmap)) == max(saved_ids, 0)
    table.load_state_dict(restored)
    for name, array in table.state_dict().items():
      np.testing.assert_array_equal(array, want[name][:, first_id : first_id + rows], name)
    for epoch in (3, 4):
      written = want['written_epoch'][epoch % 2, first_id : first_id + rows]
      assert table.valid_fraction(epoch) == np.mean(written == epoch - 2)
    table.close()


def test_gathered_steps_need_every_saving_process_and_an_epoch_end(tmp_path):
  num_train, workdir = 11, str(tmp_path)
  tables = os.path.join(workdir, 'checkpoints_table')

  def save(step, process, count):
    first_id, rows = partition.process_partition(num_train, process, count)
    table = logit_table.LogitTable(rows, 3, E_tilde=2, first_id=first_id)
    table.write(np.arange(first_id, first_id + rows), np.ones((rows, 3)), epoch=1)
    _save_as(workdir, step, process, count, num_train, table)

  def listing(process):
    return sorted(map(int, os.listdir(os.path.join(tables, f'process_{process}'))))

  # Step 8, an epoch's end of 3 processes; process_3 holds another run's step 8 (4 processes,
  # killed before their state): the meta says which processes saved it.
  for q in range(3):
    save(8, q, 3)
    save(12, q, 3)
  save(8, 3, 4)
  _write_meta(workdir, 8, num_processes=3, epoch=1, batches_done=4, steps_per_epoch=4)
  _write_meta(workdir, 12, num_processes=3, epoch=2, batches_done=2, steps_per_epoch=4)
  new = [table_files.TableFiles(workdir, p, process_count=2, num_train=num_train) for p in (0, 1)]
  assert new[0].saved_blocks(8) == [(0, 3), (3, 3), (6, 3)]
  # Step 12 is mid-epoch: its data position belongs to the 3 processes' partition.
  assert [files.steps() for files in new] == [[8], [8]]
  # Two processes save step 16; process 0 rotates the directories of processes 2 and 3: a
  # step no longer kept goes, and so does a copy of step 16 (another run's).
  save(16, 0, 2)
  save(16, 1, 2)
  save(16, 2, 3)
  new[1].keep_only([8, 12, 16])
  assert listing(2) == [8, 12, 16]  # Process 1 rotates its own directory alone.
  new[0].keep_only([8, 12, 16])
  assert (listing(2), listing(3)) == ([8, 12], [8])
  new[0].keep_only([12, 16])
  assert (listing(0), listing(2), os.listdir(os.path.join(tables, 'process_3'))) == (
    [12, 16],
    [12],
    [],
  )
  # A saving process's files missing: no new process gathers that step.
  save(20, 0, 1)
  _write_meta(workdir, 20, num_processes=2, epoch=3, batches_done=4, steps_per_epoch=4)
  assert new[1].saved_blocks(20) is None and new[1].steps() == [16]
  like = {'values': np.zeros((2, 5, 3), np.float32), 'written_epoch': np.zeros((2, 5), np.int32)}
  with pytest.raises(FileNotFoundError, match='step 20 .* is incomplete'):
    new[1].restore(20, like)


def test_gathered_newest_step_with_a_damaged_or_missing_file_is_refused(tmp_path):
  """A saving process's table file of the newest state step damaged or missing: latest_step
  names the step and the file, with no fallback to an older step (whose resumption would
  save over this one), and nothing is deleted."""
  num_train, workdir = 11, str(tmp_path)
  for step in (8, 16):  # Epoch ends of 2 processes, state and tables.
    for q in range(2):
      first_id, rows = partition.process_partition(num_train, q, 2)
      table = logit_table.LogitTable(rows, 3, E_tilde=2, first_id=first_id)
      _save_as(workdir, step, q, 2, num_train, table)
    _write_meta(workdir, step, num_processes=2, epoch=step // 8, batches_done=4, steps_per_epoch=4)

  def latest(**options):
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=3, with_table=True, **options)
    try:
      return ckpt.latest_step()
    finally:
      ckpt.close()

  assert latest(num_train=num_train) == 16  # 1 process gathers both blocks.
  tables = os.path.join(workdir, 'checkpoints_table')
  path = os.path.join(tables, 'process_1', '16', 'written_epoch.npy')
  os.truncate(path, os.path.getsize(path) // 2)
  before = sorted(os.walk(workdir))
  with pytest.raises(checkpoint.CheckpointError) as info:
    latest(num_train=num_train)
  message = str(info.value)
  assert f'The checkpoint of step 16 in {workdir!r} has no SAF table that process 0' in message
  assert f'{path} is damaged (ValueError: ' in message
  assert 'Move checkpoints/16 (and checkpoints_table/*/16) aside' in message
  assert sorted(os.walk(workdir)) == before
  shutil.rmtree(os.path.dirname(path))
  with pytest.raises(checkpoint.CheckpointError, match=f'{os.path.dirname(path)} is missing'):
    latest(num_train=num_train)
  # On the saving process count, this process's own directory of step 16 missing.
  shutil.rmtree(os.path.join(tables, 'process_0', '16'))
  before = sorted(os.walk(workdir))
  with pytest.raises(checkpoint.CheckpointError, match=r'step 16 .*process_0/16 is missing'):
    latest()
  assert sorted(os.walk(workdir)) == before
  shutil.rmtree(os.path.join(tables, 'process_0'))  # No table of any state step: the old words.
  with pytest.raises(checkpoint.CheckpointError, match=r'steps \[8, 16\] .* have no SAF table'):
    latest()


# Process p of 2 saves, fails and restores with a Checkpointer; prints [stage, error or None].
_FAILING = """
import errno, json, os, shutil, sys
import jax
import numpy as np
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from jax.experimental import multihost_utils
from saf_jax import checkpoint, logit_table, table_files

workdir, p = sys.argv[3], jax.process_index()
ckpt = checkpoint.Checkpointer(workdir, max_to_keep=3, with_table=True, num_train=8)
table = logit_table.LogitTable(4, 3, E_tilde=2, first_id=4 * p)
state, like = {'w': np.zeros(3, np.float32)}, {'w': jax.ShapeDtypeStruct((3,), np.float32)}
tables = os.path.join(workdir, 'checkpoints_table', f'process_{p}')

def attempt(stage, call):
  try:
    call()
    result = None
  except Exception as e:
    result = [type(e).__name__, str(e)]
  print(json.dumps([stage, result]), flush=True)

def full(self, step, arrays):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(self.directory, 'x'))

attempt('save', lambda: ckpt.save(1, state, table.state_dict(), {'step': 1}))
if p == 1:  # A full disk on process 1 alone.
  table_files.TableFiles.save = full
attempt('full', lambda: ckpt.save(2, state, table.state_dict(), {'step': 2}))
if p == 1:
  os.truncate(os.path.join(tables, '1', 'values.npy'), 100)
multihost_utils.sync_global_devices('damaged')
attempt('restore', lambda: ckpt.restore(1, like, table.state_dict()))
if p == 1:
  shutil.rmtree(os.path.join(tables, '1'))
multihost_utils.sync_global_devices('removed')
attempt('latest', ckpt.latest_step)
ckpt.close()
"""


def test_a_table_that_one_process_cannot_save_or_read_raises_on_every_process(tmp_path):
  """Process 1's table save refused (a full disk), its file of the step cut short, then
  removed: both processes raise a CheckpointError (process 1 its own), none waits forever
  in Orbax's save or restore, or in latest_step's collective."""
  address = f'localhost:{_free_port()}'
  env = dict(
    os.environ,
    TF_CPP_MIN_LOG_LEVEL='3',
    JAX_PLATFORMS='cpu',
    XLA_FLAGS='--xla_force_host_platform_device_count=1',
  )
  workdir = str(tmp_path / 'run')
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', _FAILING, address, str(p), workdir],
      cwd=conftest.REPO_ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for p in range(2)
  ]
  try:
    outputs = [proc.communicate(timeout=180) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:  # A hang: what this test is about.
        proc.kill()
        proc.wait()
  results = []
  for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
    assert proc.returncode == 0, stderr[-4000:]
    results.append(dict(json.loads(line) for line in stdout.splitlines() if line.startswith('["')))
  other = 'Process 1 of this run failed to {}; its own error message names why.'
  assert results[0]['save'] is results[1]['save'] is None
  assert results[0]['full'] == ['CheckpointError', other.format('save its SAF table of step 2')]
  kind, message = results[1]['full']
  assert message.startswith('The checkpoint of step 2 could not be saved: No space left')
  assert 'start from step 1, whose checkpoint is intact' in message
  kind, message = results[0]['restore']
  assert kind == 'CheckpointError' and other.format('read its SAF table of step 1') in message
  kind, message = results[1]['restore']
  assert kind == 'CheckpointError' and 'process_1/1/values.npy has 100 bytes' in message
  assert 'Move checkpoints/1 (and checkpoints_table/*/1) aside' in message
  want = other.format('find its SAF table of the newest checkpoint')
  assert results[0]['latest'] == ['CheckpointError', want]
  assert results[1]['latest'][0] == 'CheckpointError'
  assert 'no SAF table under checkpoints_table/process_1' in results[1]['latest'][1]


def test_mid_epoch_checkpoint_on_another_process_count_is_refused():
  meta = {'step': 11, 'epoch': 2, 'batches_done': 3, 'steps_per_epoch': 8, 'num_devices': 2}
  with pytest.raises(ValueError) as refused:
    resume.check_resume({**meta, 'num_processes': 2}, 'w', per_device=False, num_devices=1)
  assert str(refused.value) == (
    "The checkpoint in 'w' (step 11) was saved in the middle of epoch 2 (batch 3 of 8) by 2 "
    'processes, and which examples the batches of an epoch hold depends on the number of '
    'processes: resume it with 2 processes (this run has 1), or use a new --workdir. A '
    'checkpoint saved at the end of an epoch resumes on any number of processes.'
  )
  resume.check_resume({**meta, 'num_processes': 1}, 'w', per_device=False, num_devices=1)
  at_end = {**meta, 'batches_done': 8, 'num_processes': 2}  # SAF's host table included.
  resume.check_resume(at_end, 'w', per_device=False, num_devices=1)


def test_sigterm_stops_2_processes_at_one_step_and_the_resume_is_exact(
  two_process_run, fashion_mnist_data_dir, tmp_path
):
  """SIGTERM to both processes mid-run: JAX's preemption sync point stops them after the
  same step, where they save once and exit 0; the same command (2 processes again) resumes
  there and ends with the params, optimizer state, table and metrics of ``two_process_run``,
  bit for bit: the same program on the same inputs, on the same 2 processes."""
  import time  # Here, not at the top: this test is appended to the module as one piece.

  reference, _, where = two_process_run
  if where != 'host':  # One placement is enough: the host runs are the cheaper (70 s, not 100).
    pytest.skip('SIGTERM on 2 processes is checked with the host placement.')
  workdir = str(tmp_path / 'preempted')
  address = f'localhost:{_free_port()}'
  env = dict(
    os.environ,
    TF_CPP_MIN_LOG_LEVEL='3',
    JAX_PLATFORMS='cpu',
    XLA_FLAGS='--xla_force_host_platform_device_count=1',
    # The resume loads the programs that the first run compiled (process 0 writes them).
    JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
  )

  def start(run):
    """The fixture's 2 commands, their output in files: ``[(process, log path)]``."""
    procs = []
    for p in range(2):
      log = str(tmp_path / f'{run}_{p}.log')
      with open(log, 'w') as f:
        proc = subprocess.Popen(
          [
            sys.executable,
            'main.py',
            '--config=configs/default.py:method=saf,smoke',
            f'--workdir={workdir}',
            f'--config.input.data_dir={fashion_mnist_data_dir}',
            '--config.distributed.enabled=True',
            f'--config.distributed.coordinator_address={address}',
            '--config.distributed.num_processes=2',
            f'--config.distributed.process_id={p}',
            f'--config.input.placement={where}',
            f'--config.method.saf.table_placement={where}',
            *OVERRIDES,
          ],
          cwd=conftest.REPO_ROOT,
          env=env,
          stdout=f,
          stderr=subprocess.STDOUT,
          text=True,
        )
      procs.append((proc, log))
    return procs

  def finish(procs):
    """Waits for both processes to exit 0; their outputs."""
    outputs = []
    for proc, log in procs:
      returncode = proc.wait(timeout=900)
      with open(log) as f:
        outputs.append(f.read())
      assert returncode == 0, outputs[-1][-4000:]
    return outputs

  def steps_after(text, out):
    return [int(part.split()[0].rstrip(':')) for part in out.split(text)[1:]]

  procs = start('preempted')
  try:
    # SIGTERM once epoch 2's checkpoint is there: epoch 3's steps are running (compiled for
    # epoch 2), so the processes agree on a step while they train, not while one compiles.
    deadline = time.monotonic() + 900
    while 16 not in checkpoint.saved_steps(workdir) and time.monotonic() < deadline:
      assert all(proc.poll() is None for proc, _ in procs), 'a process ended before SIGTERM'
      time.sleep(0.005)
    before = checkpoint.saved_steps(workdir)
    assert before == [8, 16], before
    for proc, _ in reversed(procs):  # Each process, as a scheduler preempts each host.
      proc.terminate()
    outputs = finish(procs)
  finally:
    for proc, _ in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  # Both stop after the same step, save it once (a collective save), and say so.
  stopped = [steps_after('stopped by SIGTERM and saved at step ', out) for out in outputs]
  assert stopped[0] == stopped[1], f'the processes stopped at different steps: {stopped}'
  assert len(stopped[0]) == 1, stopped
  step = stopped[0][0]
  assert 16 < step < 32, step
  for out in outputs:  # Epochs 1 and 2's checkpoints, then SIGTERM's.
    assert steps_after('Checkpoint at step ', out) == [8, 16, step], out[-4000:]
  assert sorted(set(checkpoint.saved_steps(workdir)) - set(before)) == [step]

  outputs = finish(start('resumed'))
  for out in outputs:
    assert f'Resumed at step {step} ' in out, out[-4000:]
  times = ('train/images_per_sec', 'train/epoch_time_sec', 'eval_time_sec')
  got, want = _records(workdir), _records(reference)
  assert [{k: v for k, v in r.items() if k not in times} for r in got] == [
    {k: v for k, v in r.items() if k not in times} for r in want
  ]
  leaves, tree = jax.tree.flatten(runs.load_run(workdir).state)
  leaves_want, tree_want = jax.tree.flatten(runs.load_run(reference).state)
  assert tree == tree_want
  for a, b in zip(leaves, leaves_want, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for p in range(2):  # Each process's half of the table, at the last step.
    tables = [
      os.path.join(w, 'checkpoints_table', f'process_{p}', '32') for w in (workdir, reference)
    ]
    names = sorted(n for n in os.listdir(tables[1]) if n.endswith('.npy'))
    assert names and sorted(n for n in os.listdir(tables[0]) if n.endswith('.npy')) == names
    for name in names:
      a, b = (np.load(os.path.join(t, name)) for t in tables)
      np.testing.assert_array_equal(a, b, err_msg=f'process_{p}/{name}')

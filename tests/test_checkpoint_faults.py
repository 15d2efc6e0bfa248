"""Damaged, missing and unfinished checkpoints, and saves that the filesystem refuses.

Every file of a real checkpoint (SAF with its table on the device, in the Orbax checkpoint,
and on the host, in ``checkpoints_table/``) is cut to half its size, zeroed, or removed in
turn: the rerun must refuse with the ``CheckpointError`` that names the step and says what
to move aside, and change no file. A save killed between Orbax's commit and the manifest is
moved aside and the run resumes bit-exact (or, if it was the first, reruns from scratch); a
full disk gives one error line, leaves no partial files, and a rerun with room ends like an
uninterrupted run.
"""

import errno
import glob
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import types
import zlib

import jax
import numpy as np
import pytest

from configs import default
from saf_jax import checkpoint, manifest, train
from saf_jax.analysis import runs
from tests import conftest
from tests.test_main import _main, _records

# Time-dependent fields: everything else in a record must match exactly.
_TIMES = ('train/images_per_sec', 'train/epoch_time_sec', 'eval_time_sec', 'sharpness_time_sec')
# The workdir's lock file holds the host and pid of the last run that took it.
_LOCK = 'lock'
# Overrides shared by every run here (the command-line form of _config).
_FLAGS = ('--config.analysis.sharpness_every_epochs=0',)

# Every file of a checkpoint at step {step}, as patterns (a '*' stands for Orbax's
# content-addressed data files: each matching file is a case of its own).
_ORBAX_ITEM = (
  '_METADATA',
  '_sharding',
  'array_metadatas/process_0',
  'commit_success.txt',
  'manifest.ocdbt',
  'd/*',
  'ocdbt.process_0/manifest.ocdbt',
  'ocdbt.process_0/d/*',
)
_STEP_FILES = (
  '_CHECKPOINT_METADATA',
  'commit_success.txt',
  manifest.NAME,
  'meta/metadata',
  'meta/commit_success.txt',
  *(f'state/{name}' for name in _ORBAX_ITEM),
)
_FILES = {
  'device': [f'checkpoints/{{step}}/{name}' for name in _STEP_FILES]
  + [f'checkpoints/{{step}}/saf_table/{name}' for name in _ORBAX_ITEM],
  'host': [f'checkpoints/{{step}}/{name}' for name in _STEP_FILES]
  + [
    f'checkpoints_table/process_0/{{step}}/{name}'
    for name in ('values.npy', 'written_epoch.npy', manifest.NAME)
  ],
}
# The run of each placement: one epoch on the device (one checkpoint: its removed manifest
# is a kill before the first manifest, test_a_first_save_killed_before_its_manifest_...), two
# on the host (checkpoints 8 and 16: the newest one's removed manifest is the kill-window
# case, test_a_save_killed_before_its_manifest_resumes_bit_exact).
_EPOCHS = {'device': 1, 'host': 2}
_STEPS_PER_EPOCH = 8  # 512 examples in batches of 64.


def _config(data_dir, placement, num_epochs):
  config = default.get_config('method=saf,smoke')
  config.num_epochs = num_epochs
  config.input.data_dir = data_dir
  config.analysis.sharpness_every_epochs = 0
  config.method.saf.table_placement = placement
  return config


def _snapshot(workdir):
  """``{relative path: sha256}`` of every file of ``workdir`` but the lock."""
  files = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      relative = os.path.relpath(path, workdir)
      if relative != _LOCK:
        with open(path, 'rb') as f:
          files[relative] = hashlib.sha256(f.read()).hexdigest()
  return files


def _damage(path, how):
  if how == 'truncate':  # As a full disk or a crash leaves a file: cut short.
    os.truncate(path, os.path.getsize(path) // 2)
  elif how == 'zero':  # As a filesystem leaves unwritten blocks: same size, all zero.
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
      f.write(bytes(size))
  else:
    os.remove(path)


def _strip_times(records):
  return [{k: v for k, v in r.items() if k not in _TIMES} for r in records]


def _assert_same_run(workdir, reference):
  assert _strip_times(_records(workdir)) == _strip_times(_records(reference))
  got, want = runs.load_run(workdir).state, runs.load_run(reference).state
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope='module')
def finished(fashion_mnist_data_dir, tmp_path_factory):
  """``{placement: workdir}``: finished SAF smoke runs (see ``_EPOCHS``), trained in-process."""
  workdirs = {}
  for placement, num_epochs in _EPOCHS.items():
    workdir = str(tmp_path_factory.mktemp(f'finished_{placement}'))
    train.train_and_evaluate(_config(fashion_mnist_data_dir, placement, num_epochs), workdir)
    workdirs[placement] = workdir
  return workdirs


def _cases(workdir, placement):
  """``{pattern: [relative paths]}`` of the newest checkpoint of ``workdir``."""
  step = _EPOCHS[placement] * _STEPS_PER_EPOCH
  return {
    pattern: sorted(
      os.path.relpath(path, workdir)
      for path in glob.glob(os.path.join(workdir, pattern.format(step=step)))
    )
    for pattern in _FILES[placement]
  }


@pytest.mark.parametrize('placement', ['device', 'host'])
def test_the_cases_cover_every_file_of_the_checkpoint(finished, placement):
  workdir = finished[placement]
  step = _EPOCHS[placement] * _STEPS_PER_EPOCH
  assert checkpoint.complete_steps(workdir) == checkpoint.saved_steps(workdir)
  assert checkpoint.saved_steps(workdir)[-1] == step
  cases = _cases(workdir, placement)
  assert all(cases.values()), [p for p, paths in cases.items() if not paths]
  covered = {path for paths in cases.values() for path in paths}
  newest = [
    path
    for path in _snapshot(workdir)
    if path.startswith((f'checkpoints/{step}/', f'checkpoints_table/process_0/{step}/'))
  ]
  assert sorted(newest) == sorted(covered)


@pytest.mark.parametrize('how', ['truncate', 'zero', 'delete'])
@pytest.mark.parametrize(
  'placement, pattern', [(p, f) for p in ('device', 'host') for f in _FILES[p]]
)
def test_a_damaged_file_is_refused_and_nothing_changes(
  finished, fashion_mnist_data_dir, tmp_path, placement, pattern, how
):
  """In-process (train_and_evaluate), each file matching ``pattern`` damaged in turn."""
  step = _EPOCHS[placement] * _STEPS_PER_EPOCH
  if (how, pattern) == ('delete', f'checkpoints/{{step}}/{manifest.NAME}'):
    pytest.skip('an unfinished save: test_a_(first_)save_killed_before_its_manifest_...')
  config = _config(fashion_mnist_data_dir, placement, _EPOCHS[placement])
  for i, relative in enumerate(_cases(finished[placement], placement)[pattern]):
    workdir = str(tmp_path / f'case_{i}')
    shutil.copytree(finished[placement], workdir)
    _damage(os.path.join(workdir, relative), how)
    before = _snapshot(workdir)
    with pytest.raises(checkpoint.CheckpointError) as info:
      train.train_and_evaluate(config, workdir)
    message = str(info.value)
    assert f'The checkpoint of step {step} in {workdir!r} cannot be read' in message, relative
    assert f'Move checkpoints/{step} (and checkpoints_table/*/{step}) aside' in message
    assert f'{os.path.join(workdir, relative)} ' in message, message  # The file, named.
    assert _snapshot(workdir) == before, relative
    shutil.rmtree(workdir)


def test_main_prints_one_error_line_for_a_cut_short_array_file(
  finished, fashion_mnist_data_dir, tmp_path
):
  """The issue's case through main.py: an array data file of the state cut short."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished['device'], workdir)
  (path,) = glob.glob(os.path.join(workdir, 'checkpoints/8/state/d/*'))
  _damage(path, 'truncate')
  before = _snapshot(workdir)
  proc = _main(
    workdir,
    'method=saf,smoke',
    fashion_mnist_data_dir,
    '--config.num_epochs=1',
    *_FLAGS,
    check=False,
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.split('\n') if line.startswith('error:')]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert f'The checkpoint of step 8 in {workdir!r} cannot be read' in errors[0]
  assert f'{os.path.relpath(path, workdir)} has ' in errors[0]  # Names the file and its size.
  assert 'Move checkpoints/8 (and checkpoints_table/*/8) aside' in errors[0]
  assert 'Traceback' not in proc.stderr
  assert _snapshot(workdir) == before


def test_a_save_killed_before_its_manifest_resumes_bit_exact(
  finished, fashion_mnist_data_dir, tmp_path
):
  """Orbax committed step 16, the run was killed before the manifest: the rerun moves
  step 16 aside, resumes from step 8 and ends like the run that never stopped."""
  reference = finished['host']
  workdir = str(tmp_path / 'killed')
  shutil.copytree(reference, workdir)
  os.remove(os.path.join(workdir, 'checkpoints/16', manifest.NAME))
  committed = _snapshot(os.path.join(workdir, 'checkpoints/16'))
  assert checkpoint.saved_steps(workdir) == [8, 16]
  assert checkpoint.complete_steps(workdir) == [8]  # What readers see.
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=2)  # A reader: skips it, moves nothing.
  assert ckpt.latest_state_step() == ckpt.latest_step() == 8
  ckpt.close()
  assert checkpoint.saved_steps(workdir) == [8, 16]
  train.train_and_evaluate(_config(fashion_mnist_data_dir, 'host', 2), workdir)
  assert _snapshot(os.path.join(workdir, 'checkpoints_unfinished/16')) == committed
  assert checkpoint.complete_steps(workdir) == checkpoint.saved_steps(workdir) == [8, 16]
  _assert_same_run(workdir, reference)


def test_a_first_save_killed_before_its_manifest_reruns_from_scratch(
  finished, fashion_mnist_data_dir, tmp_path
):
  """Orbax committed the run's only checkpoint (step 8), the run was killed before the
  manifest: the rerun moves it aside, starts afresh and ends like the run that never
  stopped (it used to refuse every rerun)."""
  reference = finished['device']
  workdir = str(tmp_path / 'killed')
  shutil.copytree(reference, workdir)
  os.remove(os.path.join(workdir, 'checkpoints/8', manifest.NAME))
  committed = _snapshot(os.path.join(workdir, 'checkpoints/8'))
  assert checkpoint.complete_steps(workdir) == []
  train.train_and_evaluate(_config(fashion_mnist_data_dir, 'device', 1), workdir)
  assert _snapshot(os.path.join(workdir, 'checkpoints_unfinished/8')) == committed
  assert checkpoint.complete_steps(workdir) == checkpoint.saved_steps(workdir) == [8]
  _assert_same_run(workdir, reference)


def test_saved_table_checks_a_host_tables_manifest(finished, tmp_path):
  """``checkpoint.saved_table`` (the table report's reader) refuses a changed table file."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished['host'], workdir)
  path = os.path.join(workdir, 'checkpoints_table/process_0/16/values.npy')
  with open(path, 'r+b') as f:  # One bit of the logits, same size: NumPy reads it as it is.
    f.seek(-1, os.SEEK_END)
    last = f.read(1)[0]
    f.seek(-1, os.SEEK_END)
    f.write(bytes([last ^ 1]))
  with pytest.raises(checkpoint.CheckpointError) as info:
    checkpoint.saved_table(workdir)
  assert f'{path} has the size in {manifest.NAME} but another CRC-32' in str(info.value)
  assert 'Move checkpoints/16 (and checkpoints_table/*/16) aside' in str(info.value)


def _can_mount_tmpfs(directory):
  command = f'mount -t tmpfs -o size=1m none {directory}'
  try:
    proc = subprocess.run(['unshare', '-m', 'sh', '-c', command], capture_output=True, timeout=60)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return proc.returncode == 0


def test_a_full_disk_gives_one_error_and_a_rerun_with_room_ends_like_an_uninterrupted_run(
  finished, fashion_mnist_data_dir, tmp_path
):
  """A real 350 KiB tmpfs: step 8's checkpoint (about 220 KiB with the rest of the workdir)
  fits, step 16's does not (measured: it fails in Orbax's writes, after the table's)."""
  mount = tmp_path / 'mnt'
  mount.mkdir()
  if not _can_mount_tmpfs(mount):
    pytest.skip('unshare -m and mount -t tmpfs need root (or a user namespace)')
  full, copy = f'{mount}/run', str(tmp_path / 'copy')
  command = [
    sys.executable,
    'main.py',
    '--config=configs/default.py:method=saf,smoke',
    f'--workdir={full}',
    f'--config.input.data_dir={fashion_mnist_data_dir}',
    '--config.num_epochs=2',
    '--config.method.saf.table_placement=host',
    *_FLAGS,
  ]
  # The tmpfs lives as long as the shell: run, then copy the workdir out, in one namespace.
  script = (
    f'mount -t tmpfs -o size=350k none {mount} && cd {conftest.REPO_ROOT} && '
    f'{shlex.join(command)}; code=$?; cp -a {full} {copy}; exit $code'
  )
  env = dict(os.environ)
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)
  proc = subprocess.run(
    ['unshare', '-m', 'sh', '-c', script], capture_output=True, text=True, env=env, timeout=900
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [line.rsplit('\r', 1)[-1].strip() for line in proc.stderr.split('\n')]
  errors = [line for line in lines if line.startswith('error:')]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert errors[0].startswith('error: The checkpoint of step 16 could not be saved: No space')
  assert f"No space left on device: '{full}" in errors[0]
  assert 'free there: ' in errors[0] and 'start from step 8' in errors[0]
  assert 'Traceback' not in proc.stderr
  progress = [line for line in lines if line.startswith('saf epoch ')]  # tqdm's bars.
  others = [line for line in lines if line and not line.startswith(('I ', 'W ', 'saf epoch '))]
  assert progress and len(others) < 15, others  # Measured: the error line alone.
  # Nothing of the failed save is left; step 8 is whole.
  assert not [path for path in _snapshot(copy) if 'tmp' in path]
  assert checkpoint.saved_steps(copy) == checkpoint.complete_steps(copy) == [8]
  assert os.listdir(os.path.join(copy, 'checkpoints_table', 'process_0')) == ['8']
  manifest.verify(os.path.join(copy, 'checkpoints', '8'))
  manifest.verify(os.path.join(copy, 'checkpoints_table', 'process_0', '8'))
  # With room, the same run resumes from step 8 and ends like the one that never stopped.
  train.train_and_evaluate(_config(fashion_mnist_data_dir, 'host', 2), copy)
  _assert_same_run(copy, finished['host'])


# Unit tests of saf_jax.manifest and of the Checkpointer's rotation and failed saves.


def _tree(directory):
  os.makedirs(os.path.join(directory, 'sub', 'deeper'))
  contents = {'a.bin': b'\x01' * 1000, 'sub/b.txt': b'hello', 'sub/deeper/c': b''}
  for name, data in contents.items():
    with open(os.path.join(directory, name), 'wb') as f:
      f.write(data)
  return contents


def test_manifest_lists_every_file_with_its_size_and_crc(tmp_path, monkeypatch):
  directory = str(tmp_path / 'ckpt')
  contents = _tree(directory)
  monkeypatch.setattr(manifest, 'CHUNK_BYTES', 7)  # Many chunks: the CRC is chained.
  manifest.write(directory)
  assert sorted(os.listdir(directory)) == ['a.bin', manifest.NAME, 'sub']  # No temporary.
  expected = {name: (len(data), zlib.crc32(data)) for name, data in contents.items()}
  assert manifest.read(directory) == expected
  with open(os.path.join(directory, manifest.NAME)) as f:
    document = json.load(f)
  assert document['version'] == 1 and document['checksum'] == 'crc32'
  assert document['files']['sub/b.txt'] == {'size': 5, 'crc32': f'{zlib.crc32(b"hello"):08x}'}
  manifest.verify(directory)


def test_manifest_names_the_changed_cut_short_or_missing_file(tmp_path):
  directory = str(tmp_path / 'ckpt')
  _tree(directory)
  manifest.write(directory)
  path = os.path.join(directory, 'a.bin')
  with open(path, 'r+b') as f:  # One byte changed, same size.
    f.seek(500)
    f.write(b'\x02')
  with pytest.raises(manifest.ManifestError, match=r'a\.bin has the size .* another CRC-32'):
    manifest.verify(directory)
  manifest.verify(directory, names=['sub/b.txt'])  # Only sizes checked for the others.
  os.truncate(path, 10)
  with pytest.raises(manifest.ManifestError, match=r'a\.bin has 10 bytes; .* lists 1000'):
    manifest.verify(directory, names=[])
  os.remove(os.path.join(directory, 'sub', 'b.txt'))
  with pytest.raises(OSError, match=r'a\.bin has 10 bytes.*\(and 1 more files\)$'):
    manifest.verify(directory)
  with open(path, 'wb') as f:
    f.write(b'\x01' * 1000)
  with pytest.raises(manifest.ManifestError, match=r'sub/b\.txt is missing \(listed in'):
    manifest.verify(directory)


def test_manifest_ignores_files_it_does_not_list_and_refuses_a_damaged_manifest(tmp_path):
  directory = str(tmp_path / 'ckpt')
  _tree(directory)
  manifest.write(directory)
  with open(os.path.join(directory, '.nfs0001'), 'wb') as f:  # E.g. NFS's own files.
    f.write(b'x')
  manifest.verify(directory)
  _damage(os.path.join(directory, manifest.NAME), 'zero')
  with pytest.raises(manifest.ManifestError, match=r'saf_manifest\.json is damaged'):
    manifest.verify(directory)
  os.remove(os.path.join(directory, manifest.NAME))
  with pytest.raises(manifest.ManifestError, match=r'saf_manifest\.json is missing'):
    manifest.verify(directory)
  manifest.verify_shared(directory, promise='sub/b.txt')  # No manifest, none promised.


def test_unfinished_saves_are_moved_aside_even_when_none_is_complete(tmp_path, monkeypatch):
  root = str(tmp_path / 'checkpoints')
  for step, promise in ((1, {}), (2, {'manifest': 1}), (3, {'manifest': 1})):
    os.makedirs(os.path.join(root, str(step), 'meta'))
    with open(os.path.join(root, str(step), 'meta', 'metadata'), 'w') as f:
      json.dump(promise, f)
  manifest.write(os.path.join(root, '2'))
  # 1: saved before manifests; 2: complete; 3: committed, but killed before its manifest.
  assert manifest.complete(root, 'meta/metadata') == [1, 2]
  target = str(tmp_path / 'checkpoints_unfinished')
  os.makedirs(os.path.join(target, '3'))  # Taken by an earlier move.
  assert manifest.move_aside_unfinished(root, 'meta/metadata', target) == [3]
  assert manifest.steps(root) == [1, 2]
  assert sorted(os.listdir(target)) == ['3', '3.2']
  # Only unfinished saves (a kill before the first manifest): moved too; the run starts afresh.
  only = str(tmp_path / 'only')
  shutil.copytree(os.path.join(target, '3.2'), os.path.join(only, '3'))
  warnings = []
  monkeypatch.setattr(manifest.logging, 'warning', lambda *a: warnings.append(a[0] % a[1:]))
  assert manifest.move_aside_unfinished(only, 'meta/metadata', target) == [3]
  assert manifest.steps(only) == [] and sorted(os.listdir(target)) == ['3', '3.2', '3.3']
  assert len(warnings) == 1 and f'moved it to {os.path.join(target, "3.3")}; ' in warnings[0]
  assert 'no complete checkpoint is left, so the run starts afresh' in warnings[0]


def test_a_refused_write_is_found_in_the_exception_chain():
  where = os.getcwd()
  try:
    try:
      raise OSError(errno.EROFS, 'Read-only file system', '/ro/x')
    except OSError as e:
      raise RuntimeError('Orbax failed') from e
  except RuntimeError as e:
    assert manifest.refused_write(e, where).startswith("Read-only file system: '/ro/x' (free")
  tensorstore = ValueError('Error writing "/w/d/1f": [OS error 28: No space left on device]')
  assert manifest.refused_write(tensorstore, where).startswith("No space left on device: '/w/d")
  short = OSError('10240 requested and 6112 written')  # NumPy's tofile on a full disk.
  assert manifest.refused_write(short, where).startswith('No space left on device (10240')
  assert manifest.refused_write(ValueError('a shape mismatch'), where) is None
  assert manifest.refused_write(OSError(errno.EIO, 'I/O error'), where) is None


def test_the_echoes_of_abandoned_writes_are_dropped(monkeypatch, caplog):
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  manifest.quiet_abandoned_writes()
  closed, other = (
    types.SimpleNamespace(exc_value=RuntimeError(m)) for m in ('Event loop is closed', 'x')
  )
  sys.unraisablehook(closed)
  sys.unraisablehook(other)
  assert seen == [other]
  bug = ValueError('a bug')
  with caplog.at_level(logging.ERROR, logger='asyncio'):
    for error in (OSError(errno.ENOSPC, 'No space left on device'), bug):
      try:
        raise error
      except Exception:
        logging.getLogger('asyncio').error('Task exception was never retrieved', exc_info=True)
  assert [record.exc_info[1] for record in caplog.records] == [bug]


def _save(ckpt, step):
  state = {'w': np.full(3, step, np.float32)}
  ckpt.save(step, state, None, {'step': step, 'epoch': step})


def test_rotation_keeps_the_newest_complete_checkpoints_and_old_ones_are_read_unchecked(tmp_path):
  workdir = str(tmp_path)
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=2, remove_unfinished=True)
  for step in (1, 2, 3):
    _save(ckpt, step)
  ckpt.close()
  assert checkpoint.saved_steps(workdir) == [2, 3]
  # Step 3 as saved before manifests: no manifest, and a meta without the promise.
  os.remove(os.path.join(workdir, 'checkpoints', '3', manifest.NAME))
  meta_path = os.path.join(workdir, 'checkpoints', '3', 'meta', 'metadata')
  with open(meta_path) as f:
    meta = json.load(f)
  assert meta.pop('manifest') == 1
  with open(meta_path, 'w') as f:
    json.dump(meta, f)
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=2, remove_unfinished=True)
  assert ckpt.latest_step() == 3
  state, _, meta = ckpt.restore(3, None, None)
  np.testing.assert_array_equal(state['w'], np.full(3, 3, np.float32))
  assert meta == {'step': 3, 'epoch': 3}
  _save(ckpt, 4)
  ckpt.close()
  assert checkpoint.saved_steps(workdir) == [3, 4]


def test_a_save_whose_manifest_fails_is_removed_and_the_previous_one_stays(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=2, remove_unfinished=True)
  _save(ckpt, 1)
  before = _snapshot(workdir)

  def full(directory):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(directory, 'x'))

  monkeypatch.setattr(manifest, 'write_shared', full)
  with pytest.raises(checkpoint.CheckpointError, match=r'step 2 could not be saved: No space'):
    _save(ckpt, 2)
  assert _snapshot(workdir) == before

  def bug(directory):
    raise ValueError('a bug')

  monkeypatch.setattr(manifest, 'write_shared', bug)
  with pytest.raises(ValueError, match='a bug'):  # Any other error: raised as it is.
    _save(ckpt, 2)
  assert _snapshot(workdir) == before
  monkeypatch.undo()
  assert ckpt.latest_step() == 1
  _save(ckpt, 2)
  ckpt.close()
  assert checkpoint.saved_steps(workdir) == checkpoint.complete_steps(workdir) == [1, 2]


def test_a_save_that_fails_after_orbaxs_commit_leaves_no_step_without_a_manifest(
  tmp_path, monkeypatch
):
  """Orbax committed (renamed) step 2, then its save raised: step 2 is removed, as the
  message says; a declined save never removes the step that was there before it."""
  workdir = str(tmp_path)
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=2, remove_unfinished=True)
  _save(ckpt, 1)
  before = _snapshot(workdir)
  commit = ckpt._state.save

  def full_after_commit(step, **kwargs):
    assert commit(step, **kwargs)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(workdir, 'x'))

  monkeypatch.setattr(ckpt._state, 'save', full_after_commit)
  with pytest.raises(checkpoint.CheckpointError, match='Its partial files were removed'):
    _save(ckpt, 2)
  assert _snapshot(workdir) == before
  monkeypatch.undo()
  _save(ckpt, 2)
  saved = _snapshot(workdir)
  with pytest.raises(checkpoint.CheckpointError, match='Orbax declined to save step 2'):
    _save(ckpt, 2)
  assert _snapshot(workdir) == saved
  ckpt.close()
  assert checkpoint.saved_steps(workdir) == checkpoint.complete_steps(workdir) == [1, 2]

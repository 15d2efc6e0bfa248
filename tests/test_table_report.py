"""The table report: ImageNet bytes by layout, storage error on a real SAF run's saved logits."""

import os

import numpy as np
import pytest

from configs import default
from saf_jax import checkpoint, losses, train
from saf_jax.tools import table_report

pytestmark = pytest.mark.usefixtures('fast_compile')


def test_imagenet_bytes_by_layout():
  rows = {r['layout']: r for r in table_report.imagenet_bytes(E_tilde=3, topk=10, processes=8)}
  n, per = 1_281_167, 1_281_167 // 8
  written = 3 * n * 4  # int32 written-epoch bookkeeping.
  assert rows['float32']['bytes'] == 3 * n * 1000 * 4 + written
  assert rows['bfloat16']['bytes'] == 3 * n * 1000 * 2 + written
  # Per row: 10 float32 logits, 10 uint16 class ids, one float32 tail log-sum-exp.
  assert rows['top-10 (float32 values)']['bytes'] == 3 * n * (40 + 20 + 4) + written
  # int8: 1000 uint8 codes, float32 row_min and row_scale.
  assert rows['int8']['bytes'] == 3 * n * (1000 + 4 + 4) + written == 3_889_623_012
  assert rows['int8']['bytes_per_process'] == 3 * per * (1000 + 4 + 4 + 4)
  # Top-10 int8: 10 codes, 10 uint16 ids, row_min, row_scale and rest_lse.
  assert rows['top-10 (int8 values)']['bytes'] == 3 * n * (10 + 20 + 4 + 4 + 4) + written
  assert rows['float32']['bytes_per_process'] == 3 * per * (4000 + 4)
  # The paper's 14,643 MB (Table 2) is our float32 table's values in MiB, to 0.2%.
  assert abs(3 * n * 1000 * 4 / 2**20 / table_report.PAPER_IMAGENET_MB - 1) < 2e-3


def _train(data_dir, workdir, **saf):
  config = default.get_config('method=saf,smoke')
  config.num_epochs = 3
  config.input.data_dir = data_dir
  config.analysis.sharpness_every_epochs = 0
  config.method.saf.update(saf)
  train.train_and_evaluate(config, workdir)
  return workdir, config


@pytest.fixture(scope='module')
def saf_run(fashion_mnist_data_dir, tmp_path_factory):
  return _train(fashion_mnist_data_dir, str(tmp_path_factory.mktemp('saf')))


def test_storage_error_on_the_runs_own_logits(saf_run):
  workdir, config = saf_run
  report = table_report.run_error(workdir, [1, 3, 9])
  # E_tilde = 2: the last table holds epochs 2 and 3 for every example of the 512.
  assert (report['target_epoch'], report['student_epoch']) == (2, 3)
  assert report['num_examples'] == 512 and report['table_dtype'] == 'float32'
  errors = report['errors']
  assert list(errors) == ['float32', 'bfloat16', 'int8', 'top-1', 'top-3', 'top-9']
  # The full loss is the trajectory loss of epoch-2 targets for epoch-3 logits.
  # The default placement keeps this small table on the device, in the checkpoint.
  assert not os.path.exists(os.path.join(workdir, 'checkpoints_table'))
  _, arrays = checkpoint.saved_table(workdir)
  values = arrays['values']
  want = float(losses.trajectory_loss(values[1], values[0], temperature=config.method.saf.tau))
  for stats in errors.values():
    np.testing.assert_allclose(stats['trajectory_loss_full'], want, rtol=1e-5)
  assert errors['float32']['abs_error'] == 0 and errors['float32']['grad_rel_error'] == 0
  # Keeping more logits can only bring the target closer; k = K - 1 is exact.
  assert errors['top-1']['mean_kl_target'] > errors['top-3']['mean_kl_target'] > 0
  assert errors['top-9']['abs_error'] < 1e-6 and errors['top-9']['mean_kl_target'] < 1e-9
  # Rounding every logit (bfloat16, int8) costs far less than dropping the tail (top-1).
  top1 = errors['top-1']
  for dtype in ('bfloat16', 'int8'):
    stats = errors[dtype]
    assert 0 < stats['rel_error'] < 1e-2, dtype
    assert 0 < stats['grad_rel_error'] < 0.1, dtype
    assert stats['rel_error'] < top1['rel_error'] / 10, dtype
    assert stats['grad_rel_error'] < top1['grad_rel_error'] / 10, dtype
    assert stats['mean_kl_target'] < top1['mean_kl_target'] / 100, dtype


def test_run_error_reads_an_int8_run(fashion_mnist_data_dir, tmp_path):
  workdir, config = _train(
    fashion_mnist_data_dir, str(tmp_path), table_dtype='int8', table_placement='host'
  )
  report = table_report.run_error(workdir, [3], dtypes=('float32', 'int8'))
  assert report['table_dtype'] == 'int8' and report['num_examples'] == 512
  # The targets are the run's stored logits, dequantised: codes * row_scale + row_min.
  saved = os.path.join(workdir, 'checkpoints_table', 'process_0', '24')
  arrays = {n: np.load(os.path.join(saved, f'{n}.npy')) for n in ('values', 'row_min', 'row_scale')}
  assert arrays['values'].dtype == np.uint8
  logits = arrays['values'] * arrays['row_scale'][..., None] + arrays['row_min'][..., None]
  want = float(losses.trajectory_loss(logits[1], logits[0], temperature=config.method.saf.tau))
  errors = report['errors']
  # float32 on two paths (the report's batched loss, this direct one): 1.8e-5 apart.
  np.testing.assert_allclose(errors['float32']['trajectory_loss_full'], want, rtol=1e-4)
  # Quantising already quantised logits again finds the same codes.
  assert errors['int8']['rel_error'] < 1e-6 < errors['top-3']['rel_error']

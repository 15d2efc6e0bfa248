"""The table report: ImageNet bytes by layout, top-k error on a real SAF run's saved logits."""

import os

import numpy as np
import pytest

from configs import default
from saf_jax import losses, table_report, train

pytestmark = pytest.mark.usefixtures('fast_compile')


def test_imagenet_bytes_by_layout():
  rows = {r['layout']: r for r in table_report.imagenet_bytes(E_tilde=3, topk=10, processes=8)}
  n, per = 1_281_167, 1_281_167 // 8
  written = 3 * n * 4  # int32 written-epoch bookkeeping.
  assert rows['float32']['bytes'] == 3 * n * 1000 * 4 + written
  assert rows['bfloat16']['bytes'] == 3 * n * 1000 * 2 + written
  # Per row: 10 float32 logits, 10 uint16 class ids, one float32 tail log-sum-exp.
  assert rows['top-10 (float32 values)']['bytes'] == 3 * n * (40 + 20 + 4) + written
  assert rows['float32']['bytes_per_process'] == 3 * per * (4000 + 4)
  # The paper's 14,643 MB (Table 2) is our float32 table's values in MiB, to 0.2%.
  assert abs(3 * n * 1000 * 4 / 2**20 / table_report.PAPER_IMAGENET_MB - 1) < 2e-3


@pytest.fixture(scope='module')
def saf_run(fashion_mnist_data_dir, tmp_path_factory):
  config = default.get_config('method=saf,smoke')
  config.num_epochs = 3
  config.input.data_dir = fashion_mnist_data_dir
  config.analysis.sharpness_every_epochs = 0
  workdir = str(tmp_path_factory.mktemp('saf'))
  train.train_and_evaluate(config, workdir)
  return workdir, config


def test_topk_error_on_the_runs_own_logits(saf_run):
  workdir, config = saf_run
  report = table_report.run_error(workdir, [1, 3, 9])
  # E_tilde = 2: the last table holds epochs 2 and 3 for every example of the 512.
  assert (report['target_epoch'], report['student_epoch']) == (2, 3)
  assert report['num_examples'] == 512
  errors = report['errors']
  # The full loss is the trajectory loss of epoch-2 targets for epoch-3 logits.
  saved = os.path.join(workdir, 'checkpoints_table', 'process_0', '24')
  values = np.load(os.path.join(saved, 'values.npy'))
  want = float(losses.trajectory_loss(values[1], values[0], temperature=config.method.saf.tau))
  np.testing.assert_allclose(errors[1]['trajectory_loss_full'], want, rtol=1e-5)
  # Keeping more logits can only bring the target closer; k = K - 1 is exact.
  assert errors[1]['mean_kl_target'] > errors[3]['mean_kl_target'] > 0
  assert errors[9]['abs_error'] < 1e-6 and errors[9]['mean_kl_target'] < 1e-9

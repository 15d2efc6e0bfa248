r"""SAF's logit-table memory per layout, and each layout's error on a run's real logits.

Two reports:

* **Bytes.** ``table_nbytes`` for ImageNet-1k (1,281,167 training images, 1000 classes)
  with :math:`\tilde E = 3`, the setting of Table 2 of Du et al. 2022 (14,643 MB for the
  official code), in float32, bfloat16, int8 and top-k, in total and per process when ``P``
  processes share the table (each holds ``N / P`` rows, ``partition.process_partition``).
* **Error.** With ``--workdir`` of a SAF run, its last saved table holds real training
  logits of two epochs. The older epoch's logits are the targets and the newer epoch's the
  student, and ``logit_table.storage_error`` gives how far the trajectory loss (Eq. 9) and
  its gradient move when the targets are stored in each full-storage ``--dtypes`` and as
  top-k (float32 values) for each ``--k``, against the targets as saved.

Run::

  python -m saf_jax.tools.table_report --workdir runs/default --k 1,2,3,5
"""

import numpy as np
from absl import app, flags

from saf_jax import checkpoint, config_upgrade, guard, logit_table

IMAGENET_TRAIN = 1_281_167
IMAGENET_CLASSES = 1000
PAPER_IMAGENET_MB = 14_643  # Table 2 of Du et al. 2022: the official code's table.

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'A SAF run whose saved table to measure the error on.')
  flags.DEFINE_list('k', ['1', '2', '3', '5'], 'Logits kept per example for the error.')
  flags.DEFINE_list('dtypes', ['float32', 'bfloat16', 'int8'], 'Full-storage dtypes for the error.')
  flags.DEFINE_integer('topk', 10, 'k of the top-k row of the ImageNet bytes table.')
  flags.DEFINE_integer('E_tilde', 3, 'E_tilde of the ImageNet bytes table.')
  flags.DEFINE_integer('processes', 8, 'Processes sharing the ImageNet table (per-process bytes).')


def imagenet_bytes(*, E_tilde: int, topk: int, processes: int) -> list[dict]:
  """Rows ``{'layout', 'bytes', 'bytes_per_process'}`` for ImageNet-1k.

  Raises:
    ValueError: if ``processes < 1`` or ``topk`` is not in [1, 1000).
  """
  rows = []
  per_process = IMAGENET_TRAIN // processes  # partition.process_partition's block.
  for name, dtype, k in (
    ('float32', 'float32', 0),
    ('bfloat16', 'bfloat16', 0),
    ('int8', 'int8', 0),
    (f'top-{topk} (float32 values)', 'float32', topk),
    (f'top-{topk} (bfloat16 values)', 'bfloat16', topk),
    (f'top-{topk} (int8 values)', 'int8', topk),
  ):

    def size(n, dtype=dtype, k=k):
      return logit_table.table_nbytes(n, IMAGENET_CLASSES, E_tilde=E_tilde, dtype=dtype, topk=k)

    rows.append(
      {'layout': name, 'bytes': size(IMAGENET_TRAIN), 'bytes_per_process': size(per_process)}
    )
  return rows


def run_error(
  workdir: str, ks: list[int], dtypes: tuple[str, ...] = ('float32', 'bfloat16', 'int8')
) -> dict:
  """Each layout's error on the last table saved by the SAF run in ``workdir``.

  The saved table is read back as the run stored it (``config.method.saf.table_dtype``),
  so those logits are the "full" targets every layout is measured against.

  Args:
    workdir: a SAF run's workdir, with ``config.json`` and a saved table
      (``checkpoint.saved_table``: on the host or the devices).
    ks: top-k sizes to measure (float32 values), each in [1, num_classes).
    dtypes: full-storage dtypes to measure, each 'float32', 'bfloat16' or 'int8'.

  Returns:
    ``{'target_epoch', 'student_epoch', 'num_examples', 'tau', 'table_dtype', 'errors'}``;
    ``errors`` maps a layout name (each dtype, then ``'top-<k>'``) to
    ``logit_table.storage_error``'s dict, in that order.

  Raises:
    ValueError: if the run has no saved full-logit SAF table with two written epochs, or
      on a ``k`` or dtype that ``logit_table.storage_error`` rejects.
  """
  config = config_upgrade.upgrade_config(guard.read_recorded(guard.config_path(workdir))[0])
  saved, arrays = checkpoint.saved_table(workdir)
  if 'values' not in arrays:
    raise ValueError(f'The table in {saved!r} is not stored as full logits (table_topk > 0).')
  saf = config['method']['saf']
  table_dtype = saf['table_dtype']
  E_tilde, num, num_classes = arrays['values'].shape
  table = logit_table.LogitTable(num, num_classes, E_tilde=E_tilde, dtype=table_dtype)
  table.load_state_dict(arrays)
  written = arrays['written_epoch']
  epochs = sorted({int(e) for e in np.unique(written) if e > 0})
  if len(epochs) < 2:
    raise ValueError(f'The table in {saved!r} holds fewer than two written epochs.')
  old, new = epochs[-2], epochs[-1]
  ids = np.flatnonzero((written[old % E_tilde] == old) & (written[new % E_tilde] == new))
  targets, _ = table.gather(ids, epoch=old + E_tilde)  # The rows written in epoch `old`.
  student, _ = table.gather(ids, epoch=new + E_tilde)
  table.close()
  tau = saf['tau']
  errors = {}
  for dtype in dtypes:
    errors[dtype] = logit_table.storage_error(targets, student, tau=tau, dtype=dtype)
  for k in ks:
    errors[f'top-{k}'] = logit_table.storage_error(targets, student, tau=tau, topk=k)
  return {
    'target_epoch': old,
    'student_epoch': new,
    'num_examples': int(ids.size),
    'tau': tau,
    'table_dtype': table_dtype,
    'errors': errors,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    ks = [int(k) for k in FLAGS.k]
  except ValueError as e:
    raise app.UsageError(f'--k must be a list of integers, got {FLAGS.k}.') from e
  if FLAGS.processes < 1:
    raise app.UsageError(f'--processes must be >= 1, got {FLAGS.processes}.')
  print(
    f'ImageNet-1k SAF table, E_tilde={FLAGS.E_tilde}, {IMAGENET_TRAIN} images, '
    f'{IMAGENET_CLASSES} classes (official code: {PAPER_IMAGENET_MB} MB, Table 2):'
  )
  print(f'  {"layout":<28} {"MB":>10} {"MiB":>10} {f"MB/process (P={FLAGS.processes})":>22}')
  for row in imagenet_bytes(E_tilde=FLAGS.E_tilde, topk=FLAGS.topk, processes=FLAGS.processes):
    print(
      f'  {row["layout"]:<28} {row["bytes"] / 1e6:>10.1f} {row["bytes"] / 2**20:>10.1f} '
      f'{row["bytes_per_process"] / 1e6:>22.1f}'
    )
  if FLAGS.workdir is None:
    return
  report = run_error(FLAGS.workdir, ks, tuple(FLAGS.dtypes))
  full = next(iter(report['errors'].values()))['trajectory_loss_full']
  print(
    f'\nStorage error on {report["num_examples"]} real training logits of {FLAGS.workdir}\n'
    f'  (saved as {report["table_dtype"]}; targets: epoch {report["target_epoch"]}, '
    f'student: epoch {report["student_epoch"]}; tau={report["tau"]}).\n'
    f'  L_tra: trajectory loss (Eq. 9) with the stored targets; {full:.5f} with the saved ones.\n'
    '  p, p^: softened saved and stored targets, q: softened student;\n'
    "  grad rel err: |p^ - p|_1 / |q - p|_1, the gradient's change over the gradient."
  )
  print(
    f'  {"storage":<8} {"L_tra":>9} {"abs err":>9} {"rel err":>9} {"KL(p||p^)":>10} '
    f'{"grad rel err":>12}'
  )
  for name, e in report['errors'].items():
    print(
      f'  {name:<8} {e["trajectory_loss_stored"]:>9.5f} {e["abs_error"]:>9.2e} '
      f'{e["rel_error"]:>9.2e} {e["mean_kl_target"]:>10.2e} {e["grad_rel_error"]:>12.2%}'
    )


if __name__ == '__main__':
  _define_flags()
  app.run(main)

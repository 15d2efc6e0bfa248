r"""Trains and evaluates an image classifier with SAF, MESA or vanilla SGD.

  python main.py --config configs/default.py --workdir runs/default
  python main.py --config configs/default.py:method=mesa --workdir runs/mesa \
      --config.optimizer.lr=0.1
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for config.json, metrics.jsonl, checkpoints.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Orbax logs every file it writes at INFO; keep the console to our own progress lines.
  logging.get_absl_handler().addFilter(lambda record: 'orbax' not in record.pathname)
  # TensorFlow only feeds data: keep it off any accelerator so JAX owns its memory.
  import tensorflow as tf

  tf.config.set_visible_devices([], 'GPU')
  import jax

  dist = FLAGS.config.distributed
  fields = (dist.coordinator_address, dist.num_processes, dist.process_id)
  if (
    dist.enabled or any(f is not None for f in fields) or os.environ.get('JAX_COORDINATOR_ADDRESS')
  ):
    # Cross-process collectives for the CPU backend (CPU-only clusters, the 2-process test);
    # accelerators use their own.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(dist.coordinator_address, dist.num_processes, dist.process_id)

  from saf_jax import train

  logging.info(
    'JAX process %d of %d, %d local of %d devices (%s).',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
  )
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)

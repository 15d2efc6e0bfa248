r"""Trains and evaluates an image classifier with SAF, MESA or vanilla SGD.

  python main.py --config configs/default.py --workdir runs/default
  python main.py --config configs/default.py:method=mesa --workdir runs/mesa \
      --config.optimizer.lr=0.1

A mistake in the command (a bad or unknown config field, a missing dataset, a workdir of
another run) prints one line, ``error: <message>``, on stderr and exits with status 2,
before anything is compiled or written. ``--verbose`` (or ``SAF_JAX_VERBOSE=1``) shows
the traceback instead.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for config.json, metrics.jsonl, checkpoints.')
flags.DEFINE_bool('verbose', False, 'Show the traceback of an error, not one line.')
flags.mark_flags_as_required(['config', 'workdir'])

# What a command's mistakes raise (ValueError covers CheckpointError; FileNotFoundError
# covers a missing dataset), and a non-finite loss that stops training.
_USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, flags.Error)


def _verbose(argv) -> bool:
  return os.environ.get('SAF_JAX_VERBOSE', '') not in ('', '0') or any(
    a in ('--verbose', '--verbose=true', '--verbose=True') for a in argv
  )


def _one_line(error: BaseException) -> str:
  """The message of ``error`` on one line; an unknown config field with its suggestion."""
  if isinstance(error, AttributeError | KeyError):  # ml_collections: an unknown field.
    inner = error
    while isinstance(inner, BaseException) and inner.args:
      inner = inner.args[0]
    name, _, hint = str(inner).partition('\n')
    return f'--config has no field {name}. {hint}'.strip()
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if isinstance(error, flags.Error) and 'Traceback' in str(error):
    # A config file's get_config raised: its own message is the last line.
    flag = lines[0].split(': ', 1)[0]
    return f'{flag}: {lines[-1].split(": ", 1)[-1]}'
  if isinstance(error, OSError) and 'Failed loading config file' in str(error):
    return f'--config: {lines[-1]}'
  return ' '.join(lines)


def _fail(error: BaseException, argv) -> None:
  if _verbose(argv):
    raise error
  print(f'error: {_one_line(error)} (--verbose shows the traceback)', file=sys.stderr, flush=True)
  sys.exit(2)


def _parse_flags(argv):
  """absl's flag parsing, with config mistakes as one line."""
  try:
    remaining = FLAGS(argv)
    FLAGS.config.get('seed')  # A config file that failed to load raises only when read.
    return remaining
  except (*_USER_ERRORS, OSError, AttributeError, KeyError) as e:
    _fail(e, argv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # TensorFlow quietly and off the accelerators; the console keeps to our own lines.
  from saf_jax.data import tf_runtime

  tf_runtime.quiet_console()
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
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except _USER_ERRORS as e:
    _fail(e, sys.argv)
  except KeyboardInterrupt:  # Ctrl-C (SIGINT): nothing more is saved; the lock is released.
    if _verbose(sys.argv):
      raise
    print(
      'interrupted (SIGINT); rerun the same command to resume from the latest checkpoint.',
      file=sys.stderr,
      flush=True,
    )
    sys.exit(130)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)

"""TensorFlow and TFDS for the input pipelines: imported once, quietly, off the accelerators.

saf_jax uses TensorFlow only to feed batches. Importing it prints about ten lines that say
nothing about the run (``WARNING: All log messages before absl::InitializeLog()``, oneDNN's
and the CPU-feature notice, twice); ``TF_CPP_MIN_LOG_LEVEL`` does not reach them, because
they come before TensorFlow reads it. The data modules import TensorFlow from here, so the
first import drops exactly those lines and passes anything else on to stderr. TensorFlow
keeps its defaults (oneDNN stays on: the pipelines' numbers do not change).

``tf.config.set_visible_devices([], 'GPU')`` keeps TensorFlow off the GPUs, so that JAX owns
their memory.
"""

import contextlib
import logging as std_logging
import os
import re
import sys
import tempfile

from absl import logging

# The start-up lines of TensorFlow's C++ runtime, which it writes before logging starts.
_STARTUP_NOISE = re.compile(
  r'WARNING: All log messages before absl::InitializeLog\(\) is called'
  r'|[IW]\d{4} [\d:. ]+\d+ (port|cpu_feature_guard|cudart_stub)\.cc:\d+\]'
  r'|To enable the following instructions: .* rebuild TensorFlow'
  # The CUDA build of TensorFlow on a machine without a GPU driver (a CPU or TPU runtime).
  r'|E\d{4} [\d:. ]+\d+ cuda_platform\.cc:\d+\] failed call to cuInit'
)


# A console line's prefix: level initial, wall-clock time, the file that logged.
_CONSOLE_FORMAT = '%(levelname).1s %(asctime)s %(filename)s] %(message)s'


@contextlib.contextmanager
def _stderr_without_startup_noise():
  """Captures file descriptor 2 (C++ writes too) and re-emits all but ``_STARTUP_NOISE``."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode(errors='replace').splitlines(keepends=True)
      kept = ''.join(line for line in lines if not _STARTUP_NOISE.match(line))
      if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()


with _stderr_without_startup_noise():  # Nothing to drop where they were imported already.
  import tensorflow as tf
  import tensorflow_datasets as tfds

  try:
    # JAX owns the accelerators; TensorFlow only feeds batches from host memory.
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError as e:  # TF was initialised before this import; it may hold a GPU.
    logging.warning('Could not hide GPUs from TensorFlow: %s', e)


def quiet_console() -> None:
  """Keeps a command-line tool's console to saf_jax's own lines.

  Drops the absl log records of Orbax (every file it writes), of JAX's backend search (each
  accelerator it does not find) and TFDS's INFO and WARNING records (which files it reads),
  shortens absl's line prefix to ``I 23:42:38 train.py]``, and turns off TFDS's progress
  bars. Errors still show. For ``main.py``, the tools and the
  notebook; a library import changes none of this.
  """

  def keep(record) -> bool:
    path = record.pathname
    if 'orbax' in path or 'xla_bridge' in path:
      return False
    return 'tensorflow_datasets' not in path or record.levelno >= std_logging.ERROR

  # absl's handler sees every record under app.run (JAX logs through the root logger); a
  # notebook prints the 'absl' logger's records through its own handler.
  handler = logging.get_absl_handler()
  handler.addFilter(keep)
  std_logging.getLogger('absl').addFilter(keep)
  # 'I 23:42:38 train.py] ...': absl's own prefix (date, microseconds, thread id, line) takes
  # 52 of a console line's characters.
  handler.setFormatter(std_logging.Formatter(_CONSOLE_FORMAT, '%H:%M:%S'))
  tfds.disable_progress_bar()

"""Moved: this tool is now ``python -m saf_jax.tools.prepare_data``."""

import sys

_NAME = 'prepare_data'
_MOVED = f'saf_jax.{_NAME} moved to saf_jax.tools.{_NAME}: run python -m saf_jax.tools.{_NAME}'
if __name__ == '__main__':
  sys.exit(f'error: {_MOVED} (same flags).')
raise ImportError(f'{_MOVED}, or import it from saf_jax.tools.')

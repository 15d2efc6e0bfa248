"""A TFDS dataset ready to read: prepared once, offline where possible, or a clear error."""

import os
import socket
import urllib.parse

from absl import logging

from saf_jax.data import base, fashion_mnist
from saf_jax.data.tf_runtime import tfds

# Seconds to wait for a TCP connection to a download host before calling it unreachable. TFDS's
# downloader retries ten times with backoff and sets no connect timeout, so without this check an
# offline machine spends minutes before failing.
_PROBE_TIMEOUT_S = 5.0


def tfds_data_dir() -> str:
  """TFDS's default data_dir (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)."""
  return tfds.core.constants.DATA_DIR


def ready_builder(
  name: str,
  *,
  data_dir: str | None,
  fashion_mnist_idx_dir: str = base.FASHION_MNIST_IDX_DIR,
  process_count: int = 1,
) -> tfds.core.DatasetBuilder:
  """Returns a builder whose splits can be read, preparing the dataset if needed.

  Fashion-MNIST is written from Debian's IDX files; a dataset with a manual download
  (ImageNet) is prepared from ``<data_dir>/downloads/manual`` as TFDS documents, when its
  files are there and ``process_count`` is 1; any other is downloaded.

  Raises:
    base.DataNotFoundError: if the dataset is not prepared and cannot be, saying what to do.
  """
  builder = tfds.builder(name, data_dir=data_dir)
  if _is_readable(builder):
    return builder
  data_dir_root = os.fspath(builder.data_dir_root)
  manual_dir = os.path.join(data_dir_root, 'downloads', 'manual')
  if name == 'fashion_mnist' and fashion_mnist.has_idx_files(fashion_mnist_idx_dir):
    fashion_mnist.store(builder, idx_dir=fashion_mnist_idx_dir)
    builder = tfds.builder(name, data_dir=data_dir)
  elif builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    if process_count > 1 or not (os.path.isdir(manual_dir) and os.listdir(manual_dir)):
      # Several processes would each prepare it for hours and race to rename the result.
      once = ' Prepare it once before a multi-process run.' if process_count > 1 else ''
      raise base.DataNotFoundError(
        f'Dataset {name!r} is not prepared in data_dir {data_dir_root!r}.{once} '
        + _how_to_provide(name, data_dir_root, fashion_mnist_idx_dir)
      )
    # No network: TFDS reads the archives in manual_dir (its checksums list a web host
    # that a manual download never contacts).
    logging.info(
      'Preparing %s in %s from the manual download in %s.', name, data_dir_root, manual_dir
    )
    _prepare(builder, fashion_mnist_idx_dir)
  else:
    unreachable = _unreachable_hosts(builder)
    if unreachable:
      raise base.DataNotFoundError(
        f'Dataset {name!r} is not prepared in data_dir {data_dir_root!r}, and its '
        f'download hosts {unreachable} cannot be reached from here. '
        + _how_to_provide(name, data_dir_root, fashion_mnist_idx_dir)
      )
    logging.info('Downloading and preparing %s in %s.', name, data_dir_root)
    _prepare(builder, fashion_mnist_idx_dir)
  if not _is_readable(builder):
    raise base.DataNotFoundError(
      f'Dataset {name!r} is still not readable in data_dir {data_dir_root!r} after '
      'preparing it. ' + _how_to_provide(name, data_dir_root, fashion_mnist_idx_dir)
    )
  return builder


def _prepare(builder: tfds.core.DatasetBuilder, fashion_mnist_idx_dir: str) -> None:
  """``builder.download_and_prepare()``, any failure raised as ``base.DataNotFoundError``."""
  try:
    builder.download_and_prepare()
  except Exception as e:  # Any failure (network, checksum, archive, disk) means no data.
    data_dir_root = os.fspath(builder.data_dir_root)
    raise base.DataNotFoundError(
      f'Dataset {builder.name!r} is not prepared in data_dir {data_dir_root!r} and '
      f'download_and_prepare failed: {e} '
      + _how_to_provide(builder.name, data_dir_root, fashion_mnist_idx_dir)
    ) from e


def _is_readable(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether ``builder.as_dataset`` can serve the train split.

  ``is_prepared()`` alone is not enough: under ``tfds.testing.mock_data`` it is False while
  ``as_dataset`` serves fake examples, and tests rely on that.
  """
  if builder.is_prepared():
    return True
  try:
    builder.as_dataset(split='train')
  except AssertionError:  # TFDS's "could not find data in <data_dir>" error.
    return False
  return True


def _how_to_provide(name: str, data_dir_root: str, fashion_mnist_idx_dir: str) -> str:
  """The one command that makes ``name`` available, as a sentence."""
  if name == 'fashion_mnist':
    return (
      f'Install it with `apt-get install -y dataset-fashion-mnist` (IDX files in '
      f'{fashion_mnist_idx_dir}); it is converted to TFDS on the next run.'
    )
  instructions = tfds.builder_cls(name).MANUAL_DOWNLOAD_INSTRUCTIONS
  if instructions:
    manual_dir = os.path.join(data_dir_root, 'downloads', 'manual')
    return (
      f'It needs a manual download: {" ".join(instructions.split())} Put the files in '
      f'{manual_dir}, then run `{_prepare_command(name, data_dir_root)}` (offline; hours '
      'for ImageNet; a one-process training run does the same).'
    )
  return (
    f'On a machine with internet run `{_prepare_command(name, data_dir_root)}`, then '
    f'copy {os.path.join(data_dir_root, name)} to the same path here.'
  )


def _prepare_command(name: str, data_dir_root: str) -> str:
  return f'python -m saf_jax.tools.prepare_data --dataset={name} --data_dir={data_dir_root}'


def _unreachable_hosts(builder: tfds.core.DatasetBuilder) -> list[str]:
  """Download hosts of ``builder`` that refuse a TCP connection; empty if any answers.

  Returns an empty list too when the builder lists no download URLs, so that
  ``download_and_prepare`` is tried (and reports its own error).
  """
  hosts = set()
  for url in builder.url_infos or {}:
    parsed = urllib.parse.urlsplit(url)
    if parsed.hostname:
      default_port = 443 if parsed.scheme == 'https' else 80
      hosts.add((parsed.hostname, parsed.port or default_port))
  unreachable = []
  for host, port in sorted(hosts):
    try:
      socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
    except OSError:
      unreachable.append(f'{host}:{port}')
    else:
      return []
  return unreachable

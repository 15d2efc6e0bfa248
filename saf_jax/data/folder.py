r"""Image folders and their archives (``config.input.dataset = 'folder:PATH'``), decoded to memory.

``PATH`` is either a folder in TFDS ``ImageFolder``'s layout, ``PATH/{train,test}/<class>/
*.jpg|jpeg|png``, or a ``.tar`` / ``.tar.gz`` archive of one (for example
``../shared/data/cifar10-jpeg.tar.gz``, whose members are ``cifar10-jpeg/train/<class>/
NNNN.jpg``). Both give the same examples in the same order::

  label k     = the k-th train class name, sorted
  example ids = (class, file name) order: all of class 0's files sorted by name, then class 1's ...

An archive is decoded once: every image of both splits goes to an ``.npz`` cache under
``<data_dir>/saf_jax_folder_cache/``, named by the archive's SHA-256 and ``image_size``, so a
second run reads the decoded pixels in about a second and a changed archive is decoded again.
A folder is decoded on every run (it has no single content hash to key a cache by).

Subsets are class-balanced: ``num_examples = N`` over ``C`` classes keeps the first
``N // C`` files of every class (one more for the first ``N % C`` classes), in the order
above, so a subset of a sorted folder is not mostly one class, and every method and seed
sees the same one. Ids are then dense over the subset, in the same (class, file) order.
"""

import hashlib
import os
import tarfile
from collections.abc import Callable

import numpy as np
from absl import logging

from saf_jax.data.base import FOLDER_PREFIX
from saf_jax.data.tf_runtime import tf

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
ARCHIVE_EXTENSIONS = ('.tar', '.tar.gz', '.tgz')
SPLITS = ('train', 'test')
# Bump when the cache's content changes meaning; old files are then ignored.
_CACHE_VERSION = 1
CACHE_DIR = 'saf_jax_folder_cache'  # Under the TFDS data_dir.

# split -> class name -> [(file name for messages, function returning the encoded bytes)],
# files sorted by name.
Listing = dict[str, dict[str, list[tuple[str, Callable[[], bytes]]]]]


def is_archive(root: str) -> bool:
  """Whether ``root`` names a ``.tar``/``.tar.gz`` archive rather than a folder."""
  return root.lower().endswith(ARCHIVE_EXTENSIONS)


def folder_classes(root: str) -> list[str]:
  """Class names of an image folder or archive: its ``train/`` subfolders, sorted.

  Label ``k`` is the ``k``-th class name in sorted order.

  Raises:
    ValueError: if ``root`` does not exist, ``train/`` or ``test/`` is missing, a class
      folder holds no image, or a test class is not a train class.
  """
  return _check_listing(root, _listing(root))


def load(
  root: str,
  *,
  image_size: int,
  num_train_examples: int,
  num_test_examples: int,
  cache_dir: str,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
  """Decodes both splits of a folder or archive into memory, as RGB uint8.

  Args:
    root: the folder, or a ``.tar``/``.tar.gz`` archive of one.
    image_size: > 0 resizes every image (bilinear, with antialiasing) to
      ``image_size x image_size`` pixels; -1 keeps them, and then all must share one size.
    num_train_examples: -1 for every train image, else a class-balanced subset of N.
    num_test_examples: the same for the test split.
    cache_dir: folder of the decoded-archive cache (created if missing); unused for folders.

  Returns:
    ``(train, test, classes)``: each split as ``'image'`` uint8 [N, H, W, 3] and
    ``'label'`` int32 [N] in (class, file) order, and the sorted class names.

  Raises:
    ValueError: for a missing path, a bad layout, an unreadable image (naming the file),
      images of several sizes without ``image_size``, or a subset larger than a class
      allows (naming the field).
  """
  if not os.path.exists(root):
    raise ValueError(
      f"config.input.dataset='{FOLDER_PREFIX}{root}': {root} does not exist (a folder "
      f'root/{{train,test}}/<class>/*.jpg|png or a .tar/.tar.gz archive of one).'
    )
  sizes = {'train': num_train_examples, 'test': num_test_examples}
  if not is_archive(root):
    listing = _listing(root)
    classes = _check_listing(root, listing)
    splits = {}
    for split in SPLITS:
      files = [(c, f) for c in classes for f in listing[split].get(c, [])]
      labels = np.asarray([classes.index(c) for c, _ in files], np.int32)
      keep = balanced_subset(labels, sizes[split], len(classes), f'num_{split}_examples')
      files = [files[i][1] for i in keep]
      splits[split] = {'image': _decode(files, image_size), 'label': labels[keep]}
    return splits['train'], splits['test'], classes

  digest = _sha256(root)
  path = os.path.join(
    cache_dir, f'{os.path.basename(root)}.{digest[:16]}.size{image_size}.v{_CACHE_VERSION}.npz'
  )
  if os.path.exists(path):
    with np.load(path) as cached:
      arrays = {k: cached[k] for k in cached.files}
    logging.info('Read the decoded images of %s from %s.', root, path)
  else:
    listing = _listing(root)
    classes = _check_listing(root, listing)
    arrays = {'classes': np.asarray(classes)}
    for split in SPLITS:
      files = [(c, f) for c in classes for f in listing[split].get(c, [])]
      arrays[f'{split}_image'] = _decode([f for _, f in files], image_size)
      arrays[f'{split}_label'] = np.asarray([classes.index(c) for c, _ in files], np.int32)
    os.makedirs(cache_dir, exist_ok=True)
    temporary = f'{path}.tmp{os.getpid()}.npz'
    np.savez(temporary, **arrays)
    os.replace(temporary, path)  # Whole or absent, never a half-written cache.
    logging.info('Decoded %s once; cached in %s.', root, path)
  classes = [str(c) for c in arrays['classes']]
  splits = {}
  for split in SPLITS:
    labels = arrays[f'{split}_label']
    keep = balanced_subset(labels, sizes[split], len(classes), f'num_{split}_examples')
    splits[split] = {'image': arrays[f'{split}_image'][keep], 'label': labels[keep]}
  return splits['train'], splits['test'], classes


def balanced_subset(labels: np.ndarray, num_examples: int, num_classes: int, field: str):
  """Positions of a class-balanced subset of ``labels``, in their original order.

  Class ``c`` keeps its first ``num_examples // num_classes`` positions, plus one for
  ``c < num_examples % num_classes``.

  Args:
    labels: int [N], in the dataset's (class, file) order.
    num_examples: -1 for all positions, else the subset's size (>= 1).
    num_classes: C.
    field: the config field, for the error message (e.g. ``'num_train_examples'``).

  Returns:
    int64 [num_examples] positions into ``labels``, increasing.

  Raises:
    ValueError: if some class has fewer examples than its share.
  """
  if num_examples == -1:
    return np.arange(len(labels))
  if num_examples > len(labels):
    raise ValueError(
      f'config.input.{field}={num_examples} but the split has only {len(labels)} examples.'
    )
  keep = []
  for c in range(num_classes):
    share = num_examples // num_classes + (1 if c < num_examples % num_classes else 0)
    positions = np.flatnonzero(labels == c)
    if len(positions) < share:
      # The largest N that works: C * m, plus one for each class before the first of the
      # smallest classes (count m), which take the remainder first.
      counts = np.bincount(labels, minlength=num_classes)
      largest = num_classes * counts.min() + int(np.argmin(counts))
      raise ValueError(
        f'config.input.{field}={num_examples} takes {share} examples of class {c} (a '
        f'class-balanced subset), but it has only {len(positions)}; use at most {largest}.'
      )
    keep.append(positions[:share])
  return np.sort(np.concatenate(keep))


def _listing(root: str) -> Listing:
  """The images of a folder or archive, by split and class; files sorted by name."""
  if is_archive(root):
    return _archive_listing(root)
  listing: Listing = {}
  for split in SPLITS:
    directory = os.path.join(root, split)
    if not os.path.isdir(directory):
      continue
    listing[split] = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
      if entry.is_dir():
        listing[split][entry.name] = [
          (path, _file_reader(path))
          for path in sorted(
            e.path
            for e in os.scandir(entry.path)
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
          )
        ]
  return listing


def _file_reader(path: str) -> Callable[[], bytes]:
  def read() -> bytes:
    with open(path, 'rb') as f:
      return f.read()

  return read


def _archive_listing(root: str) -> Listing:
  """Reads every image of a tar archive into memory: ``[prefix/]split/class/file``."""
  found: dict[str, dict[str, dict[str, list]]] = {}  # prefix -> split -> class -> files
  try:
    with tarfile.open(root, 'r:*') as archive:
      for member in archive:
        parts = member.name.strip('/').split('/')
        if len(parts) < 3 or parts[-3] not in SPLITS:
          continue
        prefix, split, name = '/'.join(parts[:-3]), parts[-3], parts[-2]
        classes = found.setdefault(prefix, {}).setdefault(split, {})
        files = classes.setdefault(name, [])
        if member.isfile() and parts[-1].lower().endswith(IMAGE_EXTENSIONS):
          data = archive.extractfile(member).read()
          files.append((f'{root}:{member.name}', lambda data=data: data))
  except (tarfile.TarError, OSError, EOFError) as e:
    raise ValueError(f'Cannot read the archive {root}: {e}') from e
  if len(found) > 1:
    raise ValueError(
      f'The archive {root} holds several image folders ({sorted(found)}); it must hold one '
      'folder with train/<class>/ and test/<class>/.'
    )
  listing = next(iter(found.values()), {})
  return {
    split: {c: sorted(files, key=lambda f: f[0]) for c, files in sorted(classes.items())}
    for split, classes in listing.items()
  }


def _check_listing(root: str, listing: Listing) -> list[str]:
  """The sorted train classes, after checking the layout (see :func:`folder_classes`)."""
  for split in SPLITS:
    where = f'{root}:{split}' if is_archive(root) else os.path.join(root, split)
    if split not in listing:
      raise ValueError(
        f"config.input.dataset='{FOLDER_PREFIX}{root}' needs {where}/<class>/*.jpg|png "
        f'(the layout of TFDS ImageFolder); {where} is not a directory.'
      )
    if not listing[split]:
      raise ValueError(f'{where} holds no class folder.')
    for name, files in listing[split].items():
      if not files:
        raise ValueError(
          f'Class folder {os.path.join(where, name)} holds no image '
          f'({", ".join(IMAGE_EXTENSIONS)}).'
        )
  missing = sorted(set(listing['test']) - set(listing['train']))
  if missing:
    raise ValueError(
      f'The test split of {root!r} has classes that train does not: {missing}; a model '
      'trained on train cannot predict them.'
    )
  return sorted(listing['train'])


def _decode(files: list[tuple[str, Callable[[], bytes]]], image_size: int) -> np.ndarray:
  """Decodes images to RGB uint8 [N, H, W, 3], resized to ``image_size`` if > 0."""
  images = []
  for name, read in files:
    try:
      image = tf.io.decode_image(read(), channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError as e:
      raise ValueError(f'Cannot read the image {name}: {e.message.splitlines()[0]}') from e
    if image_size > 0:
      image = tf.image.resize(image, (image_size, image_size), antialias=True)
      image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    elif images and image.shape != images[0].shape:
      raise ValueError(
        f'{name} is {tuple(image.shape)} but {files[0][0]} is {tuple(images[0].shape)}: set '
        'config.input.image_size to resize every image to one size.'
      )
    images.append(image.numpy())
  return np.stack(images)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()

r"""Prepares a dataset in a TFDS data dir once, before training (no training, no JAX).

  python -m saf_jax.tools.prepare_data --dataset=imagenet2012 --data_dir=/data/tfds
  python -m saf_jax.tools.prepare_data --dataset=cifar10 --data_dir=/data/tfds

Does what the first training run would do (``saf_jax.data.ready_builder``): Fashion-MNIST
is written from Debian's IDX files; ImageNet is prepared offline, as TFDS documents, from
``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` in ``<data_dir>/downloads/manual``
(hours: it re-encodes 1.3 M JPEGs); any other dataset is downloaded. TFDS's own ``tfds
build`` does the same but needs apache-beam, which the requirements do not install. Run it
once, on one machine, before a multi-process run.

Prints the prepared splits and their sizes; exits non-zero with
``saf_jax.data.DataNotFoundError`` saying what is missing.
"""

from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defines the CLI's flags; called only when this module runs as a program."""
  flags.DEFINE_string('dataset', None, 'TFDS name, e.g. imagenet2012, cifar10, fashion_mnist.')
  flags.DEFINE_string(
    'data_dir', None, 'TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).'
  )
  flags.mark_flags_as_required(['dataset'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from saf_jax import data

  builder = data.ready_builder(FLAGS.dataset, data_dir=FLAGS.data_dir)
  for name, split in sorted(builder.info.splits.items()):
    print(f'{builder.name} {name}: {split.num_examples} examples in {split.num_shards} files')
  print(f'Ready in {builder.data_dir}.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)

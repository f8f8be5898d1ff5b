"""TFDS datasets as sources: a prepared builder, sharded per process.

Nothing is downloaded unless `config.tfds_download` is set; an unprepared
dataset or an unknown name is an error that says what to do.
"""

import tensorflow_datasets as tfds

from vit_jax.data import embedded_mnist
from vit_jax.data import sources
from vit_jax.run_config import errors


def prepared_builder(name, data_dir=None, manual_dir=None, download=False):
  """Returns a prepared builder; never downloads unless `download` is True."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise _unknown_name(name) from None
  if builder.is_prepared():
    return builder
  if download:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder
  fix = (f'run `tfds build {name}` on a machine with network access and pass '
         'its data directory with --config.tfds_data_dir, or set '
         '--config.tfds_download=True to download it now')
  if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
    fix += (f'; {name} needs files downloaded by hand: put them in '
            '--config.tfds_manual_dir and set --config.tfds_download=True')
  raise FileNotFoundError(
      f'TFDS dataset {name!r} is not prepared in {builder.data_dir!r} '
      f'(data_dir={data_dir!r}), and nothing is downloaded implicitly. '
      f'To fix: {fix}.')


def _unknown_name(name) -> errors.ConfigError:
  """The error for an unknown dataset, with a few close names."""
  base = name.split(':')[0].split('/')[0]
  close = errors.closest(base,
                         tfds.list_builders(with_community_datasets=False))
  hint = (f'Close TFDS names: {", ".join(close)}.'
          if close else 'No TFDS dataset has a close name.')
  return errors.ConfigError(
      f'Unknown dataset {name!r}: not {embedded_mnist.NAME!r}, not an '
      f'existing folder, and not a TFDS dataset. {hint} Set --config.dataset '
      'to a TFDS name (https://www.tensorflow.org/datasets/catalog), an image '
      f'folder, or {embedded_mnist.NAME}.')


def make_source(builder, split, process_index, process_count, train,
                seed) -> sources.Source:
  """This process's shard of a split (`tfds.split_for_jax_process`)."""
  shards = [
      tfds.split_for_jax_process(
          split, process_index=i, process_count=process_count)
      for i in range(process_count)
  ]
  sizes = [builder.info.splits[s].num_examples for s in shards]
  read_config = tfds.ReadConfig(
      shuffle_seed=seed, shuffle_reshuffle_each_iteration=False)

  def make():
    ds = builder.as_dataset(
        split=shards[process_index],
        shuffle_files=train,
        decoders={'image': tfds.decode.SkipDecoding()},
        read_config=read_config)
    return ds.map(lambda ex: (ex['image'], ex['label']))

  return sources.Source(
      make=make,
      decode=sources.decode_encoded,
      num_classes=builder.info.features['label'].num_classes,
      shard_sizes=sizes,
      process_index=process_index,
      in_memory=False)

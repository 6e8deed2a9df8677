"""Datasets for fine-tuning: offline TFDS builders and grain pipelines.

    split = data.load_split('fashion_mnist', 'train')
    for batch in data.train_batches(split, batch_size=128, seed=0):
      ...  # {'image': uint8 [128, 28, 28, 1], 'label': int32 [128]}

Names in `DATASETS` are the offline datasets (`python -m
finetune_jax.data.prepare` builds them); `folder:<dir>` is a folder of the
user's images, one subfolder per class, built on first use (see `folder`);
any other name is read as a standard TFDS dataset already prepared, in
array_record format, in the data dir. This module also answers "what is
prepared where", so a missing dataset fails with one clear message before
any expensive work.

Text datasets are tokenized once per tokenizer into the data dir and read
as token ids (`load_text_split`, see `text`); `text_batches` pads them to a
few bucket lengths, `packed_lm_batches` packs them for causal LM (`packing`).
"""

from __future__ import annotations

import glob
import json
import os
import time
from typing import Sequence

from finetune_jax.data import builders
from finetune_jax.data import folder
from finetune_jax.data.austen import Austen
from finetune_jax.data.fashion_mnist import FashionMnistOffline
from finetune_jax.data.fashion_mnist_shifted import FashionMnistShifted
from finetune_jax.data.fortunes import Fortunes
from finetune_jax.data.fortunes import FortunesPoems
from finetune_jax.data.image_ops import make_image_transform
from finetune_jax.data.mnist5k import Mnist5k
from finetune_jax.data.packing import packed_lm_batches
from finetune_jax.data.packing import packed_lm_eval_batches
from finetune_jax.data.pipeline import Split
from finetune_jax.data.pipeline import Subset
from finetune_jax.data.pipeline import carve
from finetune_jax.data.pipeline import eval_batches
from finetune_jax.data.pipeline import local_rows
from finetune_jax.data.pipeline import train_batches
from finetune_jax.data.text import TextSplit
from finetune_jax.data.text import bucket_lengths
from finetune_jax.data.text import check_lengths
from finetune_jax.data.text import load_text_split
from finetune_jax.data.text import prepare_tokenized
from finetune_jax.data.text import text_batches
from finetune_jax.data.text import text_eval_batches

__all__ = ['DATASETS', 'Split', 'Subset', 'carve', 'load_split', 'train_batches', 'eval_batches',
           'local_rows',
           'prepare', 'make_image_transform', 'TextSplit', 'load_text_split',
           'prepare_tokenized', 'check_lengths', 'bucket_lengths',
           'text_batches', 'text_eval_batches', 'packed_lm_batches',
           'packed_lm_eval_batches']

# Builder name (the directory TFDS writes in the data dir) -> class.
OFFLINE_BUILDERS: dict[str, type[builders.OfflineBuilder]] = {
    cls.name: cls for cls in (FashionMnistOffline, FashionMnistShifted, Mnist5k, Fortunes,
                              FortunesPoems, Austen)
}
# Public name -> builder name. `fashion_mnist_offline` keeps clear of TFDS's
# own `fashion_mnist` (a different builder: PNG images, downloads).
DATASETS: dict[str, str] = {
    'fashion_mnist': FashionMnistOffline.name,
    'fashion_mnist_shifted': FashionMnistShifted.name,
    'mnist5k': Mnist5k.name,
    'fortunes': Fortunes.name,
    'fortunes_poems': FortunesPoems.name,
    'austen': Austen.name,
}
PREPARE_COMMAND = 'python -m finetune_jax.data.prepare'
_TFDS_BUILD_HINT = (
    'build it where TFDS can download it (network; TensorFlow for most '
    'image datasets) with `tfds build <name> --file_format=array_record`, '
    'then copy its <name>/ dir into {data_dir}')


def load_split(name: str, split: str, data_dir: str | None = None,
               on_bad_image: str = 'error') -> Split:
  """Random-access view of one split (TFDS split syntax, e.g. 'train[:90%]').

  Raises one ValueError, before reading any data, if `name` is unknown or not
  prepared in the data dir, or if `split` names a split it does not have.
  A `folder:<dir>` dataset is built (or rebuilt, if the folder changed)
  first; `on_bad_image` ('error' | 'skip') says what a corrupt image does.
  Its 'image' values are encoded bytes: pass an `image_ops` transform.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = resolve_data_dir(data_dir)
  if folder.is_folder_dataset(name):
    version_dir = folder.prepare_folder(name, data_dir, on_bad_image)
    split = folder.resolve_split(split, _split_names(version_dir))
    tfds_name = os.path.basename(os.path.dirname(version_dir))
  else:
    version_dir = prepared_version_dir(name, data_dir)
    tfds_name = builder_name(name)
  if version_dir is None:
    raise not_prepared_error(name, data_dir)
  _check_format_and_split(name, split, version_dir)
  tfds_name = f'{tfds_name}:{os.path.basename(version_dir)}'
  source = tfds.data_source(tfds_name, split=split, data_dir=data_dir)
  features = source.dataset_info.features
  label = features['label'] if 'label' in features.keys() else None
  if not isinstance(label, tfds.features.ClassLabel):
    label = None
  return Split(
      source=source,
      num_examples=len(source),
      num_classes=label.num_classes if label else None,
      class_names=list(label.names) if label else None,
  )


def prepare(names: Sequence[str] = (), data_dir: str | None = None,
            log: bool = False, tokenizer=None) -> dict[str, float]:
  """Fetches the raw files and builds the named offline datasets.

  All of them when `names` is empty. Idempotent: prepared datasets are
  skipped after a file check. With a `tokenizers.Tokenizer`, the text
  datasets among them are also tokenized for it (what `load_text_split`
  would do on first use). Returns the seconds spent per dataset.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = resolve_data_dir(data_dir)
  names = list(dict.fromkeys(names or DATASETS))
  not_offline = [n for n in names
                 if not is_offline(n) and not folder.is_folder_dataset(n)]
  if not_offline:
    raise ValueError(
        f'Cannot prepare {not_offline}: only the offline datasets '
        f'({", ".join(DATASETS)}) and folder:<dir> are built here. Other '
        'TFDS datasets: '
        f'{_TFDS_BUILD_HINT.format(data_dir=data_dir)}.')
  manual_dir = os.path.join(data_dir, 'downloads', 'manual')
  deb_cache = os.path.join(data_dir, 'downloads', 'debs')
  seconds = {}
  for name in names:
    start = time.perf_counter()
    status = 'already prepared'
    if folder.is_folder_dataset(name):  # rebuilt only if the folder changed
      version_dir = folder.prepare_folder(name, data_dir)
      status = 'ready'
    else:
      version_dir = offline_version_dir(name, data_dir)
      if prepared_version_dir(name, data_dir) is None:
        cls = OFFLINE_BUILDERS[builder_name(name)]
        cls.fetch_raw(manual_dir, deb_cache)
        cls(data_dir=data_dir, file_format='array_record').download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        status = 'prepared'
    if tokenizer is not None and _has_text(version_dir):
      version_dir = prepare_tokenized(name, tokenizer, data_dir)
      status += ', tokenized'
    seconds[name] = time.perf_counter() - start
    if log:
      print(f'{name}: {status} in {seconds[name]:.1f}s ({version_dir})',
            flush=True)
  return seconds


# ------------------------------------------------- what is prepared where


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> str:
  """`data_dir`, else $TFDS_DATA_DIR, else TFDS's default ~/tensorflow_datasets."""
  data_dir = data_dir or os.environ.get('TFDS_DATA_DIR') or (
      '~/tensorflow_datasets')
  return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def builder_name(name: str) -> str:
  """Alias -> TFDS builder name; other names pass through unchanged."""
  return DATASETS.get(name, name)


def is_offline(name: str) -> bool:
  return builder_name(name) in OFFLINE_BUILDERS


def offline_version_dir(name: str, data_dir: str) -> str:
  """Where an offline dataset's current version lives, prepared or not."""
  cls = OFFLINE_BUILDERS[builder_name(name)]
  return os.path.join(data_dir, cls.name, str(cls.VERSION))


def prepared_datasets(data_dir: str) -> dict[str, str]:
  """Datasets prepared in `data_dir`: 'name' or 'name/config' -> version.

  Prepared means `<name>[/<config>]/<version>/dataset_info.json` exists;
  where several versions exist, the highest wins.
  """
  found: dict[str, str] = {}
  for pattern in ('*/*/dataset_info.json', '*/*/*/dataset_info.json'):
    for info_path in glob.glob(os.path.join(data_dir, pattern)):
      *name_parts, version = os.path.relpath(
          os.path.dirname(info_path), data_dir).split(os.sep)
      name = '/'.join(name_parts)
      if name_parts[0] == 'downloads' or not version[:1].isdigit():
        continue  # raw files, or TFDS's `incomplete.*` staging dirs
      if name not in found or _version_key(version) > _version_key(
          found[name]):
        found[name] = version
  return dict(sorted(found.items()))


def prepared_version_dir(name: str, data_dir: str) -> str | None:
  """The version dir `load_split` would read, or None if not prepared."""
  if is_offline(name):
    version_dir = offline_version_dir(name, data_dir)
  else:
    version = prepared_datasets(data_dir).get(name)
    if version is None:
      return None
    version_dir = os.path.join(data_dir, name, version)
  if not os.path.exists(os.path.join(version_dir, 'dataset_info.json')):
    return None
  return version_dir


def not_prepared_error(name: str, data_dir: str) -> ValueError:
  """One message: what is known, what is prepared, and the command to fix it."""
  prepared = ', '.join(prepared_datasets(data_dir)) or '(none)'
  aliases = ', '.join(a if a == b else f'{a} (-> {b})'
                      for a, b in DATASETS.items())
  if is_offline(name):
    head = (f'Dataset {name!r} is not prepared in {data_dir} (no '
            f'{offline_version_dir(name, data_dir)}/dataset_info.json).')
    command = f'{PREPARE_COMMAND} {name} --data_dir {data_dir}'
  else:
    head = (f'Unknown dataset {name!r}: not an offline dataset, and no '
            f'prepared TFDS dataset of that name in {data_dir}.')
    command = f'{PREPARE_COMMAND} <name> --data_dir {data_dir}'
  return ValueError(
      f'{head}\n'
      f'  Offline datasets: {aliases}\n'
      f'  Prepared in {data_dir}: {prepared}\n'
      f'  To prepare an offline dataset: {command}\n'
      f'  (`make install` prepares them all into the default data dir).\n'
      f'  Any other TFDS dataset must already be in the data dir as '
      f'array_record: {_TFDS_BUILD_HINT.format(data_dir=data_dir)}.')


def _check_format_and_split(name: str, split: str, version_dir: str) -> None:
  """Random access needs array_record; TFDS's own split error is cryptic."""
  with open(os.path.join(version_dir, 'dataset_info.json')) as f:
    info = json.load(f)
  file_format = info.get('fileFormat', 'tfrecord')
  if 'array_record' not in [file_format, *info.get('alternativeFileFormats',
                                                     [])]:
    raise ValueError(
        f'Dataset {name!r} in {version_dir} is stored as {file_format}; '
        'random access needs array_record. Rebuild it with '
        '`--file_format=array_record`.')
  available = [s['name'] for s in info.get('splits', [])]
  for requested in (p.split('[')[0].strip() for p in split.split('+')):
    if requested not in available:
      raise ValueError(f'Dataset {name!r} has no split {requested!r}; its '
                       f'splits: {", ".join(available)}.')


def _has_text(version_dir: str) -> bool:
  """Whether the dataset has a top-level 'text' feature."""
  with open(os.path.join(version_dir, 'features.json')) as f:
    features = json.load(f).get('featuresDict', {}).get('features', {})
  return 'text' in features


def _split_names(version_dir: str) -> list[str]:
  with open(os.path.join(version_dir, 'dataset_info.json')) as f:
    return [s['name'] for s in json.load(f).get('splits', [])]


def _version_key(version: str) -> tuple[int, ...]:
  return tuple(int(p) if p.isdigit() else -1 for p in version.split('.'))

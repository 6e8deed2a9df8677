"""A folder of the user's images as a TFDS dataset: `dataset='folder:<dir>'`.

Two layouts, one subfolder per class (names sorted -> labels 0, 1, ...):

    <dir>/<class>/**/*.jpg        split by hash: an image is `test` when the
                                  sha256 of its path relative to <dir>
                                  (e.g. 'cat/0001.jpg') is 0 mod 5 (~20%);
                                  the rest is `train`. Fixed: adding or
                                  removing files never moves the others.
    <dir>/train/<class>/**/*.jpg  explicit splits: `train`, plus `test` from
    <dir>/test/<class>/...        test/ and `validation` from val/ or
                                  validation/ (a request for either eval
                                  name reads the one that exists)

Images: .jpg .jpeg .png .bmp .gif .webp (any case), found recursively;
hidden files and folders (a leading '.') are ignored. Each class of `train`
needs at least one image.

`load_split('folder:<dir>', ...)` builds the dataset on first use into the
data dir as `folder_<basename>_<hash of the path>/1.0.0` (array_record), and
rebuilds it when the folder changes: a fingerprint of every image's path,
size and mtime is kept beside it in `folder_source.json`. Examples are
{'image': the file's bytes, 'label', 'height', 'width'} (upright size);
images are decoded in the input pipeline (`image_ops`), not here, so the
files are stored as they are (any of the formats above, no TensorFlow).

Every image is decoded once while building: a corrupt or unreadable file is
named before training starts. `on_bad_image='error'` (default) stops with
the list; 'skip' leaves them out with a warning.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import types
from typing import ClassVar

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from finetune_jax import errors
from finetune_jax.data import builders
from finetune_jax.data import image_ops

PREFIX = 'folder:'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
# Eval folder name of the explicit layout -> the split it becomes.
EVAL_DIRS = {'test': 'test', 'val': 'validation', 'validation': 'validation'}
ON_BAD_IMAGE = ('error', 'skip')
VERSION = '1.0.0'
SOURCE_FILE = 'folder_source.json'
_MAX_LISTED = 20  # bad files named in one message


class FolderDatasetError(errors.DataError):
  """A problem with the user's folder; the message names it and the fix."""


@dataclasses.dataclass
class FolderScan:
  """What is in the folder, before any image is opened."""

  folder: str
  layout: str  # 'hash_split' | 'explicit_splits'
  class_names: list[str]
  # split -> [(path relative to folder, label)], sorted by path.
  files: dict[str, list[tuple[str, int]]]
  # Every image's (path, size, mtime_ns): what the fingerprint covers.
  stats: list[tuple[str, int, int]]


# ------------------------------------------------------------- naming


def is_folder_dataset(name: str) -> bool:
  return name.startswith(PREFIX)


def folder_of(name: str) -> str:
  """'folder:<dir>' (or a plain dir) -> its absolute, symlink-free path."""
  path = name[len(PREFIX):] if is_folder_dataset(name) else name
  if not path:
    raise FolderDatasetError(f'{name!r} names no folder: use folder:<dir>.')
  return os.path.realpath(os.path.expanduser(path))


def dataset_name(folder: str) -> str:
  """TFDS name: `folder_<sanitised basename>_<8 hex of the path's sha256>`."""
  folder = os.path.realpath(folder)
  base = re.sub(r'[^a-z0-9]+', '_', os.path.basename(folder).lower())
  base = base.strip('_')[:40].strip('_') or 'images'
  digest = hashlib.sha256(folder.encode('utf-8')).hexdigest()[:8]
  return f'folder_{base}_{digest}'


def resolve_split(split: str, available: list[str]) -> str:
  """Lets 'test', 'val' and 'validation' each read whichever eval split exists.

  Keeps TFDS slicing ('val[:50%]' -> 'validation[:50%]').
  """
  eval_splits = [s for s in ('test', 'validation') if s in available]

  def resolve(part: str) -> str:
    base, bracket, rest = part.strip().partition('[')
    if base in EVAL_DIRS and base not in available:
      wanted = EVAL_DIRS[base]
      if wanted in available:
        base = wanted
      elif len(eval_splits) == 1:
        base = eval_splits[0]
    return base + bracket + rest

  return '+'.join(resolve(p) for p in split.split('+'))


# ------------------------------------------------------------ scanning


def scan_folder(folder: str) -> FolderScan:
  """Finds the layout, classes and image files; raises FolderDatasetError."""
  if not os.path.isdir(folder):
    raise FolderDatasetError(
        f'Image folder {folder} does not exist or is not a directory.')
  subdirs = _subdirs(folder)
  split_dirs = {d: EVAL_DIRS[d] for d in subdirs if d in EVAL_DIRS}
  if 'train' in subdirs and split_dirs:
    if len(set(split_dirs.values())) < len(split_dirs):
      raise FolderDatasetError(
          f'Image folder {folder} has both val/ and validation/: keep one.')
    return _scan_explicit(folder, split_dirs)
  if subdirs == ['train']:
    raise FolderDatasetError(
        f'Image folder {folder} has train/ but no test/, val/ or '
        'validation/ beside it. Add one (same class subfolders), or put the '
        'class subfolders directly in the folder for a hashed 80/20 split.')
  class_names = _class_names(folder, subdirs, where=folder)
  files, stats = _class_files(folder, '', class_names)
  by_split = {'train': [], 'test': []}
  for rel, label in files:
    by_split['test' if builders.is_test_text(rel) else 'train'].append(
        (rel, label))
  return FolderScan(folder, 'hash_split', class_names, by_split, stats)


def _scan_explicit(folder: str, split_dirs: dict[str, str]) -> FolderScan:
  train_dir = os.path.join(folder, 'train')
  class_names = _class_names(train_dir, _subdirs(train_dir), where=train_dir)
  files, stats = _class_files(folder, 'train', class_names)
  by_split = {'train': files}
  for dirname, split in sorted(split_dirs.items()):
    eval_dir = os.path.join(folder, dirname)
    eval_classes = _subdirs(eval_dir)
    unknown = sorted(set(eval_classes) - set(class_names))
    if unknown:
      raise FolderDatasetError(
          f'Image folder {folder}: {dirname}/ has class folders that train/ '
          f'lacks: {", ".join(unknown)}. Every eval class needs training '
          'images (or remove those folders).')
    if not eval_classes:
      raise FolderDatasetError(
          f'Image folder {folder}: {dirname}/ has no class subfolders.')
    # Only a class that exists in eval_dir is listed there; labels are train's.
    present = [c for c in class_names if c in eval_classes]
    eval_files, eval_stats = _class_files(folder, dirname, present,
                                          allow_empty=True)
    by_split[split] = [(rel, class_names.index(present[label]))
                       for rel, label in eval_files]
    stats += eval_stats
    if not by_split[split]:
      raise FolderDatasetError(
          f'Image folder {folder}: {dirname}/ holds no images '
          f'({" ".join(IMAGE_EXTENSIONS)}).')
  return FolderScan(folder, 'explicit_splits', class_names, by_split, stats)


def _subdirs(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path)
                if e.is_dir() and not e.name.startswith('.'))


def _class_names(path: str, subdirs: list[str], where: str) -> list[str]:
  if subdirs:
    loose = [e.name for e in os.scandir(path)
             if e.is_file() and _is_image(e.name)]
    if loose:
      logging.warning('%d images directly in %s belong to no class folder '
                      'and are ignored (e.g. %s).', len(loose), where,
                      sorted(loose)[0])
    return subdirs
  what = 'is empty' if not os.listdir(path) else 'has no class subfolders'
  raise FolderDatasetError(
      f'Image folder {where} {what}. Expected one subfolder per class: '
      '<dir>/<class>/*.jpg, or <dir>/train/<class>/... with '
      '<dir>/test/<class>/... (or val/).')


def _class_files(folder: str, split_dir: str, class_names: list[str],
                 allow_empty: bool = False):
  """[(rel path, label)] and stats of every image under each class folder."""
  files, stats, empty = [], [], []
  for label, name in enumerate(class_names):
    class_dir = os.path.join(folder, split_dir, name)
    found = []
    for root, dirs, names in os.walk(class_dir, followlinks=True):
      dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
      found += [os.path.join(root, n) for n in names
                if not n.startswith('.') and _is_image(n)]
    if not found and not allow_empty:
      empty.append(os.path.join(split_dir, name) if split_dir else name)
    for path in sorted(found):
      rel = os.path.relpath(path, folder).replace(os.sep, '/')
      stat = os.stat(path)
      files.append((rel, label))
      stats.append((rel, stat.st_size, stat.st_mtime_ns))
  if empty:
    raise FolderDatasetError(
        f'Image folder {folder}: class folders with no images '
        f'({" ".join(IMAGE_EXTENSIONS)}): {", ".join(empty)}. Add images or '
        'remove those folders.')
  return files, stats


def _is_image(filename: str) -> bool:
  return os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS


def fingerprint(scan: FolderScan) -> str:
  """Changes when any image is added, removed, renamed, resized or touched."""
  content = json.dumps({'version': VERSION, 'layout': scan.layout,
                        'classes': scan.class_names,
                        'files': sorted(scan.stats)})
  return hashlib.sha256(content.encode('utf-8')).hexdigest()


# ----------------------------------------------------------- checking


def check_images(scan: FolderScan, workers: int | None = None):
  """Decodes every image once -> ({rel: (height, width)}, {rel: reason})."""
  rels = [rel for files in scan.files.values() for rel, _ in files]

  def check(rel):
    try:
      with open(os.path.join(scan.folder, rel), 'rb') as f:
        return rel, image_ops.verify_image(f.read()), None
    except Exception as e:  # pylint: disable=broad-except
      return rel, None, f'{type(e).__name__}: {e}'

  sizes, bad = {}, {}
  # Decoding releases the GIL: threads use every core without pickling.
  with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as ex:
    for rel, size, reason in ex.map(check, rels):
      if reason is None:
        sizes[rel] = size
      else:
        bad[rel] = reason
  return sizes, bad


def bad_images_error(folder: str, bad: dict[str, str]) -> FolderDatasetError:
  listed = '\n'.join(f'  {rel}: {reason}'
                     for rel, reason in sorted(bad.items())[:_MAX_LISTED])
  more = (f'\n  ... and {len(bad) - _MAX_LISTED} more'
          if len(bad) > _MAX_LISTED else '')
  return FolderDatasetError(
      f'Image folder {folder}: {len(bad)} unreadable or corrupt image '
      f'file(s):\n{listed}{more}\nFix or remove them, or set '
      "on_bad_image='skip' (config.folder_on_bad_image='skip') to leave "
      'them out with a warning.')


def _warn_skipped(folder: str, bad: dict[str, str]) -> None:
  logging.warning('Image folder %s: %d unreadable or corrupt image file(s) '
                  'left out (on_bad_image=skip): %s', folder, len(bad),
                  '; '.join(f'{r} ({why})' for r, why in
                            sorted(bad.items())[:_MAX_LISTED]))


def _without_bad(scan: FolderScan, bad: dict[str, str]) -> FolderScan:
  """The scan minus the bad files; a class left with no training image fails."""
  files = {split: [(rel, label) for rel, label in items if rel not in bad]
           for split, items in scan.files.items()}
  if scan.layout == 'explicit_splits':
    have = {label for _, label in files['train']}
  else:
    have = {label for items in files.values() for _, label in items}
  emptied = [name for label, name in enumerate(scan.class_names)
             if label not in have]
  if emptied:
    raise FolderDatasetError(
        f'Image folder {scan.folder}: once the unreadable files are left '
        f'out, these classes have no images: {", ".join(emptied)}.\n' +
        str(bad_images_error(scan.folder, bad)))
  return dataclasses.replace(scan, files=files)


# ------------------------------------------------------------ building


class _FolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One user folder; `folder_builder` makes a subclass with its name."""

  VERSION = tfds.core.Version(VERSION)
  SCAN: ClassVar[FolderScan]
  SIZES: ClassVar[dict[str, tuple[int, int]]]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # see builders.OfflineBuilder.code_path
    return epath.Path(inspect.getfile(_FolderBuilder))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f'Images from {self.SCAN.folder} ({self.SCAN.layout}); '
                     'image: the encoded file as stored.'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(), dtype=np.object_),
            'label': tfds.features.ClassLabel(names=self.SCAN.class_names),
            'height': tfds.features.Scalar(dtype=np.int32),
            'width': tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    return {split: self._generate_examples(items)
            for split, items in self.SCAN.files.items()}

  def _generate_examples(self, items):
    for rel, label in items:
      with open(os.path.join(self.SCAN.folder, rel), 'rb') as f:
        encoded = f.read()
      height, width = self.SIZES[rel]
      yield rel, {'image': encoded, 'label': label, 'height': height,
                  'width': width}


def folder_builder(scan: FolderScan, sizes: dict[str, tuple[int, int]],
                   name: str) -> type[_FolderBuilder]:
  """A builder class named `name` (TFDS takes the name from the class)."""
  return types.new_class(
      name, (_FolderBuilder,), {'skip_registration': True},
      lambda ns: ns.update(name=name, SCAN=scan, SIZES=sizes,
                           __module__=__name__))


def prepare_folder(name: str, data_dir: str,
                   on_bad_image: str = 'error') -> str:
  """Builds `folder:<dir>` into data_dir if missing or stale; its version dir.

  Cheap when up to date: one directory walk and a stat per image.
  """
  if on_bad_image not in ON_BAD_IMAGE:
    raise ValueError(f'on_bad_image={on_bad_image!r}; use one of '
                     f'{", ".join(ON_BAD_IMAGE)}.')
  folder = folder_of(name)
  scan = scan_folder(folder)
  tfds_name = dataset_name(folder)
  dataset_dir = os.path.join(data_dir, tfds_name)
  version_dir = os.path.join(dataset_dir, VERSION)
  digest = fingerprint(scan)
  source = _read_source(version_dir)
  if source and source['fingerprint'] == digest:
    bad = dict(source['skipped'])
    if bad and on_bad_image == 'error':
      raise bad_images_error(folder, bad)
    if bad:
      _warn_skipped(folder, bad)
    return version_dir

  sizes, bad = check_images(scan)
  if bad and on_bad_image == 'error':
    raise bad_images_error(folder, bad)
  if bad:
    _warn_skipped(folder, bad)
    scan = _without_bad(scan, bad)
  for split, items in scan.files.items():
    if not items:  # TFDS cannot write an empty split
      total = sum(len(v) for v in scan.files.values())
      if scan.layout == 'explicit_splits':
        raise FolderDatasetError(
            f'Image folder {folder}: no usable image left in {split!r}.')
      raise FolderDatasetError(
          f'Image folder {folder}: the hashed 80/20 split put none of its '
          f'{total} usable images in {split!r}. Add images, or split them '
          'yourself: <dir>/train/<class>/... and <dir>/test/<class>/....')
    labels = {label for _, label in items}
    if split == 'train' and len(labels) < len(scan.class_names):
      missing = [n for i, n in enumerate(scan.class_names) if i not in labels]
      logging.warning('Image folder %s: no training image for class(es) %s '
                      '(the hashed split sent them all to test).', folder,
                      ', '.join(missing))
  logging.info('Building %s from %s (%s).', tfds_name, folder,
               ', '.join(f'{s}: {len(v)}' for s, v in scan.files.items()))
  shutil.rmtree(dataset_dir, ignore_errors=True)  # stale build, if any
  builder = folder_builder(scan, sizes, tfds_name)
  builder(data_dir=data_dir, file_format='array_record').download_and_prepare()
  _write_source(version_dir, {
      'folder': folder, 'fingerprint': digest, 'layout': scan.layout,
      'class_names': scan.class_names,
      'splits': {s: len(v) for s, v in scan.files.items()},
      'skipped': sorted(bad.items())})
  return version_dir


def _read_source(version_dir: str) -> dict | None:
  """The record of the last complete build, or None."""
  if not os.path.exists(os.path.join(version_dir, 'dataset_info.json')):
    return None
  return builders.read_build_record(os.path.join(version_dir, SOURCE_FILE))


def _write_source(version_dir: str, record: dict) -> None:
  builders.write_build_record(os.path.join(version_dir, SOURCE_FILE), record)

"""What the offline TFDS builders share: a base class and raw-file fetching.

Each builder (one module per dataset) reads its raw files from
`<manual_dir>/<RAW_DIR>/` (TFDS's manual dir, `<data_dir>/downloads/manual`)
and writes `array_record` files, so `tfds.data_source` gives random access
without TensorFlow. Images are stored as zlib-compressed uint8 tensors, not
`tfds.features.Image`: encoding a numpy array to PNG needs TensorFlow, and
decoded examples look the same either way (uint8 HWC arrays).

`fetch_raw` puts the raw files there first; it runs before TFDS's
download manager, which refuses an empty manual dir.
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import tempfile
from typing import ClassVar

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

IMAGE_SHAPE = (28, 28, 1)


def image_feature() -> tfds.features.Tensor:
  """A 28x28 grayscale image that needs no TensorFlow to encode or decode."""
  return tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8,
                              encoding='zlib')


def is_test_text(text: str) -> bool:
  """Stable 80/20 split: ~1 text in 5 goes to test, chosen by its sha256.

  Hashing the text (not its position) keeps the split fixed when a package
  adds or reorders entries, and puts duplicates on the same side.
  """
  digest = hashlib.sha256(text.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') % 5 == 0


class OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the offline builders: raw files come from a local package."""

  # Subdir of the manual dir holding this dataset's raw files.
  RAW_DIR: ClassVar[str]
  # Debian package providing them (`fetch_raw` default); None if not a .deb.
  DEBIAN_PACKAGE: ClassVar[str | None] = None

  # TFDS 4.9.10's `code_path` evaluates `importlib_resources.abc.Traversable`
  # for any builder defined in a package; that backport is only installed on
  # Python < 3.9, so `download_and_prepare` dies with ModuleNotFoundError.
  # The source file is all TFDS needs here (to look for a checksums.tsv).
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))

  @classmethod
  def fetch_raw(cls, manual_dir: str, cache_dir: str) -> str:
    """Makes `<manual_dir>/<RAW_DIR>` hold the raw files; returns that dir.

    Does nothing if it exists: it only ever appears complete (renamed into
    place), so tests can also drop tiny raw files there themselves.
    """
    target = os.path.join(manual_dir, cls.RAW_DIR)
    if not os.path.exists(target):
      if cls.DEBIAN_PACKAGE is None:
        raise NotImplementedError(f'{cls.__name__} must override fetch_raw.')
      extract_deb(cls.DEBIAN_PACKAGE, target, cache_dir)
    return target

  def raw_dir(self, dl_manager) -> epath.Path:
    return epath.Path(dl_manager.manual_dir) / self.RAW_DIR


def extract_deb(package: str, target: str, cache_dir: str) -> None:
  """`apt-get download` (no install) + `dpkg -x` into `target`, atomically."""
  deb = _find_deb(cache_dir, package) or _apt_download(package, cache_dir)
  parent = os.path.dirname(target)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{package}.', dir=parent)
  try:
    subprocess.run(['dpkg', '-x', deb, staging], check=True)
    os.rename(staging, target)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def read_build_record(path: str) -> dict | None:
  """A JSON record written by `write_build_record`, or None if absent or torn."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write_build_record(path: str, record: dict) -> None:
  """Written last and atomically: its presence marks a complete build."""
  with open(path + '.tmp', 'w') as f:
    json.dump(record, f, indent=1)
  os.replace(path + '.tmp', path)


def copy_atomically(source: str, target: str) -> None:
  os.makedirs(os.path.dirname(target), exist_ok=True)
  shutil.copyfile(source, target + '.tmp')
  os.replace(target + '.tmp', target)


def _find_deb(cache_dir: str, package: str) -> str | None:
  debs = sorted(glob.glob(os.path.join(cache_dir, f'{package}_*.deb')))
  return debs[-1] if debs else None


def _apt_download(package: str, cache_dir: str) -> str:
  """Downloads `<package>_*.deb` into cache_dir; refreshes apt lists once."""
  os.makedirs(cache_dir, exist_ok=True)
  for attempt in range(2):
    if attempt:  # A fresh machine may have empty or stale package lists.
      subprocess.run(['apt-get', 'update'], capture_output=True, check=False)
    result = subprocess.run(['apt-get', 'download', package], cwd=cache_dir,
                            capture_output=True, text=True, check=False)
    deb = _find_deb(cache_dir, package)
    if result.returncode == 0 and deb:
      return deb
  raise RuntimeError(
      f'`apt-get download {package}` failed:\n{result.stderr.strip()}\n'
      f'Alternatively put {package}_*.deb in {cache_dir} and run again.')

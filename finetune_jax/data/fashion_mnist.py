"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (IDX files)."""

from __future__ import annotations

import gzip
import os

import numpy as np
import tensorflow_datasets as tfds

from finetune_jax.data import builders

CLASS_NAMES = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
    'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot',
)
# Where the IDX files sit inside the extracted package.
IDX_SUBDIR = 'usr/share/datasets/fashion-mnist'

_IDX_DTYPES = {0x08: np.uint8}  # the only element type MNIST-style files use


def read_idx(path: os.PathLike | str) -> np.ndarray:
  """Reads an IDX file (the MNIST format), gzipped or not.

  Layout: two zero bytes, a dtype code, the number of dims, each dim as a
  big-endian int32, then the data in C order.
  """
  path = os.fspath(path)
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f'{path}: not an IDX file (magic {data[:4]!r}).')
  dtype_code, ndim = data[2], data[3]
  if dtype_code not in _IDX_DTYPES:
    raise ValueError(f'{path}: unsupported IDX dtype code {dtype_code:#x}.')
  header = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype='>i4'))
  array = np.frombuffer(data[header:], dtype=_IDX_DTYPES[dtype_code])
  if array.size != int(np.prod(shape)):
    raise ValueError(f'{path}: header says {shape}, found {array.size} values.')
  return array.reshape(shape)


class FashionMnistOffline(builders.OfflineBuilder):
  """Fashion-MNIST, same features and splits as TFDS's `fashion_mnist`.

  image uint8 (28, 28, 1); label over the 10 Zalando class names;
  train 60000 (the `train-*` files), test 10000 (the `t10k-*` files).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'From Debian dataset-fashion-mnist IDX files.'}
  RAW_DIR = DEBIAN_PACKAGE = 'dataset-fashion-mnist'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'`apt-get download {DEBIAN_PACKAGE}`, then `dpkg -x` the .deb into '
      f'<manual_dir>/{RAW_DIR}/.')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Zalando article images, 28x28 grayscale, 10 classes.',
        features=tfds.features.FeaturesDict({
            'image': builders.image_feature(),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
    )

  def _split_generators(self, dl_manager):
    idx_dir = self.raw_dir(dl_manager) / IDX_SUBDIR
    return {'train': self._generate_examples(idx_dir, 'train'),
            'test': self._generate_examples(idx_dir, 't10k')}

  def _generate_examples(self, idx_dir, prefix: str):
    images = read_idx(idx_dir / f'{prefix}-images-idx3-ubyte.gz')
    labels = read_idx(idx_dir / f'{prefix}-labels-idx1-ubyte.gz')
    if images.shape[1:] != builders.IMAGE_SHAPE[:2] or len(images) != len(
        labels):
      raise ValueError(f'{idx_dir}/{prefix}: images {images.shape}, '
                       f'labels {labels.shape}.')
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image[..., None], 'label': int(label)}

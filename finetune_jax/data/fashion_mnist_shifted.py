"""Fashion-MNIST's test split under fixed distribution shifts, for robustness evals.

The 10000 test images, transformed deterministically, one split per shift:

  rotate    rotated 30 degrees (bilinear, black corners)
  contrast  contrast cut to 30% around the image's mean
  noise     Gaussian pixel noise, std 40 of 255 (seeded by the example's index)
  blur      Gaussian blur, radius 1.5
  invert    255 - x (dark garments on a light background)

Severities are fixed, so every run evaluates on the same images. Used as
`extra_evals`, e.g. (('rotate', 'fashion_mnist_shifted', 'rotate'),): metrics
`rotate_accuracy`, `rotate_loss`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from PIL import ImageFilter
import tensorflow_datasets as tfds

from finetune_jax.data import builders
from finetune_jax.data import fashion_mnist

SHIFTS = ('rotate', 'contrast', 'noise', 'blur', 'invert')


def shift(image: np.ndarray, kind: str, index: int) -> np.ndarray:
  """One uint8 [28, 28] image under shift `kind` (noise seeded by `index`)."""
  if kind == 'rotate':
    return np.asarray(Image.fromarray(image).rotate(30, resample=Image.BILINEAR))
  if kind == 'contrast':
    x = image.astype(np.float32)
    return np.clip(x.mean() + 0.3 * (x - x.mean()), 0, 255).round().astype(np.uint8)
  if kind == 'noise':
    rng = np.random.default_rng([index, 0xF45])
    x = image.astype(np.float32) + rng.normal(0, 40, image.shape)
    return np.clip(x, 0, 255).round().astype(np.uint8)
  if kind == 'blur':
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.5)))
  if kind == 'invert':
    return 255 - image
  raise ValueError(f'Unknown shift {kind!r}; one of {SHIFTS}.')


class FashionMnistShifted(builders.OfflineBuilder):
  """Fashion-MNIST test images under the fixed shifts in SHIFTS, a split each."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'rotate, contrast, noise, blur, invert of the test split.'}
  RAW_DIR = DEBIAN_PACKAGE = fashion_mnist.FashionMnistOffline.DEBIAN_PACKAGE
  MANUAL_DOWNLOAD_INSTRUCTIONS = fashion_mnist.FashionMnistOffline.MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Fashion-MNIST test images under fixed shifts: ' + ', '.join(SHIFTS) + '.',
        features=tfds.features.FeaturesDict({
            'image': builders.image_feature(),
            'label': tfds.features.ClassLabel(names=fashion_mnist.CLASS_NAMES),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    idx_dir = self.raw_dir(dl_manager) / fashion_mnist.IDX_SUBDIR
    images = fashion_mnist.read_idx(idx_dir / 't10k-images-idx3-ubyte.gz')
    labels = fashion_mnist.read_idx(idx_dir / 't10k-labels-idx1-ubyte.gz')
    return {kind: self._generate_examples(images, labels, kind) for kind in SHIFTS}

  def _generate_examples(self, images, labels, kind: str):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': shift(image, kind, i)[..., None], 'label': int(label)}

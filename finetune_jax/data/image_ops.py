"""Host-side image transforms: decode, crop, resize, flip, in the grain workers.

    transform = make_image_transform(224, train=True, random_resized_crop=True,
                                     flip=True, to_rgb=True)
    batches = data.train_batches(split, batch_size=64, seed=0,
                                 transform=transform)

Each example's 'image' (encoded JPEG/PNG/BMP/GIF/WebP bytes, or a uint8
array) becomes uint8 [image_size, image_size, C]: squares of one size stack
into a batch, and the accelerator gets images it only has to normalise (the
model's `preprocess` skips its resize when the size already matches).
Geometry follows the standard ImageNet recipe (torchvision's
`RandomResizedCrop` / `Resize` + `CenterCrop` on PIL images, bilinear with
Pillow's antialiasing).

Two choices beyond that recipe, both for real photo folders:
- EXIF orientation is applied, so phone photos are upright.
- A large JPEG is decoded at 1/2, 1/4 or 1/8 scale (`Image.draft`: the
  decoder drops DCT coefficients) when the region to keep still has at least
  the output's resolution at that scale. Decoding a 12-megapixel photo for a
  224 px crop is most of the host's work; this cuts it several-fold.
  `fast_jpeg=False` always decodes at full size.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import grain
import numpy as np
from PIL import Image
from PIL import ImageOps

ImageValue = Any  # bytes of an encoded image, or a uint8 array (H, W[, C])

# 1: upright; 5-8 are transposed, so their displayed width is the stored height.
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)
_GRAY_MODES = ('1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16B', 'I;16L', 'I;16N',
               'F')
_DRAFT_SCALES = (8, 4, 2)


# ----------------------------------------------------------- decoding


def open_image(value: ImageValue) -> Image.Image:
  """Bytes -> PIL image with only the header read; uint8 array -> PIL image."""
  if isinstance(value, (bytes, bytearray, memoryview)):
    return Image.open(io.BytesIO(bytes(value)))
  if isinstance(value, np.ndarray):
    return _from_array(value)
  raise TypeError(f'Expected encoded image bytes or a uint8 array, got '
                  f'{type(value).__name__}.')


def displayed_size(image: Image.Image) -> tuple[int, int]:
  """(height, width) once EXIF orientation is applied; reads no pixels."""
  width, height = image.size
  if _orientation(image) in _SWAPS_AXES:
    width, height = height, width
  return height, width


def decode_image(value: ImageValue, *, to_rgb: bool = False) -> np.ndarray:
  """Full-size uint8 [H, W, C]: C is 1 for grayscale sources, else 3.

  `to_rgb` repeats a grayscale channel three times. Alpha is dropped and
  palettes are expanded; 16-bit grayscale keeps its top 8 bits.
  """
  image, _ = _load(open_image(value), reduce=1)
  return _to_array(image, to_rgb)


def verify_image(value: ImageValue) -> tuple[int, int]:
  """Decodes every byte (JPEGs at 1/8 scale: same stream, less work).

  Returns the displayed (height, width); raises whatever PIL raises for an
  unreadable, truncated or corrupt file.
  """
  image = open_image(value)
  size = displayed_size(image)
  _load(image, reduce=_DRAFT_SCALES[0])
  return size


# ------------------------------------------------------------ geometry


def center_crop_resize(value: ImageValue, image_size: int, *,
                       crop_ratio: float = 0.875, to_rgb: bool = False,
                       fast_jpeg: bool = True) -> np.ndarray:
  """Evaluation geometry -> uint8 [image_size, image_size, C].

  The shorter side is resized to round(image_size / crop_ratio) (aspect
  kept), then the central image_size square is cut out: 0.875 is the
  standard 256 -> 224. `crop_ratio=1.0` is a plain resize of the whole image
  to image_size x image_size (aspect not kept), as the device-side
  `preprocess` does.
  """
  image = open_image(value)
  height, width = displayed_size(image)
  if crop_ratio == 1.0:
    resized = (image_size, image_size)
  else:
    resized = _shorter_side_to(height, width, round(image_size / crop_ratio))
  # Decoding needs no more resolution than the resize keeps.
  reduce = _max_reduction(min(height / resized[0], width / resized[1]))
  # The whole image is resized, so its decoded scale needs no bookkeeping.
  image, _ = _load(image, reduce if fast_jpeg else 1)
  image = image.resize((resized[1], resized[0]), Image.BILINEAR)
  top = int(round((resized[0] - image_size) / 2.0))
  left = int(round((resized[1] - image_size) / 2.0))
  if (top, left) != (0, 0) or resized != (image_size, image_size):
    image = image.crop((left, top, left + image_size, top + image_size))
  return _to_array(image, to_rgb)


def random_crop_box(height: int, width: int, rng: np.random.Generator, *,
                    scale: tuple[float, float] = (0.08, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)
                    ) -> tuple[int, int, int, int]:
  """Inception-style crop (top, left, crop_height, crop_width), in bounds.

  Up to 10 tries at an area fraction uniform in `scale` and an aspect ratio
  (width / height) log-uniform in `ratio`; if none fits, the largest central
  crop whose aspect is within `ratio` (torchvision's RandomResizedCrop).
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    crop_width = int(round(math.sqrt(target_area * aspect)))
    crop_height = int(round(math.sqrt(target_area / aspect)))
    if 0 < crop_width <= width and 0 < crop_height <= height:
      top = int(rng.integers(0, height - crop_height + 1))
      left = int(rng.integers(0, width - crop_width + 1))
      return top, left, crop_height, crop_width
  aspect = width / height
  if aspect < ratio[0]:
    crop_width, crop_height = width, max(1, int(round(width / ratio[0])))
  elif aspect > ratio[1]:
    crop_width, crop_height = max(1, int(round(height * ratio[1]))), height
  else:
    crop_width, crop_height = width, height
  return ((height - crop_height) // 2, (width - crop_width) // 2, crop_height,
          crop_width)


def random_resized_crop(value: ImageValue, image_size: int,
                        rng: np.random.Generator, *,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        to_rgb: bool = False,
                        fast_jpeg: bool = True) -> np.ndarray:
  """A `random_crop_box` resized to uint8 [image_size, image_size, C]."""
  image = open_image(value)
  height, width = displayed_size(image)
  top, left, crop_height, crop_width = random_crop_box(
      height, width, rng, scale=scale, ratio=ratio)
  reduce = _max_reduction(min(crop_height, crop_width) / image_size)
  image, factor = _load(image, reduce if fast_jpeg else 1)
  box = tuple(v * factor for v in (left, top, left + crop_width,
                                   top + crop_height))
  image = image.resize((image_size, image_size), Image.BILINEAR, box=box)
  return _to_array(image, to_rgb)


def flip_left_right(image: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(image[:, ::-1])


# ---------------------------------------------------- grain transforms


@dataclasses.dataclass(frozen=True)
class EvalImageTransform(grain.transforms.Map):
  """example['image'] -> centre crop + resize (deterministic)."""

  image_size: int
  crop_ratio: float = 0.875
  to_rgb: bool = True
  fast_jpeg: bool = True
  key: str = 'image'

  def map(self, element):
    image = center_crop_resize(element[self.key], self.image_size,
                               crop_ratio=self.crop_ratio, to_rgb=self.to_rgb,
                               fast_jpeg=self.fast_jpeg)
    return {**element, self.key: image}


@dataclasses.dataclass(frozen=True)
class TrainImageTransform(grain.transforms.RandomMap):
  """example['image'] -> random resized crop and/or flip.

  Randomness comes only from `rng`, which the pipeline seeds with (seed,
  step): a resumed run augments exactly as an uninterrupted one. Without
  `random_resized_crop` the geometry is the evaluation one.
  """

  image_size: int
  random_resized_crop: bool = True
  flip: bool = True
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  crop_ratio: float = 0.875
  to_rgb: bool = True
  fast_jpeg: bool = True
  key: str = 'image'

  def random_map(self, element, rng: np.random.Generator):
    value = element[self.key]
    if self.random_resized_crop:
      image = random_resized_crop(value, self.image_size, rng,
                                  scale=self.scale, ratio=self.ratio,
                                  to_rgb=self.to_rgb, fast_jpeg=self.fast_jpeg)
    else:
      image = center_crop_resize(value, self.image_size,
                                 crop_ratio=self.crop_ratio,
                                 to_rgb=self.to_rgb, fast_jpeg=self.fast_jpeg)
    if self.flip and rng.random() < 0.5:
      image = flip_left_right(image)
    return {**element, self.key: image}


def make_image_transform(image_size: int, *, train: bool,
                         random_resized_crop: bool = True, flip: bool = True,
                         scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                         crop_ratio: float = 0.875, to_rgb: bool = True,
                         fast_jpeg: bool = True, key: str = 'image'):
  """The per-example image transform for `train_batches` / `eval_batches`.

  Args:
    image_size: side of the square uint8 output.
    train: a `grain.transforms.RandomMap` (augmentation seeded by the
      pipeline's (seed, step)) if True, else a deterministic
      `grain.transforms.Map`; `random_resized_crop`, `flip`, `scale` and
      `ratio` only apply to training.
    random_resized_crop: Inception-style crop of area fraction in `scale`
      and aspect (width / height) in `ratio`; off: the eval geometry.
    flip: mirror left-right with probability 1/2.
    crop_ratio: eval (and non-random train) crop: shorter side resized to
      image_size / crop_ratio, then the central square; 1.0: plain resize.
    to_rgb: grayscale -> 3 channels (for a model that wants RGB). Off keeps
      each image's own channel count (1 or 3), so only for datasets whose
      images are all one kind.
    fast_jpeg: let large JPEGs decode at reduced scale (see module doc).
    key: the example's image field.
  """
  _check_geometry(image_size, scale, ratio, crop_ratio)
  if not train:
    return EvalImageTransform(image_size=int(image_size),
                              crop_ratio=float(crop_ratio), to_rgb=to_rgb,
                              fast_jpeg=fast_jpeg, key=key)
  return TrainImageTransform(
      image_size=int(image_size), random_resized_crop=random_resized_crop,
      flip=flip, scale=tuple(map(float, scale)),
      ratio=tuple(map(float, ratio)), crop_ratio=float(crop_ratio),
      to_rgb=to_rgb, fast_jpeg=fast_jpeg, key=key)


def _check_geometry(image_size, scale, ratio, crop_ratio) -> None:
  problems = []
  if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
    problems.append(f'image_size={image_size!r} must be a positive integer')
  if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
    problems.append(f'scale={tuple(scale)} must be (min, max) with '
                    '0 < min <= max <= 1 (fractions of the image area)')
  if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
    problems.append(f'ratio={tuple(ratio)} must be (min, max) with '
                    '0 < min <= max (width / height)')
  if not 0 < crop_ratio <= 1:
    problems.append(f'crop_ratio={crop_ratio} must be in (0, 1] '
                    '(0.875: 256 -> 224; 1.0: plain resize)')
  if problems:
    raise ValueError('Invalid image transform: ' + '; '.join(problems) + '.')


# ------------------------------------------------------------ helpers


def _from_array(array: np.ndarray) -> Image.Image:
  if array.dtype != np.uint8:
    raise ValueError(f'Image arrays must be uint8, got {array.dtype}.')
  if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
    array = array[..., 0] if array.shape[-1] == 1 else array[..., :3]
  if array.ndim != 2 and not (array.ndim == 3 and array.shape[-1] == 3):
    raise ValueError(f'Image arrays must be (H, W) or (H, W, 1|3|4), got '
                     f'{array.shape}.')
  return Image.fromarray(np.ascontiguousarray(array))


def _orientation(image: Image.Image) -> int:
  if image.format not in ('JPEG', 'MPO', 'WEBP', 'PNG', 'TIFF'):
    return 1
  return image.getexif().get(_EXIF_ORIENTATION, 1)


def _max_reduction(room: float) -> int:
  """Largest JPEG draft scale that keeps `room` >= 1 (output px per px)."""
  for scale in _DRAFT_SCALES:
    if room >= scale:
      return scale
  return 1


def _load(image: Image.Image, reduce: int) -> tuple[Image.Image, float]:
  """Decodes (at 1/reduce where the codec can), upright, as 'L' or 'RGB'.

  Returns the image and the factor from full-size displayed coordinates to
  its own (1/scale actually used; 1.0 for non-JPEGs).
  """
  factor = 1.0
  width, height = image.size
  if reduce > 1 and image.format == 'JPEG' and min(width, height) >= reduce:
    drafted = image.draft(None, (width // reduce, height // reduce))
    if drafted is not None:
      factor = drafted[1][2] / width
  image.load()
  if _orientation(image) != 1:
    image = ImageOps.exif_transpose(image)
  return _plain_mode(image), factor


def _plain_mode(image: Image.Image) -> Image.Image:
  """'L' for grayscale sources, 'RGB' for everything else."""
  mode = image.mode
  if mode in ('L', 'RGB'):
    return image
  if mode.startswith('I') or mode == 'F':  # 16/32-bit gray
    array = np.asarray(image)
    # 16-bit data keeps its top byte; 'I' also holds 8-bit data (TIFF).
    if mode.startswith('I;16') or (mode == 'I' and array.max() > 255):
      array = array.astype(np.int64) >> 8
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
  if mode in _GRAY_MODES:
    return image.convert('L')
  return image.convert('RGB')


def _to_array(image: Image.Image, to_rgb: bool) -> np.ndarray:
  array = np.asarray(image)
  if array.ndim == 2:
    array = array[..., None]
    if to_rgb:
      array = np.repeat(array, 3, axis=-1)
  return array


def _shorter_side_to(height: int, width: int, size: int) -> tuple[int, int]:
  """(height, width) with the shorter side `size` (torchvision's rounding)."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size

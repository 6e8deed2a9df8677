"""Tests of the host-side image transforms (`finetune_jax.data.image_ops`)."""

import io

import grain
import numpy as np
from PIL import Image
import pytest

from finetune_jax import data
from finetune_jax.data import image_ops
from test_data import assert_same_batches, take


def encode(array, fmt='PNG', **kwargs) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def noise(height, width, channels=3, seed=0):
  shape = (height, width, channels) if channels > 1 else (height, width)
  return np.random.default_rng(seed).integers(0, 256, shape, np.uint8)


def stripes(height, width):
  """Red left quarter, green middle half, blue right quarter."""
  image = np.zeros((height, width, 3), np.uint8)
  image[:, :width // 4, 0] = 255
  image[:, width // 4:3 * width // 4, 1] = 255
  image[:, 3 * width // 4:, 2] = 255
  return image


def smooth_photo(height, width):
  """Gradients: JPEG-friendly, so decoding at reduced scale is near-exact."""
  y, x = np.mgrid[0:height, 0:width]
  return np.stack([x * 255 // width, y * 255 // height,
                   (x + y) * 255 // (width + height)], -1).astype(np.uint8)


# ------------------------------------------------------------- decoding


def test_decode_png_jpeg_and_arrays():
  rgb = noise(7, 9)
  np.testing.assert_array_equal(image_ops.decode_image(encode(rgb)), rgb)
  jpeg = image_ops.decode_image(encode(rgb, 'JPEG'))
  assert jpeg.shape == (7, 9, 3) and jpeg.dtype == np.uint8
  gray = noise(5, 6, channels=1)
  np.testing.assert_array_equal(image_ops.decode_image(encode(gray)),
                                gray[..., None])
  # Arrays pass through (a 2-D one gains its channel axis).
  np.testing.assert_array_equal(image_ops.decode_image(rgb), rgb)
  np.testing.assert_array_equal(image_ops.decode_image(gray), gray[..., None])
  with pytest.raises(ValueError, match='uint8'):
    image_ops.decode_image(rgb.astype(np.float32))
  with pytest.raises(TypeError, match='bytes or a uint8 array'):
    image_ops.decode_image('cat.jpg')


def test_gray_to_rgb_only_when_asked():
  gray = noise(5, 6, channels=1)
  rgb = image_ops.decode_image(encode(gray), to_rgb=True)
  assert rgb.shape == (5, 6, 3)
  for c in range(3):
    np.testing.assert_array_equal(rgb[..., c], gray)
  out = image_ops.center_crop_resize(gray[..., None], 4, crop_ratio=1.0,
                                     to_rgb=False)
  assert out.shape == (4, 4, 1)
  out = image_ops.center_crop_resize(gray[..., None], 4, crop_ratio=1.0,
                                     to_rgb=True)
  assert out.shape == (4, 4, 3)


@pytest.mark.parametrize('mode,fmt,channels', [
    ('RGBA', 'PNG', 3), ('P', 'PNG', 3), ('LA', 'PNG', 1), ('1', 'PNG', 1),
    ('P', 'GIF', 3), ('RGB', 'BMP', 3), ('RGB', 'WEBP', 3),
    ('CMYK', 'JPEG', 3)])
def test_other_modes_become_l_or_rgb(mode, fmt, channels):
  image = Image.fromarray(noise(6, 8)).convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, format=fmt)
  out = image_ops.decode_image(buffer.getvalue())
  assert out.shape == (6, 8, channels) and out.dtype == np.uint8


def test_sixteen_bit_gray_keeps_the_top_byte():
  gray16 = (noise(4, 5, channels=1).astype(np.uint16) * 257)
  out = image_ops.decode_image(encode(gray16))
  np.testing.assert_array_equal(out[..., 0], gray16 >> 8)


def test_exif_orientation_is_applied():
  image = Image.fromarray(stripes(20, 40))  # wide; stored sideways below
  exif = image.getexif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to display
  encoded = encode(np.asarray(image), 'JPEG', exif=exif.tobytes(), quality=95)
  assert image_ops.displayed_size(image_ops.open_image(encoded)) == (40, 20)
  decoded = image_ops.decode_image(encoded)
  assert decoded.shape == (40, 20, 3)
  # The red (left) stripe is on top once upright.
  assert decoded[2, 10, 0] > 200 and decoded[-3, 10, 2] > 200


# ------------------------------------------------------------- geometry


def test_center_crop_resize_is_the_standard_resize_then_crop():
  image = noise(30, 50)
  out = image_ops.center_crop_resize(encode(image), 16, crop_ratio=0.875)
  # Shorter side 30 -> round(16 / 0.875) = 18, longer int(18 * 50 / 30) = 30.
  expected = Image.fromarray(image).resize((30, 18), Image.BILINEAR)
  expected = np.asarray(expected)[1:17, 7:23]  # round((18-16)/2), round(14/2)
  np.testing.assert_array_equal(out, expected)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_crop_ratio_one_is_a_plain_resize():
  image = noise(30, 50)
  out = image_ops.center_crop_resize(image, 16, crop_ratio=1.0)
  np.testing.assert_array_equal(out, np.asarray(
      Image.fromarray(image).resize((16, 16), Image.BILINEAR)))


def test_center_crop_takes_the_middle():
  out = image_ops.center_crop_resize(stripes(40, 160), 32, crop_ratio=0.875)
  # A 160x40 strip cut to its central square: only the green half remains.
  assert out[..., 1].min() == 255 and out[..., 0].max() == 0
  assert out[..., 2].max() == 0


@pytest.mark.parametrize('height,width', [(50, 50), (10, 200), (300, 7),
                                          (1, 1), (3, 1000)])
def test_random_crop_box_stays_in_bounds(height, width):
  rng = np.random.default_rng(0)
  for ratio in ((3 / 4, 4 / 3), (2.0, 3.0), (0.2, 0.4)):
    for _ in range(100):
      top, left, h, w = image_ops.random_crop_box(height, width, rng,
                                                  ratio=ratio)
      assert 0 <= top and top + h <= height and 0 < h
      assert 0 <= left and left + w <= width and 0 < w


def test_random_crop_box_respects_scale_and_ratio():
  rng = np.random.default_rng(1)
  for _ in range(200):
    _, _, h, w = image_ops.random_crop_box(400, 400, rng, scale=(0.25, 0.5),
                                           ratio=(0.5, 2.0))
    assert 0.23 <= h * w / 400 ** 2 <= 0.52
    assert 0.45 <= w / h <= 2.1


def test_random_crop_box_falls_back_to_a_central_crop():
  # No crop of >= 90% of a 10x100 strip has aspect <= 4/3: the fallback is
  # the widest allowed central crop, 10 high and round(10 * 4/3) wide.
  box = image_ops.random_crop_box(10, 100, np.random.default_rng(0),
                                  scale=(0.9, 1.0))
  assert box == (0, 43, 10, 13)
  box = image_ops.random_crop_box(100, 10, np.random.default_rng(0),
                                  scale=(0.9, 1.0))
  assert box == (43, 0, 13, 10)


def test_random_resized_crop_shape_and_determinism():
  encoded = encode(noise(60, 90))
  crop = lambda seed: image_ops.random_resized_crop(
      encoded, 24, np.random.default_rng(seed), to_rgb=True)
  out = crop(0)
  assert out.shape == (24, 24, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, crop(0))
  assert not np.array_equal(out, crop(1))


def test_random_resized_crop_matches_its_box():
  image = noise(60, 90)
  out = image_ops.random_resized_crop(image, 24, np.random.default_rng(3))
  top, left, h, w = image_ops.random_crop_box(60, 90, np.random.default_rng(3))
  expected = Image.fromarray(image).resize(
      (24, 24), Image.BILINEAR, box=(left, top, left + w, top + h))
  np.testing.assert_array_equal(out, np.asarray(expected))


def test_fast_jpeg_decode_is_close_to_full_decode():
  encoded = encode(smooth_photo(768, 1024), 'JPEG', quality=95)
  for fn in (lambda fast: image_ops.center_crop_resize(
      encoded, 64, fast_jpeg=fast),
             lambda fast: image_ops.random_resized_crop(
                 encoded, 64, np.random.default_rng(0), scale=(0.5, 1.0),
                 fast_jpeg=fast)):
    fast, full = fn(True).astype(int), fn(False).astype(int)
    assert fast.shape == full.shape == (64, 64, 3)
    assert np.abs(fast - full).mean() < 1.5


def test_verify_image_names_truncation():
  encoded = encode(smooth_photo(64, 64), 'JPEG')
  assert image_ops.verify_image(encoded) == (64, 64)
  with pytest.raises(OSError):
    image_ops.verify_image(encoded[:len(encoded) // 2])


# ---------------------------------------------------- grain transforms


def test_factory_types_and_bad_arguments():
  train = data.make_image_transform(8, train=True)
  assert isinstance(train, grain.transforms.RandomMap)
  assert isinstance(data.make_image_transform(8, train=False),
                    grain.transforms.Map)
  for bad in (dict(image_size=0), dict(scale=(0.5, 0.1)),
              dict(ratio=(0, 1)), dict(crop_ratio=1.5)):
    kwargs = {'image_size': 8, 'train': True, **bad}
    with pytest.raises(ValueError, match='Invalid image transform'):
      data.make_image_transform(**kwargs)


def test_flip_actually_flips():
  image = stripes(16, 16)
  transform = data.make_image_transform(
      16, train=True, random_resized_crop=False, flip=True, crop_ratio=1.0)
  outs = [transform.random_map({'image': image}, np.random.default_rng(s))
          ['image'] for s in range(20)]
  flipped = [not np.array_equal(o, image) for o in outs]
  for out, was_flipped in zip(outs, flipped):
    np.testing.assert_array_equal(out, image[:, ::-1] if was_flipped else image)
  assert 3 < sum(flipped) < 17
  no_flip = data.make_image_transform(
      16, train=True, random_resized_crop=False, flip=False, crop_ratio=1.0)
  for s in range(5):
    np.testing.assert_array_equal(no_flip.random_map(
        {'image': image}, np.random.default_rng(s))['image'], image)


def test_transform_keeps_other_keys():
  example = {'image': encode(noise(10, 12)), 'label': 3}
  out = data.make_image_transform(8, train=False).map(example)
  assert out['label'] == 3 and out['image'].shape == (8, 8, 3)
  assert example['image'] != out['image'].tobytes()  # input untouched


def photo_split(n=12):
  """A list source of encoded images of assorted sizes, modes, formats."""
  examples = []
  for i in range(n):
    channels = 1 if i % 3 == 0 else 3
    fmt = 'JPEG' if i % 2 else 'PNG'
    image = noise(20 + 3 * i, 40 - 2 * i, channels, seed=i)
    examples.append({'image': encode(image, fmt), 'label': i})
  return data.Split(examples, n, None, None)


def test_train_batches_with_augmentation_are_resumable():
  split, transform = photo_split(), data.make_image_transform(16, train=True)
  full = take(data.train_batches(split, batch_size=5, seed=0,
                                 transform=transform), 6)
  for batch in full:
    assert batch['image'].shape == (5, 16, 16, 3)
    assert batch['image'].dtype == np.uint8
  resumed = take(data.train_batches(split, batch_size=5, seed=0, start_step=4,
                                    transform=transform), 2)
  assert_same_batches(full[4:], resumed)
  other = take(data.train_batches(split, batch_size=5, seed=1,
                                  transform=transform), 1)
  assert not np.array_equal(other[0]['image'], full[0]['image'])


def test_eval_batches_pad_with_blank_images():
  split = photo_split(7)
  batches = list(data.eval_batches(
      split, batch_size=4, transform=data.make_image_transform(8, train=False)))
  assert [b['image'].shape for b in batches] == [(4, 8, 8, 3)] * 2
  assert batches[1]['mask'].tolist() == [True, True, True, False]
  assert not batches[1]['image'][3].any()


def test_worker_processes_give_the_same_augmented_batches():
  split, transform = photo_split(), data.make_image_transform(16, train=True)
  kwargs = dict(batch_size=4, seed=2, start_step=1, transform=transform)
  expected = take(data.train_batches(split, **kwargs), 4)
  stream = data.train_batches(split, worker_count=2, **kwargs)
  got = take(stream, 4)
  stream.close()  # stops the worker processes
  assert_same_batches(expected, got)

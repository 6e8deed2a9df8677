"""Turning uint8 images into a vision model's input, inside the jitted step."""
from typing import Sequence

import jax
import jax.numpy as jnp


def normalize_images(images, image_size: int | None = None, *, default_size: int,
                     mean: Sequence[float], std: Sequence[float] = (1.0, 1.0, 1.0),
                     channel_order: str = 'rgb'):
  """uint8 NHWC (0..255, 1 or 3 channels, RGB) -> float32 NHWC model input.

  Pure jnp, so it runs inside jit: bilinear resize to `image_size` (default:
  the model's own resolution; a no-op when the size already matches),
  grayscale -> RGB, RGB -> BGR for Caffe-style models, then (x - mean) / std
  per channel, in the model's channel order.
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(
        f'preprocess expects images of shape (batch, height, width, 1 or 3), '
        f'got {images.shape}; for one image pass images[None].')
  if channel_order not in ('rgb', 'bgr'):
    raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}.")
  size = image_size or default_size
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), 'bilinear')
  if channel_order == 'bgr':
    x = x[..., ::-1]
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)

"""VGG16 (Simonyan & Zisserman, 2014) as Keras builds it (`keras.applications.VGG16`).

Five blocks of 3x3 'SAME' convs with ReLU, each followed by a 2x2 max-pool
(stride 2, 'VALID': odd sizes are floored, as in Keras). With the classifier
top, the last pool is flattened in (H, W, C) order -> fc1 (4096) -> fc2 (4096)
-> `head` (Keras' 'predictions'); the top fixes the input size, because fc1's
kernel has (size // 32)^2 * 512 rows. Without it, the last pool is pooled
globally ('avg' or 'max', Keras' `pooling` argument).

`features` is what the classifier sees: fc2's output with the top, the
globally pooled block5_pool output without. `head` is a Dense layer, or with
`head_hidden` a small MLP (Dense + ReLU + dropout per hidden width, then
Dense `logits`): the new dense layers that transfer learning puts on a frozen
conv base. All of it lives under the top-level key `head`, so freezing
everything but the head is one prefix.

Param tree: `block{b}_conv{c}` {kernel (3, 3, in, out), bias} (Keras names),
`fc1`, `fc2` (with the top), `head` ({kernel, bias}, or {hidden_{i}, logits}).
Inputs are Keras 'caffe' preprocessed: RGB -> BGR, minus the ImageNet means,
no scaling. On CPU, convs on small maps run as im2col matmuls (`conv_impl`):
XLA:CPU's convolution is 4-6x slower there.
"""
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from finetune_jax.models import host_init
from finetune_jax.models import layers
from finetune_jax.models import preprocessing

# Conv widths per block.
VARIANTS = {
    'vgg16': ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    'vgg19': ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
    'tiny': ((8,), (16, 16)),  # for fast tests
}
FC_FEATURES = {'vgg16': (4096, 4096), 'vgg19': (4096, 4096), 'tiny': (32, 32)}

# Keras `imagenet_utils.preprocess_input(mode='caffe')`, BGR order.
IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)
POOLINGS = ('avg', 'max')


def make_config(variant: str = 'vgg16', num_classes: int | None = None, *,
                include_top: bool = False, **overrides) -> dict:
  """The JSON-serialisable architecture config.

  num_classes: None gives 1000 (ImageNet) with the top, no classifier without
    (10 for tiny).
  overrides: image_size, pooling, head_hidden, head_dropout, mean_bgr, ...
  """
  if variant not in VARIANTS:
    raise ValueError(f'Unknown VGG variant {variant!r}; use one of {sorted(VARIANTS)}.')
  if num_classes is None:  # tiny: 10, like the other test models
    num_classes = 10 if variant == 'tiny' else 1000 if include_top else 0
  config = dict(
      model='vgg', variant=variant, stages=VARIANTS[variant],
      include_top=include_top, fc_features=FC_FEATURES[variant],
      image_size=32 if variant == 'tiny' else 224, pooling='avg',
      num_classes=num_classes, head_hidden=(), head_dropout=0.5,
      mean_bgr=IMAGENET_MEAN_BGR)
  unknown = set(overrides) - set(config)
  if unknown:
    raise ValueError(f'Unknown VGG config keys {sorted(unknown)}; known: {sorted(config)}.')
  config.update(overrides)
  if config['pooling'] not in POOLINGS:
    raise ValueError(f'pooling={config["pooling"]!r}; use one of {POOLINGS}.')
  # Lists, not tuples, so the config survives a JSON round trip unchanged.
  config['stages'] = [list(s) for s in config['stages']]
  for key in ('fc_features', 'head_hidden', 'mean_bgr'):
    config[key] = list(config[key])
  return config


def conv_names(stages: Sequence[Sequence[int]]) -> tuple[str, ...]:
  return tuple(f'block{b}_conv{c}' for b, widths in enumerate(stages, 1)
               for c in range(1, len(widths) + 1))


def block_names(config: dict) -> tuple[str, ...]:
  """Top-level param keys from input to output, without the head."""
  top = ('fc1', 'fc2') if config['include_top'] else ()
  return (*conv_names(config['stages']), *top)


def make_preprocess(config: dict):
  """Keras 'caffe' style: RGB -> BGR, minus the mean, no scaling."""
  return functools.partial(
      preprocessing.normalize_images, default_size=config['image_size'],
      mean=tuple(config['mean_bgr']), channel_order='bgr')


# ------------------------------------------------------------------- init

# Keras' defaults: glorot_uniform kernels, zero biases. The classifier layer
# of the head starts at zero (uniform predictions), hidden head layers do not.
_glorot = nn.initializers.glorot_uniform()


def _is_classifier(path: str) -> bool:
  return path in ('head/kernel', 'head/bias') or path.startswith('head/logits/')


def _host_value(path: str, shape: tuple[int, ...], dtype, seed: int) -> np.ndarray:
  """The initial value of one leaf, drawn like the module's own initializer."""
  leaf = path.rsplit('/', 1)[-1]
  if leaf == 'bias' or _is_classifier(path):
    return np.zeros(shape, dtype)
  if leaf != 'kernel':
    raise ValueError(f'No initializer for parameter {path!r}.')
  receptive = math.prod(shape[:-2])
  limit = math.sqrt(6.0 / (receptive * (shape[-2] + shape[-1])))
  return host_init.leaf_rng(seed, path).uniform(-limit, limit, shape).astype(dtype)


def _input_shape(module: 'VGG') -> tuple:
  size = module.image_size if module.include_top else 32  # only the top sees the size
  return (1, size, size, 3)


def param_shapes(module: 'VGG') -> dict:
  """{path: ShapeDtypeStruct}, without computing anything."""
  return host_init.param_shapes(module, _input_shape(module))


def init_params(module: 'VGG', seed: int = 0, draw=None) -> dict:
  """Initial params drawn on the host (see host_init), like `module.init`'s."""
  return host_init.init_params(module, _input_shape(module), _host_value, seed, draw=draw)


# ------------------------------------------------------------------- modules

CONV_IMPLS = ('auto', 'lax', 'im2col')
# 'auto' uses im2col on CPU up to this many positions per feature map.
IM2COL_MAX_POSITIONS = 32 * 32


def resolve_conv_impl(impl: str, height: int, width: int) -> str:
  """'auto': im2col on CPU for small maps, where XLA:CPU's convolution is slow.

  Measured on 2 CPU cores, VGG16 at 32 px: lax 14 img/s, im2col 85-100
  (forward), 20 vs 60 (backward); at 64 px both ~45. im2col holds 9 copies
  of its input, so large maps (and accelerators) keep the convolution.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl={impl!r} is not one of {CONV_IMPLS}.')
  if impl == 'auto':
    small = height * width <= IM2COL_MAX_POSITIONS
    return 'im2col' if small and jax.default_backend() == 'cpu' else 'lax'
  return impl


def conv3x3(x: jax.Array, kernel: jax.Array, impl: str = 'auto') -> jax.Array:
  """3x3 stride-1 'SAME' convolution of NHWC `x` with an HWIO kernel.

  'im2col' concatenates the nine shifted copies of the zero-padded input
  along channels and does one matmul with the (9 * in, out) kernel; 'lax' is
  `lax.conv_general_dilated`. Both give the same values and gradients.
  """
  batch, height, width, channels = x.shape
  if resolve_conv_impl(impl, height, width) == 'lax':
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = jnp.concatenate([padded[:, i:i + height, j:j + width]
                             for i in range(3) for j in range(3)], axis=-1)
  return patches @ kernel.reshape(9 * channels, kernel.shape[-1])


class Conv3x3(nn.Conv):
  """Keras' Conv2D(features, 3, padding='same'): params kernel (3, 3, in, out), bias.

  An nn.Conv (3x3, stride 1, SAME) computed by `conv3x3`'s faster forms on
  CPU; being an nn.Conv, LoRA and IA3 adapt it like any conv.
  """
  kernel_size: tuple = (3, 3)
  padding: str = 'SAME'
  kernel_init: Callable = _glorot
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', self.kernel_init, (3, 3, x.shape[-1], self.features))
    y = conv3x3(x, kernel, self.impl)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,))
    return y


class Head(nn.Module):
  """New dense layers on the features: (Dense + ReLU + dropout) * k, then logits."""
  num_classes: int
  hidden: tuple[int, ...] = ()
  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, kernel_init=_glorot, name=f'hidden_{i}')(x))
      x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                    name='logits')(x)


class VGG(nn.Module):
  """VGG; returns {'features': [B, D], 'logits': [B, N] when num_classes > 0}.

  `train=True` enables the head's dropout (rng 'dropout'); nothing else differs.
  """
  stages: tuple[tuple[int, ...], ...] = VARIANTS['vgg16']
  include_top: bool = False
  fc_features: tuple[int, ...] = FC_FEATURES['vgg16']
  image_size: int = 224  # the input size the top is built for
  pooling: str = 'avg'  # without the top: 'avg' | 'max'
  num_classes: int = 0
  head_hidden: tuple[int, ...] = ()
  head_dropout: float = 0.5
  conv_impl: str = 'auto'  # 'lax' | 'im2col' | 'auto' (im2col for small maps on CPU)
  remat: str = 'none'  # layers.REMAT_MODES: recompute each conv in the backward pass

  @nn.compact
  def __call__(self, images, train: bool = False) -> dict[str, Any]:
    if self.include_top and images.shape[1:3] != (self.image_size,) * 2:
      raise ValueError(
          f'This VGG has the classifier top, built for {self.image_size}px '
          f'inputs (fc1 flattens the last feature map), got {images.shape[1:3]}. '
          f'Use image_size={self.image_size}, or a model without the top.')
    x = images
    for b, widths in enumerate(self.stages, 1):
      for c, width in enumerate(widths, 1):
        conv = layers.remat(Conv3x3, self.remat)
        x = conv(width, impl=self.conv_impl, name=f'block{b}_conv{c}')(x)
        x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), (2, 2), padding='VALID')
    if self.include_top:
      x = x.reshape(x.shape[0], -1)  # NHWC order, as Keras' Flatten
      for i, width in enumerate(self.fc_features, 1):
        x = nn.relu(nn.Dense(width, kernel_init=_glorot, name=f'fc{i}')(x))
      features = x
    elif self.pooling == 'max':
      features = jnp.max(x, axis=(1, 2))
    else:
      features = jnp.mean(x, axis=(1, 2))
    out = {'features': features}
    if self.num_classes:
      if self.head_hidden:
        out['logits'] = Head(self.num_classes, self.head_hidden, self.head_dropout,
                             name='head')(features, train)
      else:  # A single Dense: head/kernel, head/bias, like every other model.
        out['logits'] = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                                 name='head')(features)
    return out

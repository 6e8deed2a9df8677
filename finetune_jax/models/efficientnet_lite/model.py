"""EfficientNet-Lite0..4 (Tan & Le, 2019; the TF `efficientnet/lite` builder).

Lite differs from EfficientNet-B*: ReLU6 instead of swish, no squeeze-excite,
and the stem (32 channels), the top conv (1280) and the first and last stages'
repeats are not scaled. Convolutions use TensorFlow 'SAME' padding (extra pad
at the bottom/right), BatchNorm has eps 1e-3. Inputs are normalised as
(x - 127) / 128 on 0..255 pixels, as the TF Lite builder does.

Param tree: `stem` {conv, bn}, `blocks_{i}` for every MBConv block in order
{expand_conv, expand_bn (if expanded), depthwise_conv, depthwise_bn,
project_conv, project_bn}, `top` {conv, bn}, `head` (Dense). 1x1 convs are
Dense layers with (in, out) kernels. BN statistics are `mean`/`var` params.
"""
import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from finetune_jax.models import host_init
from finetune_jax.models import layers
from finetune_jax.models import preprocessing


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One MBConv block after width/depth scaling."""
  kernel_size: int
  stride: int
  expand_ratio: int
  in_features: int
  out_features: int

  @property
  def has_skip(self) -> bool:
    return self.stride == 1 and self.in_features == self.out_features


# (repeats, kernel, stride, expand_ratio, in_features, out_features) per stage,
# from the TF lite builder ('r1_k3_s11_e1_i32_o16', ...).
LITE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

# width, depth, resolution, dropout per variant (efficientnet_lite_builder.py).
VARIANTS = {
    'lite0': (1.0, 1.0, 224, 0.2),
    'lite1': (1.0, 1.1, 240, 0.2),
    'lite2': (1.1, 1.2, 260, 0.3),
    'lite3': (1.2, 1.4, 280, 0.3),
    'lite4': (1.4, 1.8, 300, 0.3),
}

# A two-stage toy with the same structure, for fast tests.
TINY = dict(
    stages=((1, 3, 1, 1, 16, 8), (2, 3, 2, 3, 8, 16)),
    stem_features=16, top_features=32, image_size=32)

MEAN_RGB = (127.0, 127.0, 127.0)
STDDEV_RGB = (128.0, 128.0, 128.0)


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """Scales channels by `width`, rounded to a multiple of `divisor` (>= 90%)."""
  if width == 1.0:
    return filters
  scaled = filters * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
  return int(math.ceil(depth * repeats))


def block_specs(stages: Sequence[Sequence[int]], width: float, depth: float,
                stem_features: int) -> list[BlockSpec]:
  """Every MBConv block in order, with Lite's fixed stem and end stages."""
  specs = []
  last = len(stages) - 1
  for i, (repeats, kernel, stride, expand, in_f, out_f) in enumerate(stages):
    in_f, out_f = round_filters(in_f, width), round_filters(out_f, width)
    if i == 0:
      in_f = stem_features
    if i not in (0, last):
      repeats = round_repeats(repeats, depth)
    for r in range(repeats):
      specs.append(BlockSpec(kernel, stride if r == 0 else 1, expand,
                             in_f if r == 0 else out_f, out_f))
  return specs


def make_config(variant: str = 'lite0', num_classes: int | None = None,
                **overrides) -> dict:
  """The JSON-serialisable architecture config of a variant ('lite0'.., 'tiny').

  num_classes: None gives the variant's default (ImageNet's 1000; 10 for tiny).
  """
  if variant == 'tiny':
    config = dict(width_coefficient=1.0, depth_coefficient=1.0,
                  dropout_rate=0.0, **TINY)
    num_classes = 10 if num_classes is None else num_classes
  elif variant in VARIANTS:
    width, depth, size, dropout = VARIANTS[variant]
    config = dict(stages=LITE_STAGES, stem_features=32, top_features=1280,
                  image_size=size, width_coefficient=width,
                  depth_coefficient=depth, dropout_rate=dropout)
  else:
    raise ValueError(
        f'Unknown EfficientNet-Lite variant {variant!r}; use one of '
        f'{sorted(VARIANTS) + ["tiny"]}.')
  config.update(model='efficientnet_lite', variant=variant,
                num_classes=1000 if num_classes is None else num_classes,
                drop_connect_rate=0.2, bn_epsilon=1e-3,
                mean_rgb=MEAN_RGB, stddev_rgb=STDDEV_RGB)
  unknown = set(overrides) - set(config)
  if unknown:
    raise ValueError(f'Unknown EfficientNet-Lite config keys {sorted(unknown)}; '
                     f'known: {sorted(config)}.')
  config.update(overrides)
  # Lists, not tuples, so the config survives a JSON round trip unchanged.
  config['stages'] = [list(s) for s in config['stages']]
  config['mean_rgb'], config['stddev_rgb'] = (
      list(config['mean_rgb']), list(config['stddev_rgb']))
  return config


def num_blocks(config: dict) -> int:
  return len(block_specs(config['stages'], config['width_coefficient'],
                         config['depth_coefficient'], config['stem_features']))


def block_names(config: dict) -> tuple[str, ...]:
  """Top-level param keys from input to output, without the head."""
  return ('stem', *(f'blocks_{i}' for i in range(num_blocks(config))), 'top')


def make_preprocess(config: dict):
  return functools.partial(
      preprocessing.normalize_images, default_size=config['image_size'],
      mean=tuple(config['mean_rgb']), std=tuple(config['stddev_rgb']))


# ------------------------------------------------------------------- init

_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'truncated_normal')
_depthwise_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')


def _host_value(path: str, shape: tuple[int, ...], dtype, seed: int) -> np.ndarray:
  """The initial value of one leaf, drawn like the module's own initializer."""
  constant = host_init.batchnorm_conv_constant(path, shape, dtype)
  if constant is not None:
    return constant
  receptive = math.prod(shape[:-2])
  fan = receptive * (shape[-2] if path.endswith('depthwise_conv/kernel') else shape[-1])
  return host_init.truncated_normal(host_init.leaf_rng(seed, path), shape,
                                   math.sqrt(2.0 / fan), dtype)


def init_params(module: 'EfficientNetLite', seed: int = 0, draw=None) -> dict:
  """Initial params drawn on the host (see host_init), like `module.init`'s."""
  return host_init.init_params(module, (1, 32, 32, 3), _host_value, seed, draw=draw)  # shapes ignore resolution


# ------------------------------------------------------------------- modules


class ConvBN(nn.Module):
  """Stem/top: a conv (kxk, or a Dense for 1x1), frozen BN, ReLU6."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  bn_epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x):
    if self.kernel_size == 1 and self.stride == 1:
      x = nn.Dense(self.features, use_bias=False, kernel_init=_conv_init,
                   name='conv')(x)
    else:
      x = nn.Conv(self.features, (self.kernel_size,) * 2, self.stride,
                  padding='SAME', use_bias=False, kernel_init=_conv_init,
                  name='conv')(x)
    x = layers.FrozenBatchNorm(self.bn_epsilon, name='bn')(x)
    return jax.nn.relu6(x)


class MBConvBlock(nn.Module):
  """Inverted bottleneck: 1x1 expand, depthwise kxk, 1x1 project (+ skip)."""
  spec: BlockSpec
  drop_connect_rate: float = 0.0
  bn_epsilon: float = 1e-3
  depthwise_impl: str = 'auto'

  @nn.compact
  def __call__(self, inputs, train: bool = False):
    spec = self.spec
    x = inputs
    if spec.expand_ratio != 1:
      x = nn.Dense(spec.in_features * spec.expand_ratio, use_bias=False,
                   kernel_init=_conv_init, name='expand_conv')(x)
      x = jax.nn.relu6(layers.FrozenBatchNorm(self.bn_epsilon, name='expand_bn')(x))
    x = layers.DepthwiseConv(spec.kernel_size, spec.stride, impl=self.depthwise_impl,
                             kernel_init=_depthwise_init, name='depthwise_conv')(x)
    x = jax.nn.relu6(layers.FrozenBatchNorm(self.bn_epsilon, name='depthwise_bn')(x))
    x = nn.Dense(spec.out_features, use_bias=False, kernel_init=_conv_init,
                 name='project_conv')(x)
    x = layers.FrozenBatchNorm(self.bn_epsilon, name='project_bn')(x)
    if spec.has_skip:
      # Drop-connect (stochastic depth): drop the residual branch per example.
      if self.drop_connect_rate > 0:
        x = nn.Dropout(self.drop_connect_rate, broadcast_dims=(1, 2, 3))(
            x, deterministic=not train)
      x = x + inputs
    return x


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite; returns {'features': pooled [B, D], 'logits': [B, N]}.

  `train=True` enables dropout and drop-connect (rng 'dropout'); BatchNorm
  always uses its stored statistics. `num_classes=0` builds no head.
  """
  stages: tuple[tuple[int, ...], ...] = tuple(LITE_STAGES)
  width_coefficient: float = 1.0
  depth_coefficient: float = 1.0
  num_classes: int = 1000
  stem_features: int = 32
  top_features: int = 1280
  dropout_rate: float = 0.2
  drop_connect_rate: float = 0.2
  bn_epsilon: float = 1e-3
  depthwise_impl: str = 'auto'  # 'shift' | 'lax' | 'auto' (shift on CPU)
  remat: str = 'none'  # layers.REMAT_MODES: recompute each block in the backward pass

  @nn.compact
  def __call__(self, images, train: bool = False) -> dict[str, Any]:
    x = ConvBN(self.stem_features, 3, 2, self.bn_epsilon, name='stem')(images)
    specs = block_specs(self.stages, self.width_coefficient,
                        self.depth_coefficient, self.stem_features)
    for i, spec in enumerate(specs):
      x = layers.remat(MBConvBlock, self.remat, static_argnums=(2,))(
          spec, self.drop_connect_rate * i / len(specs), self.bn_epsilon,
          self.depthwise_impl, name=f'blocks_{i}')(x, train)
    x = ConvBN(self.top_features, bn_epsilon=self.bn_epsilon, name='top')(x)
    features = jnp.mean(x, axis=(1, 2))
    return layers.classifier_outputs(features, self.num_classes, self.dropout_rate, train)

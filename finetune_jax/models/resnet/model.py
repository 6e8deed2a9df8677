"""ResNet-18/34/50/101/152 (He et al., 2015), v1.5 by default.

v1.5 (torchvision, timm, HF transformers) puts a downsampling block's stride
on its 3x3 conv; v1 (the paper, Caffe, keras.applications.ResNet50) puts it on
the first 1x1 conv of the bottleneck: `stride_in_1x1=True`. Keras' ResNets
also have biases in every conv and BatchNorm eps 1.001e-5 (torch: 1e-5), and
take Caffe-style input (BGR, mean subtracted, no scaling) where torchvision /
HF take RGB normalised by the ImageNet mean and std. All of that is config.

Convs pad symmetrically by kernel // 2, as torch does (Keras' explicit
ZeroPadding gives the same); the stem max pool pads with -inf.

Param tree: `stem` {conv, bn}, then `stage{s}_block{b}` (s = 1..4, b = 1..n,
each a top-level key so blocks freeze one at a time) holding conv1, bn1,
conv2, bn2 [, conv3, bn3 for bottlenecks] [, shortcut_conv, shortcut_bn where
the block changes shape], then `head` (Dense). Kernels are HWIO. BN
statistics are `mean`/`var` params (never trained).
"""
import functools
import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from finetune_jax.models import host_init
from finetune_jax.models import layers
from finetune_jax.models import preprocessing

# name -> (block, blocks per stage). stage_features are the standard widths.
DEPTHS = {
    'resnet18': ('basic', (2, 2, 2, 2)),
    'resnet34': ('basic', (3, 4, 6, 3)),
    'resnet50': ('bottleneck', (3, 4, 6, 3)),
    'resnet101': ('bottleneck', (3, 4, 23, 3)),
    'resnet152': ('bottleneck', (3, 8, 36, 3)),
}
# Output channels of each stage; a bottleneck's inner width is a quarter.
STAGE_FEATURES = {'basic': (64, 128, 256, 512), 'bottleneck': (256, 512, 1024, 2048)}
EXPANSION = {'basic': 1, 'bottleneck': 4}

# Four one-block bottleneck stages: the real structure (shortcuts, strides,
# stem pool) at a size that compiles in a blink, for tests.
TINY = dict(block='bottleneck', stage_sizes=(1, 1, 1, 1),
            stage_features=(16, 32, 64, 128), stem_features=8, image_size=32)

# ImageNet statistics on the 0..255 scale (torchvision, HF, timm), RGB.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# keras.applications.resnet50.preprocess_input ('caffe'): BGR, mean only.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def make_config(variant: str = 'resnet50', num_classes: int | None = None,
                **overrides) -> dict:
  """The JSON-serialisable architecture config.

  variant: a DEPTHS name, 'tiny', or 'custom' (then `block` and `stage_sizes`
    must be overridden; `stage_features` defaults to the standard widths).
  num_classes: None gives 1000 (10 for tiny); 0 builds no head.
  overrides: any config key, e.g. stride_in_1x1=True, conv_bias=True.
  """
  if variant == 'tiny':
    config = dict(TINY)
    num_classes = 10 if num_classes is None else num_classes
  elif variant in DEPTHS:
    block, sizes = DEPTHS[variant]
    config = dict(block=block, stage_sizes=sizes,
                  stage_features=STAGE_FEATURES[block], stem_features=64,
                  image_size=224)
  elif variant == 'custom':
    if not {'block', 'stage_sizes'} <= set(overrides):
      raise ValueError("A 'custom' ResNet needs `block` and `stage_sizes`.")
    block = overrides['block']
    config = dict(block=block, stage_sizes=overrides['stage_sizes'],
                  stage_features=STAGE_FEATURES.get(block, ()), stem_features=64,
                  image_size=224)
  else:
    raise ValueError(f'Unknown ResNet variant {variant!r}; use one of '
                     f'{[*DEPTHS, "tiny", "custom"]}.')
  config.update(
      model='resnet', variant=variant,
      num_classes=1000 if num_classes is None else num_classes,
      first_stage_stride=1,  # 2: HF `downsample_in_first_stage`
      stride_in_1x1=False, conv_bias=False, bn_epsilon=1e-5, dropout_rate=0.0,
      channel_order='rgb', pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD)
  unknown = set(overrides) - set(config)
  if unknown:
    raise ValueError(f'Unknown ResNet config keys {sorted(unknown)}; '
                     f'known: {sorted(config)}.')
  config.update(overrides)
  for key in ('stage_sizes', 'stage_features', 'pixel_mean', 'pixel_std'):
    config[key] = list(config[key])  # lists survive a JSON round trip
  _validate(config)
  return config


def _validate(config: dict) -> None:
  problems = []
  if config['block'] not in EXPANSION:
    problems.append(f"block={config['block']!r} is not one of {list(EXPANSION)}")
  if len(config['stage_sizes']) != len(config['stage_features']) or not all(
      n > 0 for n in config['stage_sizes']):
    problems.append(f"stage_sizes {config['stage_sizes']} and stage_features "
                    f"{config['stage_features']} must be positive and of one length")
  if config['first_stage_stride'] not in (1, 2):
    problems.append(f"first_stage_stride={config['first_stage_stride']} is not 1 or 2")
  if config['channel_order'] not in ('rgb', 'bgr'):
    problems.append(f"channel_order={config['channel_order']!r} is not 'rgb' or 'bgr'")
  if problems:
    raise ValueError('Bad ResNet config: ' + '; '.join(problems) + '.')


def block_names(config: dict) -> tuple[str, ...]:
  """Top-level param keys from input to output, without the head."""
  return ('stem', *(f'stage{s}_block{b}'
                    for s, n in enumerate(config['stage_sizes'], 1)
                    for b in range(1, n + 1)))


def make_preprocess(config: dict):
  return functools.partial(
      preprocessing.normalize_images, default_size=config['image_size'],
      channel_order=config['channel_order'],
      mean=tuple(config['pixel_mean']), std=tuple(config['pixel_std']))


# ------------------------------------------------------------------- init

# torchvision's init: He normal over fan_out (not truncated).
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _host_value(path: str, shape: tuple[int, ...], dtype, seed: int) -> np.ndarray:
  """The initial value of one leaf, drawn like the module's own initializer."""
  constant = host_init.batchnorm_conv_constant(path, shape, dtype)
  if constant is not None:
    return constant
  std = math.sqrt(2.0 / (math.prod(shape[:-2]) * shape[-1]))
  rng = host_init.leaf_rng(seed, path)
  return (rng.standard_normal(shape, np.float32) * std).astype(dtype)


def init_params(module: 'ResNet', seed: int = 0, draw=None) -> dict:
  """Initial params drawn on the host with numpy (the structure and
  distributions of `module.init`, without compiling an RNG kernel per leaf).

  BN scales start at 1, not at 0 in the last BN of each branch (timm's
  zero_init_last): with the zero-initialised head that would leave almost
  no gradient for the body at the start (measured: 40 steps on MNIST reach
  loss 0.64 with scales at 1, 1.9 with them at 0).
  """
  return host_init.init_params(module, (1, 32, 32, 3), _host_value, seed, draw=draw)  # shapes ignore resolution


# ------------------------------------------------------------------- modules


def _conv(features: int, kernel: int, stride: int, bias: bool, name: str) -> nn.Conv:
  pad = kernel // 2  # torch's padding; equals Keras' for these kernels
  return nn.Conv(features, (kernel, kernel), stride, padding=((pad, pad), (pad, pad)),
                 use_bias=bias, kernel_init=_conv_init, name=name)


class StemConvBN(nn.Module):
  """The 7x7 stride-2 conv and its BN (ReLU and max pool follow)."""
  features: int = 64
  conv_bias: bool = False
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    x = _conv(self.features, 7, 2, self.conv_bias, 'conv')(x)
    return layers.FrozenBatchNorm(self.bn_epsilon, name='bn')(x)


class ResidualBlock(nn.Module):
  """Basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1) block with a shortcut."""
  block: str
  features: int  # output channels
  stride: int = 1
  stride_in_1x1: bool = False
  conv_bias: bool = False
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, inputs):
    bias, eps = self.conv_bias, self.bn_epsilon
    if self.block == 'basic':
      convs = [(self.features, 3, self.stride), (self.features, 3, 1)]
    else:
      width = self.features // EXPANSION['bottleneck']
      s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
      convs = [(width, 1, s1), (width, 3, s3), (self.features, 1, 1)]
    x = inputs
    for i, (features, kernel, stride) in enumerate(convs, 1):
      x = _conv(features, kernel, stride, bias, f'conv{i}')(x)
      x = layers.FrozenBatchNorm(eps, name=f'bn{i}')(x)
      if i < len(convs):
        x = nn.relu(x)
    shortcut = inputs
    if self.stride != 1 or inputs.shape[-1] != self.features:
      shortcut = _conv(self.features, 1, self.stride, bias, 'shortcut_conv')(inputs)
      shortcut = layers.FrozenBatchNorm(eps, name='shortcut_bn')(shortcut)
    return nn.relu(x + shortcut)


class ResNet(nn.Module):
  """ResNet; returns {'features': pooled [B, D], 'logits': [B, N]}.

  `train=True` enables dropout before the head (rng 'dropout'; rate 0 by
  default, as in torchvision); BatchNorm always uses its stored statistics.
  `num_classes=0` builds no head.
  """
  block: str = 'bottleneck'
  stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
  stage_features: tuple[int, ...] = (256, 512, 1024, 2048)
  stem_features: int = 64
  num_classes: int = 1000
  first_stage_stride: int = 1
  stride_in_1x1: bool = False
  conv_bias: bool = False
  bn_epsilon: float = 1e-5
  dropout_rate: float = 0.0
  remat: str = 'none'  # layers.REMAT_MODES: recompute each block in the backward pass

  @nn.compact
  def __call__(self, images, train: bool = False) -> dict[str, Any]:
    x = StemConvBN(self.stem_features, self.conv_bias, self.bn_epsilon, name='stem')(images)
    x = nn.max_pool(nn.relu(x), (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for s, (n, features) in enumerate(zip(self.stage_sizes, self.stage_features)):
      for b in range(n):
        stride = (self.first_stage_stride if s == 0 else 2) if b == 0 else 1
        x = layers.remat(ResidualBlock, self.remat)(
            self.block, features, stride, self.stride_in_1x1, self.conv_bias,
            self.bn_epsilon, name=f'stage{s + 1}_block{b + 1}')(x)
    features = jnp.mean(x, axis=(1, 2))
    return layers.classifier_outputs(features, self.num_classes, self.dropout_rate, train)


def variant_of(block: str, stage_sizes: Sequence[int]) -> str | None:
  """'resnet50' etc. for a standard (block, stage sizes); None otherwise."""
  for name, (b, sizes) in DEPTHS.items():
    if b == block and tuple(sizes) == tuple(stage_sizes):
      return name
  return None


def variant_in_name(path: str) -> str | None:
  """The depth a file or dir name claims ('resnet50.pth', 'resnet-50')."""
  name = re.split(r'[/\\]', str(path).rstrip('/\\'))[-1].lower()
  m = re.search(r'resnet[-_]?(\d+)(?![0-9])', name)
  return f'resnet{m[1]}' if m else None

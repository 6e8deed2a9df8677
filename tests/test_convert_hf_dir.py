"""The HF dir reader: single and sharded safetensors, bf16, corrupt files."""
import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from finetune_jax import errors
from finetune_jax.formats import hf_dir


def write_dir(path, shards):
  path.mkdir()
  (path / 'config.json').write_text(json.dumps({'model_type': 'toy'}))
  weight_map = {}
  for i, tensors in enumerate(shards):
    name = f'model-{i:05d}-of-{len(shards):05d}.safetensors' if len(shards) > 1 else 'model.safetensors'
    safetensors.numpy.save_file(tensors, str(path / name))
    weight_map.update({k: name for k in tensors})
  if len(shards) > 1:
    (path / hf_dir.INDEX).write_text(json.dumps({'weight_map': weight_map}))
  return path


def test_single_and_sharded_dirs_read_the_same(tmp_path):
  a = {'x': np.arange(6, dtype=np.float32).reshape(2, 3)}
  b = {'y': np.ones(4, dtype=ml_dtypes.bfloat16)}
  for d in (write_dir(tmp_path / 'one', [{**a, **b}]), write_dir(tmp_path / 'two', [a, b])):
    config, tensors = hf_dir.read_hf_dir(str(d))
    assert config == {'model_type': 'toy'}
    np.testing.assert_array_equal(tensors['x'], a['x'])
    assert tensors['y'].dtype == ml_dtypes.bfloat16


def test_corrupt_header_and_missing_weights_are_named(tmp_path):
  d = write_dir(tmp_path / 'm', [{'x': np.ones(2, np.float32)}])
  (d / 'model.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{garbage')
  with pytest.raises(errors.CheckpointError, match='not a readable safetensors') as e:
    hf_dir.read_hf_dir(str(d))
  assert e.value.file == str(d / 'model.safetensors') and e.value.key is None
  (d / 'model.safetensors').unlink()
  with pytest.raises(errors.CheckpointError, match='no \\*.safetensors weights') as e:
    hf_dir.read_hf_dir(str(d))
  assert e.value.file == str(d)

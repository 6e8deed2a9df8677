"""Hugging Face model dirs: config.json plus *.safetensors (single or sharded).

  config, tensors = read_hf_dir('path/to/model')   # dict, {name: np.ndarray}

Only safetensors are read: a dir holding only pytorch_model.bin can be read
with `torch_state_dict.load_torch_state_dict` (no pickle execution).
"""
import json
import os

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for bf16 tensors)
import numpy as np
import safetensors
import safetensors.numpy
import tokenizers

from finetune_jax import errors

INDEX = 'model.safetensors.index.json'


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, OSError) as e:
    raise errors.CheckpointError(
        path, f'not a readable safetensors file ({e}). It may be truncated or '
        'corrupt: download or export it again.') from None


def read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise errors.CheckpointError(path, f'cannot read it as JSON ({e}).') from None


def read_config(model_dir: str) -> dict:
  return read_json(os.path.join(model_dir, 'config.json'))


def read_tokenizer(model_dir: str) -> tokenizers.Tokenizer | None:
  """The dir's tokenizer.json, or None without one (only tasks on text need it)."""
  path = os.path.join(model_dir, 'tokenizer.json')
  if not os.path.exists(path):
    return None
  try:
    return tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception on bad JSON
    raise errors.CheckpointError(path, f'not a readable tokenizer ({e}). Save it again with '
                                 '`tokenizer.save_pretrained(dir)`.') from None


def safetensors_files(model_dir: str) -> list[str]:
  """The weight files of `model_dir`, from the shard index when there is one."""
  index = os.path.join(model_dir, INDEX)
  if os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    files = [os.path.join(model_dir, s) for s in shards]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
      raise errors.CheckpointError(index, f'names shards that are missing: {missing}.')
    return files
  files = sorted(os.path.join(model_dir, f) for f in os.listdir(model_dir)
                 if f.endswith('.safetensors'))
  if not files:
    raise errors.CheckpointError(
        model_dir, 'no *.safetensors weights. Save the model with '
        '`save_pretrained(dir, safe_serialization=True)`.')
  return files


def read_hf_dir(model_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
  tensors = {}
  for path in safetensors_files(model_dir):
    for name, value in read_safetensors(path).items():
      if name in tensors:
        raise errors.CheckpointError(model_dir, 'in more than one shard.', key=name)
      tensors[name] = value
  return read_config(model_dir), tensors

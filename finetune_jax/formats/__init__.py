"""Checkpoint file formats, read without knowing any architecture.

  torch_state_dict  PyTorch .pth/.pt/.bin files, unpickled without running code
  keras_h5          Keras 2 and Keras 3 .h5 weight files
  hf_dir            Hugging Face dirs: config.json, safetensors (+ index)
  gguf              llama.cpp GGUF files: metadata, dequantised tensors, tokenizer
  mapping           what the per-architecture key maps share (templates, checks)

Architectures turn what these return into their params (`models/<arch>/convert.py`)
and say which of `FORMATS` they read (`Architecture.readers`). A file that
cannot be read raises `errors.CheckpointError` (file, why, key).
"""
import os

from finetune_jax.formats.torch_state_dict import load_torch_state_dict
from finetune_jax.formats.torch_state_dict import read_torch_checkpoint

# A checkpoint path -> its format: the first test that holds.
FORMATS = {
    'hf_dir': lambda p: os.path.isdir(p) and os.path.exists(os.path.join(p, 'config.json')),
    'keras_h5': lambda p: p.endswith('.h5'),
    'torch': lambda p: p.endswith(('.pth', '.pt', '.bin')),
    'safetensors': lambda p: p.endswith('.safetensors'),
    'npz': lambda p: p.endswith('.npz'),
    'gguf': lambda p: p.endswith('.gguf'),
}


def format_of(path: str) -> str | None:
  """The `FORMATS` key of a checkpoint path, or None for none of them."""
  return next((name for name, test in FORMATS.items() if test(path)), None)


__all__ = ['FORMATS', 'format_of', 'load_torch_state_dict', 'read_torch_checkpoint']

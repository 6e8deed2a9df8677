"""Checkpoint file formats, read without knowing any architecture.

  torch_state_dict  PyTorch .pth/.pt/.bin files, unpickled without running code
  keras_h5          Keras 2 and Keras 3 .h5 weight files
  hf_dir            Hugging Face dirs: config.json, safetensors (+ index)
  mapping           what the per-architecture key maps share (templates, checks)

Architectures turn what these return into their params (`models/<arch>/convert.py`).
"""
from finetune_jax.formats.torch_state_dict import CheckpointFormatError
from finetune_jax.formats.torch_state_dict import load_torch_state_dict
from finetune_jax.formats.torch_state_dict import read_torch_checkpoint
from finetune_jax.formats.torch_state_dict import UnsafeCheckpointError

__all__ = ['CheckpointFormatError', 'UnsafeCheckpointError', 'load_torch_state_dict',
           'read_torch_checkpoint']

"""Checkpoint readers: foreign formats in, numpy arrays / param trees out.

Loading never executes a pickle from a checkpoint file.
"""
from finetune_jax.convert.torch_state_dict import CheckpointFormatError
from finetune_jax.convert.torch_state_dict import load_torch_state_dict
from finetune_jax.convert.torch_state_dict import read_torch_checkpoint
from finetune_jax.convert.torch_state_dict import UnsafeCheckpointError

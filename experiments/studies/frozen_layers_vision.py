r"""Study: how many blocks to freeze, on the vision default.

`partial` with the first 0 (full fine-tuning), 5, 9 (the default: stem and blocks 0-7),
13 and 17 of EfficientNet-Lite0's 18 blocks frozen, and `linear_probe` (everything but the
head); accuracy, step time (train_examples_per_sec), optimizer state and peak memory per
setting, 3 seeds. Budget as lr_vision.py: 700 steps, 5000 images for validation.

  python -m finetune_jax.sweep --config experiments/studies/frozen_layers_vision.py \
      --workdir runs/frozen_layers_vision --seeds 3
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _vision import vision_config  # noqa: E402


def get_config(arg=None):
  return vision_config(arg)


def get_sweep(arg=None):
  del arg
  return ([{'peft.method': 'partial', 'peft.num_frozen_blocks': n} for n in (0, 5, 9, 13, 17)]
          + [{'peft.method': 'linear_probe'}])

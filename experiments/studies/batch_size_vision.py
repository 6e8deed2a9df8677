r"""Study: batch size at the same number of epochs, learning rates scaled linearly.

Batch 32, 64 (the default) and 128 on the vision default, each for 0.8 epoch (1400, 700 and 350
steps), with the body and head learning rates scaled with the batch (1.5e-4 / 5e-4, 3e-4 / 1e-3,
6e-4 / 2e-3); 3 seeds. 5000 images held out for validation.

  python -m finetune_jax.sweep --config experiments/studies/batch_size_vision.py \
      --workdir runs/batch_size_vision --seeds 3
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _vision import vision_config  # noqa: E402


def get_config(arg=None):
  return vision_config(arg)


def get_sweep(arg=None):
  del arg
  points = []
  for batch in (32, 64, 128):
    scale = batch / 64
    steps = int(700 / scale)
    points.append({'batch_size': batch, 'total_steps': steps, 'eval_every': steps // 2,
                   'checkpoint_every': steps // 2, 'learning_rate': 3e-4 * scale,
                   'head_learning_rate': 1e-3 * scale})
  return points

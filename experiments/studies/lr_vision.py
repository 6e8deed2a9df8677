r"""Study: the seed's "learning rate about 10x below pre-training" rule, on the vision default.

EfficientNet-Lite0 (ImageNet) on Fashion-MNIST as configs/default.py (`partial`, stem and
blocks 0-7 frozen), with the body's learning rate at 10x, 1x, 0.1x and 0.01x of the default's
3e-4 (ImageNet pre-training peaked near 3e-3 per 64 images, so 10x is the pre-training rate) and
the new head's at 1e-3 throughout; 3 seeds each. Budget for 2 CPU cores: 700 steps (0.8 epoch)
instead of 1400, 5000 training images held out for validation and selection, test reported.

  python -m finetune_jax.sweep --config experiments/studies/lr_vision.py \
      --workdir runs/lr_vision --seeds 3
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _vision import vision_config  # noqa: E402


def get_config(arg=None):
  return vision_config(arg)


def get_sweep(arg=None):
  del arg
  # 10x, 1x, 0.1x and 0.01x of the default's 3e-4, written out so the run names stay short.
  return [{'learning_rate': lr} for lr in (3e-3, 3e-4, 3e-5, 3e-6)]

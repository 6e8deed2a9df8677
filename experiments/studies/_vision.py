"""The vision default at a study's budget: what every vision study shares.

EfficientNet-Lite0 (ImageNet) on Fashion-MNIST as configs/default.py, with 5000 training
images held out for validation (selection) and the test split reported. 2 CPU cores fit
about 700 steps (0.8 epoch) per run in a 90-minute study of a dozen runs.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'configs'))
import default  # noqa: E402  (configs/default.py)


def vision_config(arg=None, steps: int = 700):
  c = default.get_config(arg)
  c.total_steps = steps
  c.eval_every = c.checkpoint_every = steps // 2
  c.validation_examples = 5000.0
  return c

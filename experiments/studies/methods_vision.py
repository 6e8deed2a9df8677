r"""Study: every method that applies to a CNN, on the vision default, with its cost.

full, partial (the default), bitfit, linear_probe, lora, dora and lp_ft on EfficientNet-Lite0
/ Fashion-MNIST: accuracy against trainable params (the report's cost_quality.png), optimizer
state, step time and peak memory; 3 seeds, 700 steps, 5000 images for validation. (IA3,
adapters, prompt and prefix tuning need attention layers.) The config is distortion_vision's,
shifted test sets and feature drift included, so that study's full, linear_probe, lp_ft and
lora runs are exactly this study's: copy them into the workdir and the sweep skips them.

  cp -r runs/distortion_vision/peft.method=* runs/methods_vision/   # optional: reuse them
  python -m finetune_jax.sweep --config experiments/studies/methods_vision.py \
      --workdir runs/methods_vision --seeds 3

Measured (test accuracy, mean of 3 seeds; experiments/results/methods_vision/): full 0.918,
lp_ft 0.912, partial 0.911, lora 0.913, dora 0.913, bitfit 0.869, linear_probe 0.857; validation
selects full. DoRA's runs, made at a later stop, are reported in dora/.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distortion_vision  # noqa: E402


def get_config(arg=None):
  return distortion_vision.get_config(arg)


def get_sweep(arg=None):
  del arg
  return [{'peft.method': m} for m in
          ('full', 'partial', 'bitfit', 'linear_probe', 'lora', 'dora', 'lp_ft')]

r"""Study: does fine-tuning distort features (Kumar et al. 2022)? FT, LP, LP-FT and LoRA.

On the vision default: full fine-tuning, a linear probe, LP-FT (probe 200 steps, then full)
and LoRA on the convs, each reporting the Fashion-MNIST test accuracy (in distribution),
the accuracy on the five fixed shifts of fashion_mnist_shifted (out of distribution), and
the feature drift (linear CKA and cosine of the pooled features, start against end, on 2000
test images); 3 seeds, 700 steps, 5000 images for validation.

  python -m finetune_jax.sweep --config experiments/studies/distortion_vision.py \
      --workdir runs/distortion_vision --seeds 3
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _vision import vision_config  # noqa: E402

SHIFTS = ('rotate', 'contrast', 'noise', 'blur', 'invert')


def get_config(arg=None):
  c = vision_config(arg)
  c.extra_evals = tuple((s, 'fashion_mnist_shifted', s) for s in SHIFTS)
  c.feature_drift_examples = 2000
  c.peft.lp_ft.probe_steps = 200
  return c


def get_sweep(arg=None):
  del arg
  return [{'peft.method': 'full'}, {'peft.method': 'linear_probe'},
          {'peft.method': 'lp_ft'}, {'peft.method': 'lora'}]

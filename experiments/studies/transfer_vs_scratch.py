r"""Study: does transfer need less data? Pretrained against random init, by training-set size.

EfficientNet-Lite0 fine-tuned in full (every layer trains, so the two inits are compared on
equal terms) from ImageNet weights or from random init (`efficientnet-lite0-random`, the head
and the body initialised as in training from scratch), on 300, 3000 and all 55000 of the
Fashion-MNIST training images left after the 5000 held out for validation; 3 seeds. Budget for
2 CPU cores (18 runs of 4 to 11 minutes): 500 steps of batch 32 each (about 53 epochs of the
300, 0.3 epoch of the full set) and one evaluation, at the end; scratch trains the whole body
at the head's rate, 1e-3. BatchNorm statistics never train here (the project's
rule for fine-tuning), so the random init normalises with its initial statistics: a handicap
of scratch training that the report should be read with.

  python -m finetune_jax.sweep --config experiments/studies/transfer_vs_scratch.py \
      --workdir runs/transfer_vs_scratch --seeds 3

Measured (test accuracy, mean of 3 seeds; experiments/results/transfer_vs_scratch/): ImageNet
weights 0.837 / 0.895 / 0.900 on 300 / 3000 / all (`train_examples=0`) images, random init
0.735 / 0.786 / 0.801: transfer with 300 images beats scratch with all of them at this budget.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _vision import vision_config  # noqa: E402


def get_config(arg=None):
  c = vision_config(arg, steps=500)
  c.peft.method = 'full'
  c.batch_size = 32
  c.eval_every = c.total_steps
  return c


def get_sweep(arg=None):
  del arg
  inits = [{'pretrained': 'efficientnet-lite0'},
           {'pretrained': 'efficientnet-lite0-random', 'learning_rate': 1e-3}]
  return [{**init, 'train_examples': float(n)} for init in inits for n in (300, 3000, 0)]

r"""Study: every method on MiniLM fortunes, with its cost.

full, partial, bitfit, linear_probe, lora, dora, ia3, adapter, prompt_tuning, prefix_tuning
and lp_ft on all-MiniLM-L6-v2 / fortunes topics: test accuracy and macro-F1 (selected on
validation) against trainable params (the report's cost_quality.png), optimizer state, step
time and peak memory; 3 seeds. Budget as _text.py, at 100 steps: 33 runs in about 90 minutes.

  python -m finetune_jax.sweep --config experiments/studies/methods_text.py \
      --workdir runs/methods_text --seeds 3
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _text import text_config  # noqa: E402

METHODS = ('full', 'partial', 'bitfit', 'linear_probe', 'lora', 'dora', 'ia3', 'adapter',
           'prompt_tuning', 'prefix_tuning', 'lp_ft')


def get_config(arg=None):
  c = text_config(arg, steps=100)
  c.peft.num_frozen_blocks = 4  # partial: the embeddings and the first 3 of 6 layers
  c.peft.lp_ft.probe_steps = 30
  return c


def get_sweep(arg=None):
  del arg
  return [{'peft.method': m} for m in METHODS]

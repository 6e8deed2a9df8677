"""MiniLM on fortunes at a study's budget: what the text studies share.

all-MiniLM-L6-v2 (real weights) classifying the 8 fortunes topics as configs/minilm_fortunes.py,
with 500 training texts held out for validation (selection) and the test split reported. To fit a
dozen-run study in about 90 minutes on 2 CPU cores: texts cut to their first 64 tokens (128 in
the config), batches of 16 (32) and 150 steps (600), about half an epoch.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'configs'))
import minilm_fortunes  # noqa: E402  (configs/minilm_fortunes.py)


def text_config(arg=None, steps: int = 150):
  c = minilm_fortunes.get_config(arg)
  c.text.max_length = 64
  c.batch_size = 16
  c.total_steps = steps
  c.warmup_steps = steps // 10
  c.eval_every = c.checkpoint_every = steps // 2
  c.log_every = 25
  c.validation_examples = 500.0
  return c

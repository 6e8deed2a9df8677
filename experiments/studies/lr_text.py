r"""Study: the seed's "learning rate about 10x below pre-training" rule, on MiniLM fortunes.

all-MiniLM-L6-v2 fully fine-tuned on the fortunes topics (configs/minilm_fortunes.py), the
body's learning rate at 10x, 1x, 0.1x and 0.01x of the config's 1e-4 (BERT pre-training peaked
at 1e-4 to 5e-4, so 10x is at or above pre-training's own rate), the head's at its config's
1e-3 throughout; 3 seeds. Budget as _text.py: 64 tokens, batches of 16, 150 steps, 500 texts held
out for validation and selection, the test split reported.

  python -m finetune_jax.sweep --config experiments/studies/lr_text.py \
      --workdir runs/lr_text --seeds 3
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _text import text_config  # noqa: E402


def get_config(arg=None):
  return text_config(arg)


def get_sweep(arg=None):
  del arg
  base = text_config().learning_rate
  # Rounded to 3 digits, so 1e-4 * 0.01 is 1e-06 in the run's name, not 1.0000000000000002e-06.
  return [{'learning_rate': float(f'{base * f:.3g}')} for f in (10.0, 1.0, 0.1, 0.01)]

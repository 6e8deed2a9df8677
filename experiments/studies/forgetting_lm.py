r"""Study: does LoRA learn less and forget less (Biderman et al. 2024)? Full against LoRA on
SmolLM2.

SmolLM2-135M-Instruct (real weights) fine-tuned on the songs and poems of fortunes
(configs/smollm2_poems.py) fully, and with LoRA (rank 8 on q and v; its usual 10x higher
rate), reporting the poems' held-out perplexity (what it learned) and Jane Austen's (what it
kept of its source ability) before and after; 3 seeds. Budget for 2 CPU cores: rows of 128
tokens, batches of 8, 40 steps, 60 poems held out for validation, and evaluations at the start
and the end only, on the poems' test split (149 rows) and the first 128 Austen test rows.

  python -m finetune_jax.sweep --config experiments/studies/forgetting_lm.py \
      --workdir runs/forgetting_lm --seeds 3

Measured (mean of 3 seeds; experiments/results/forgetting_lm/): poems test perplexity 85.35 ->
41.64 full, 52.52 LoRA; Austen perplexity 74.67 -> 55.63 full, 58.96 LoRA. LoRA learns less;
neither forgets at this budget (both improve on Austen).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'configs'))
import smollm2_poems  # noqa: E402  (configs/smollm2_poems.py)


def get_config(arg=None):
  c = smollm2_poems.get_config(arg)
  c.text.max_length = 128
  c.total_steps = 40
  c.warmup_steps = 5
  c.eval_every = c.total_steps
  c.checkpoint_every = 20
  c.validation_examples = 60.0
  c.generation.prompts = ()
  c.extra_evals = (('austen', 'austen', 'test[:128]'),)
  c.peft.lora.targets = ('q', 'v')
  return c


def get_sweep(arg=None):
  del arg
  return [{'peft.method': 'full', 'learning_rate': 1e-4},
          {'peft.method': 'lora', 'learning_rate': 1e-3}]

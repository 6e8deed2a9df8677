"""Prompt tuning (Lester et al., 2021): P learned vectors before the token embeddings.

The model sees [prompt_1 .. prompt_P, embed(x_1) .. embed(x_T)] with the
attention mask extended by P ones, the positions 0 .. P + T - 1 and, for
BERT, token type 0 on the prompt: what HF PEFT's prompt tuning feeds
transformers, so PEFT's adapter files carry over (hf_format). A decoder's
per-token outputs ('logits', 'last_hidden_state') come back for the T input
tokens only, so the loss and the sampler see the shapes they gave; an
encoder's pooled features read the sequence as it is (BERT's 'cls' pooling
then reads the first prompt vector, as HF's pooler does).

The vectors are the top-level param 'prompt_embeddings' (P, D);
`peft.prompt_tuning.init` starts them from
  'vocab'   the embeddings of P tokens drawn uniformly from the vocabulary
            (HF PEFT's SAMPLE_VOCAB; the paper's best init after 'text');
  'text'    the embeddings of `init_text`'s tokens (special tokens included,
            as HF's tokenizer call), repeated or cut to P (HF PEFT's TEXT);
  'random'  N(0, s^2), s the embedding table's own std (HF PEFT's RANDOM
            draws N(0, 1), far from the scale of most tables).
Only the prompt trains, plus a classifier head (new, so it must train).
A decoder generates with the prompt's keys and values in its cache
(`init_cache`): causal attention makes that the same as prepending.
"""
import dataclasses

import jax.numpy as jnp
import numpy as np

from finetune_jax import quantized
from finetune_jax.models import architecture
from finetune_jax.peft import base
from finetune_jax.peft import method
from finetune_jax.peft import paths
from finetune_jax.peft import virtual_tokens

KEY = 'prompt_embeddings'
INITS = ('vocab', 'text', 'random')


@dataclasses.dataclass(frozen=True)
class PromptTuned(virtual_tokens.VirtualTokens):
  """`base` with the prompt before its token embeddings."""

  def _embeddings(self, params) -> jnp.ndarray:
    return paths.flatten(params)[self.embedding]

  def _call(self, prompt, variables, input_ids, attention_mask, positions, kwargs):
    n = self.num_virtual_tokens
    embeds = kwargs.pop('inputs_embeds', None)
    if embeds is None:
      ids = jnp.asarray(input_ids)
      embeds = quantized.take(self._embeddings(variables['params']), ids)
    batch, length = embeds.shape[:2]
    prompt = jnp.broadcast_to(prompt.astype(embeds.dtype), (batch, *prompt.shape))
    embeds = jnp.concatenate([prompt, embeds], axis=1)
    mask = virtual_tokens.with_ones(attention_mask, batch, length, n)
    if 'token_type_ids' in kwargs:
      types = jnp.asarray(kwargs['token_type_ids'])
      kwargs['token_type_ids'] = jnp.concatenate(
          [jnp.zeros((batch, n), types.dtype), types], axis=1)
    if positions is not None:
      kwargs['positions'] = jnp.concatenate(
          [jnp.broadcast_to(jnp.arange(n), (batch, n)), jnp.asarray(positions) + n], axis=1)
    out = self.base.apply(variables, None, mask, inputs_embeds=embeds, **kwargs)
    per_token = ('logits', 'last_hidden_state') if self.decoder else ('last_hidden_state',)
    return {k: v[:, n:] if k in per_token else v for k, v in out.items()}

  def init_cache(self, params, batch: int, max_length: int) -> dict:
    """A cache of P + max_length slots, the prompt's keys and values in the first P."""
    if not self.decoder:
      raise ValueError('This model is an encoder: it has no cached generation.')
    prompt, params = self.split(params)
    cache = virtual_tokens.empty_cache(self.spec, batch, self.num_virtual_tokens + max_length,
                                       prompt.dtype)
    embeds = jnp.broadcast_to(prompt, (batch, *prompt.shape))
    return self.base.apply({'params': params}, None, None, inputs_embeds=embeds,
                           cache=cache)['cache']


def adapt(model, cfg) -> base.Adapted:
  """A prompt of `cfg.prompt_tuning.num_virtual_tokens` vectors, started as `init` says."""
  embedding = virtual_tokens.check_applicable(model, 'prompt_tuning')
  n, init, text = _options(cfg)
  flat = paths.flatten(model.params)
  if KEY in flat:
    raise ValueError('These params already hold a prompt; adapt the plain pretrained model.')
  table = np.asarray(quantized.dequantize(flat[embedding]))
  if init == 'random':
    rng = virtual_tokens.leaf_rng(KEY)
    prompt = rng.normal(0.0, float(table.std()), (n, table.shape[1]))
  else:
    ids = (virtual_tokens.sample_token_ids(model, n, seed=0) if init == 'vocab'
           else _text_ids(model, text, n))
    prompt = table[ids]
  params = {**model.params, KEY: jnp.asarray(prompt, table.dtype)}
  module = PromptTuned(model.module, n, KEY, virtual_tokens.cache_spec(model.config), embedding,
                       architecture.of(model).decoder)
  return base.Adapted(module, params, frozenset({KEY}) | base.head_leaves(model))


def _text_ids(model, text: str, n: int) -> np.ndarray:
  """`text`'s token ids repeated or cut to n, as HF PEFT's TEXT init."""
  if model.tokenizer is None:
    raise ValueError("peft.prompt_tuning.init='text' needs the model's tokenizer, and this "
                     "model has none: use init='vocab'.")
  ids = model.tokenizer.encode(text).ids
  if not ids:
    raise ValueError(f'peft.prompt_tuning.init_text={text!r} gives no tokens.')
  return np.resize(np.asarray(ids), n)  # repeats, then cuts


def _options(cfg) -> tuple[int, str, str]:
  c, n, init = virtual_tokens.section_options(cfg, 'prompt_tuning', INITS)
  text = c.init_text or ''
  if (init == 'text') != bool(text.strip()):
    raise ValueError("peft.prompt_tuning.init='text' and a non-empty "
                     'peft.prompt_tuning.init_text go together: set both, or neither.')
  return n, init, text


class PromptTuning(virtual_tokens.VirtualTokensMethod):
  name = 'prompt_tuning'
  section = 'prompt_tuning'
  peft_types = ('PROMPT_TUNING',)

  def adapt(self, model, cfg) -> base.Adapted:
    return adapt(model, cfg)

  def options(self, cfg):
    return _options(cfg)

  def peft_rows(self, model, module, params):
    """Our prompt (P, D) is PEFT's. PEFT draws a new prompt by prompt_tuning_init; a
    saved one replaces it, and TEXT would make PEFT load a tokenizer, so RANDOM."""
    prompt = np.asarray(params[KEY])
    return prompt, {
        'token_dim': prompt.shape[-1], 'num_attention_heads': model.config['num_heads'],
        'prompt_tuning_init': 'RANDOM', 'prompt_tuning_init_text': None,
        'tokenizer_name_or_path': None, 'tokenizer_kwargs': None}

  def peft_widths(self, model):
    table = paths.flatten(model.params)[virtual_tokens.embedding_path(model)]
    mine = {'token_dim': int(np.shape(table)[-1]),
            'num_layers': virtual_tokens.cache_spec(model.config)[0],
            'num_attention_heads': model.config['num_heads']}
    return mine, mine['token_dim']

  def params_from_rows(self, path, cfg, module, flat, rows):
    return {KEY: rows}


method.register(PromptTuning())

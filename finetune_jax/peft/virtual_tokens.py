"""What prompt and prefix tuning share: P learned positions before the input.

Prompt tuning prepends P learned vectors to the token embeddings; prefix
tuning prepends P learned keys and values to every attention layer. Neither
edits a model file: they drive the language models through two inputs that
transformers models have as well (and HF PEFT uses the same way):
`inputs_embeds`, and a key/value cache (`past_key_values`) whose first P
slots hold the prefix. Classes here wrap the base module and duck-type
linen's `apply`, like `intercept.Intercepted`; they are frozen dataclasses so
that `jax.jit(..., static_argnames='module')` can hash them.

A decoder's cached generation needs the P slots in its cache: `generate`
asks the module for one (`init_cache`) and passes it back on every call;
the wrapper then prepends P ones to the attention mask and shifts explicit
positions by P, so the text keeps the positions it had in training
(P, P + 1, ..., as in HF PEFT).
"""
import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from finetune_jax.models import attention
from finetune_jax.models import host_init
from finetune_jax.peft import base

# model.config['model'] -> the token-embedding table's param path.
EMBEDDINGS = {
    'bert': 'embeddings/word_embeddings/embedding',
    'gpt2': 'wte/embedding',
    'llama': 'embed_tokens/embedding',
}
DECODERS = ('gpt2', 'llama')  # their logits are per token: the P extra rows are cut off


def check_applicable(model, method: str) -> str:
  """The model's family, or the error for a model without token embeddings (a CNN)."""
  family = model.config.get('model')
  if family not in EMBEDDINGS:
    raise base.not_applicable(
        model, method, 'a language model with token embeddings and attention '
        f'({"/".join(sorted(EMBEDDINGS))})',
        'Choose another peft.method for it (lora, bitfit, partial, linear_probe, ...).')
  return family


def section_options(cfg, method: str, inits: tuple):
  """(the method's config section, num_virtual_tokens, init), both checked."""
  if method not in cfg:
    raise ValueError(f'The peft config has no `{method}` section; start the config '
                     'from base_config.get_config().')
  c = cfg[method]
  n = c.num_virtual_tokens
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    raise ValueError(f'peft.{method}.num_virtual_tokens={n!r} must be a positive integer.')
  if c.init not in inits:
    raise ValueError(f'peft.{method}.init={c.init!r} must be one of {inits}.')
  return c, n, c.init


def cache_spec(config: dict) -> tuple[int, int, int]:
  """(layers, key/value heads, head dim) of a BERT, GPT-2 or Llama config."""
  heads = config['num_heads']
  return (config['num_layers'], config.get('num_kv_heads') or heads,
          config.get('head_dim') or config['hidden_size'] // heads)


def sample_token_ids(model, n: int, seed: int) -> np.ndarray:
  """n token ids drawn uniformly from the vocabulary (HF PEFT's SAMPLE_VOCAB init)."""
  vocab = model.config['vocab_size']
  return np.random.default_rng(seed).integers(0, vocab, n)


def empty_cache(spec, batch: int, slots: int, dtype) -> dict:
  layers, kv_heads, head_dim = spec
  return attention.init_cache(dict(num_layers=layers, num_kv_heads=kv_heads,
                                   head_dim=head_dim), batch, slots, dtype)


def with_ones(mask, batch: int, length: int, n: int):
  """[B, n + length]: n ones (the virtual positions) before `mask` (None: all ones)."""
  if mask is None:
    mask = jnp.ones((batch, length), jnp.int32)
  mask = jnp.asarray(mask)
  return jnp.concatenate([jnp.ones((batch, n), mask.dtype), mask], axis=1)


def batch_size(input_ids, inputs_embeds=None) -> int:
  return int(np.shape(input_ids if inputs_embeds is None else inputs_embeds)[0])


@dataclasses.dataclass(frozen=True)
class VirtualTokens:
  """`base` run with `num_virtual_tokens` learned positions before its input.

  Subclasses hold their params under the top-level key `key` and define
  `init_cache` (decoders' generation; prefix tuning's every call) and
  `_call` (a call without a cache).
  """
  base: nn.Module
  num_virtual_tokens: int
  key: str  # top-level param key of the method's own params
  spec: tuple  # cache_spec of the model
  family: str

  def split(self, params) -> tuple:
    """(the method's params, the base model's params)."""
    params = dict(params)
    own = params.pop(self.key)
    return own, params

  def apply(self, variables, input_ids=None, attention_mask=None, token_type_ids=None, *,
            positions=None, cache=None, **kwargs):
    own, params = self.split(variables['params'])
    variables = {**variables, 'params': params}
    if token_type_ids is not None:
      kwargs['token_type_ids'] = token_type_ids
    if cache is None:
      return self._call(own, variables, input_ids, attention_mask, positions, kwargs)
    # Generation: `cache` came from init_cache, its first P slots filled.
    n, batch = self.num_virtual_tokens, batch_size(input_ids, kwargs.get('inputs_embeds'))
    if attention_mask is not None:
      attention_mask = with_ones(attention_mask, batch, 0, n)
    if positions is not None:
      kwargs['positions'] = jnp.asarray(positions) + n
    return self.base.apply(variables, input_ids, attention_mask, cache=cache, **kwargs)

  def init_cache(self, params, batch: int, max_length: int) -> dict:
    raise NotImplementedError

  def _call(self, own, variables, input_ids, attention_mask, positions, kwargs):
    raise NotImplementedError

  def __getattr__(self, name):
    # Attributes such as `num_classes` read through to the base module.
    if name.startswith('__') or name in ('base', 'num_virtual_tokens', 'key', 'spec',
                                         'family'):
      raise AttributeError(name)
    return getattr(self.base, name)


def reserved_positions(module) -> int:
  """Positions of the model's context the method takes before the input (0 for most)."""
  return module.num_virtual_tokens if isinstance(module, VirtualTokens) else 0


def leaf_rng(path: str) -> np.random.Generator:
  """The draw for a new param: fixed per path, so runs agree (as lora.SEED)."""
  return host_init.leaf_rng(0, path)

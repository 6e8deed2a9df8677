"""Prefix tuning (Li & Liang, 2021): P learned keys and values before every layer's own.

Every attention layer attends to P learned key/value pairs ahead of the
input's, with the attention mask extended by P ones. They go in as the first
P slots of the model's key/value cache, the way HF PEFT passes them as
`past_key_values`, so the text takes positions P, P + 1, ... as there (BERT
too, as transformers 4's BERT did with past_key_values). Per-token outputs
keep the input's length.

Params, under the top-level key 'prefix':
  keys, values  (layers, P, kv_heads, head_dim)        projection_size = 0
or, reparameterised through an MLP as in the paper (HF's prefix_projection):
  embedding (P, D) -> projection_in (D, H) -> tanh -> projection_out (H, layers * 2 * kv_heads * head_dim)
  with the output laid out (P, layer, key|value, head, dim) as HF PEFT's.
`peft.prefix_tuning.init`: 'vocab' starts the prefix as the keys and values
the model itself computes for P tokens drawn from the vocabulary (the paper
found real-word activations train better than random ones; with the MLP,
their embeddings are its input); 'random' draws N(0, 1), as HF PEFT.
Only the prefix trains, plus a classifier head (new, so it must train).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from finetune_jax import quantized
from finetune_jax.models import architecture
from finetune_jax.peft import base
from finetune_jax.peft import hf_names
from finetune_jax.peft import intercept
from finetune_jax.peft import method
from finetune_jax.peft import paths
from finetune_jax.peft import virtual_tokens

KEY = 'prefix'
INITS = ('vocab', 'random')


@dataclasses.dataclass(frozen=True)
class PrefixTuned(virtual_tokens.VirtualTokens):
  """`base` with learned key/value prefixes in every attention layer."""

  def prefixes(self, own) -> tuple:
    """(keys, values), each (layers, P, kv_heads, head_dim)."""
    if 'keys' in own:
      return own['keys'], own['values']
    h = jnp.tanh(own['embedding'] @ own['projection_in']['kernel'] + own['projection_in']['bias'])
    return from_rows(h @ own['projection_out']['kernel'] + own['projection_out']['bias'],
                     self.spec)

  def _prefix_cache(self, own, batch: int, length: int) -> dict:
    keys, values = self.prefixes(own)
    empty = jnp.zeros((batch, length, *keys.shape[2:]), keys.dtype)
    fill = lambda t: jnp.concatenate([jnp.broadcast_to(t, (batch, *t.shape)), empty], axis=1)
    return {'index': jnp.int32(self.num_virtual_tokens),
            'layers': [{'k': fill(k), 'v': fill(v)} for k, v in zip(keys, values)]}

  def init_cache(self, params, batch: int, max_length: int) -> dict:
    """A cache of P + max_length slots, the prefix in the first P."""
    own, _ = self.split(params)
    return self._prefix_cache(own, batch, max_length)

  def _call(self, own, variables, input_ids, attention_mask, positions, kwargs):
    n = self.num_virtual_tokens
    embeds = kwargs.get('inputs_embeds')
    batch, length = np.shape(input_ids if embeds is None else embeds)[:2]
    mask = virtual_tokens.with_ones(attention_mask, batch, length, n)
    if positions is not None:
      kwargs['positions'] = jnp.asarray(positions) + n
    out = self.base.apply(variables, input_ids, mask,
                          cache=self._prefix_cache(own, batch, length), **kwargs)
    return {k: v for k, v in out.items() if k != 'cache'}


def from_rows(rows, spec) -> tuple:
  """(keys, values), each (layers, P, kv_heads, head_dim), from rows (P, layers * 2 *
  kv_heads * head_dim) laid out (P, layer, key|value, head, dim): the MLP's output,
  and HF PEFT's prefix tensor. numpy in, numpy out; jax in, jax out."""
  layers, kv_heads, head_dim = spec
  out = rows.reshape(rows.shape[0], layers, 2, kv_heads, head_dim)
  return out[:, :, 0].swapaxes(0, 1), out[:, :, 1].swapaxes(0, 1)


def to_rows(keys, values) -> np.ndarray:
  """`from_rows` undone, on the host: the rows HF PEFT saves."""
  stacked = np.stack([np.asarray(keys), np.asarray(values)], axis=2)  # (L, P, 2, H, Dh)
  return stacked.swapaxes(0, 1).reshape(stacked.shape[1], -1)


def adapt(model, cfg) -> base.Adapted:
  """Prefixes of `cfg.prefix_tuning.num_virtual_tokens` slots in every layer."""
  embedding = virtual_tokens.check_applicable(model, 'prefix_tuning')
  n, init, hidden = _options(cfg)
  flat = paths.flatten(model.params)
  if any(p.startswith(KEY + '/') for p in flat):
    raise ValueError('These params already hold a prefix; adapt the plain pretrained model.')
  spec = virtual_tokens.cache_spec(model.config)
  module = PrefixTuned(model.module, n, KEY, spec, embedding, architecture.of(model).decoder)
  table = np.asarray(quantized.dequantize(flat[embedding]))
  ids = virtual_tokens.sample_token_ids(model, n, seed=0)
  layers, kv_heads, head_dim = spec
  if hidden:
    d, out = table.shape[1], layers * 2 * kv_heads * head_dim
    new = {'embedding': table[ids] if init == 'vocab' else _normal('embedding', (n, d))}
    for name, (fan_in, fan_out) in (('projection_in', (d, hidden)),
                                    ('projection_out', (hidden, out))):
      new[name] = {'kernel': _torch_linear(f'{name}/kernel', fan_in, (fan_in, fan_out)),
                   'bias': _torch_linear(f'{name}/bias', fan_in, (fan_out,))}
  elif init == 'vocab':
    cache = virtual_tokens.empty_cache(spec, 1, n, table.dtype)
    base_model = intercept.Intercepted(model.module, intercept.PassThrough())  # quantized too
    cache = jax.jit(base_model.apply)({'params': model.params}, jnp.asarray(ids[None]),
                                      cache=cache)['cache']
    new = {'keys': jnp.stack([layer['k'][0] for layer in cache['layers']]),
           'values': jnp.stack([layer['v'][0] for layer in cache['layers']])}
  else:
    shape = (layers, n, kv_heads, head_dim)
    new = {'keys': _normal('keys', shape), 'values': _normal('values', shape)}
  new = jax.tree.map(lambda x: jnp.asarray(x, table.dtype), new)
  params = {**model.params, KEY: new}
  trainable = frozenset(f'{KEY}/{p}' for p in paths.flatten(new))
  return base.Adapted(module, params, trainable | base.head_leaves(model))


def _normal(path: str, shape) -> np.ndarray:
  return virtual_tokens.leaf_rng(f'{KEY}/{path}').standard_normal(shape)


def _torch_linear(path: str, fan_in: int, shape) -> np.ndarray:
  """torch.nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as HF PEFT's MLP."""
  bound = 1.0 / np.sqrt(fan_in)
  return virtual_tokens.leaf_rng(f'{KEY}/{path}').uniform(-bound, bound, shape)


def _options(cfg) -> tuple[int, str, int]:
  c, n, init = virtual_tokens.section_options(cfg, 'prefix_tuning', INITS)
  hidden = c.projection_size
  if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 0:
    raise ValueError(f'peft.prefix_tuning.projection_size={hidden!r} must be 0 (no MLP) or '
                     'a positive integer (the MLP\'s hidden width).')
  return n, init, hidden


class PrefixTuning(virtual_tokens.VirtualTokensMethod):
  """In HF PEFT's layout the prefix is one (P, layers * 2 * kv_heads * head_dim)
  tensor laid out (P, layer, key|value, kv head, dim): what PEFT views as
  past_key_values. PEFT saves that prefix, never its MLP (prefix_projection), so
  a prefix trained through an MLP exports as the prefix the MLP makes."""
  name = 'prefix_tuning'
  section = 'prefix_tuning'
  peft_types = ('PREFIX_TUNING',)

  def adapt(self, model, cfg) -> base.Adapted:
    return adapt(model, cfg)

  def options(self, cfg):
    return _options(cfg)

  def peft_rows(self, model, module, params):
    why = hf_names.family(model).no_prefix_why
    if why:
      raise ValueError(
          f"peft.method='prefix_tuning' on {architecture.of(model).title} has no HF PEFT "
          f'export: {why}. Export it with --format adapter (our own layout, for '
          '--config.peft.init_from here).')
    _, kv_heads, head_dim = module.spec
    keys, values = module.prefixes(params[KEY])
    width = kv_heads * head_dim  # PEFT's token_dim for a prefix: the key/value width (GQA)
    return to_rows(keys, values), {
        'token_dim': width, 'num_attention_heads': kv_heads, 'encoder_hidden_size': width,
        'prefix_projection': False, 'init_weights': None}

  def peft_widths(self, model):
    layers, kv_heads, head_dim = virtual_tokens.cache_spec(model.config)
    mine = {'token_dim': kv_heads * head_dim, 'num_layers': layers,
            'num_attention_heads': kv_heads}
    return mine, 2 * layers * kv_heads * head_dim

  def params_from_rows(self, path, cfg, module, flat, rows):
    if f'{KEY}/keys' not in flat:
      raise ValueError(
          f'{path} stores the prefix itself (keys and values: PEFT saves those even with '
          f'prefix_projection={cfg.get("prefix_projection")}), not an MLP that makes them; '
          'this run makes its prefix with an MLP. Set '
          '--config.peft.prefix_tuning.projection_size=0 to load and train the prefix '
          'directly.')
    keys, values = from_rows(rows, module.spec)
    return {f'{KEY}/keys': keys, f'{KEY}/values': values}


method.register(PrefixTuning())

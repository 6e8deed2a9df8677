"""Attention shared by the language models: masks, grouped-query attention, KV cache.

Shapes: q [B, T, H, Dh]; k, v [B, S, Hkv, Dh] with H a multiple of Hkv
(grouped-query attention: query head h reads key/value head h // (H // Hkv));
masks are bool, True where a query may attend to a key.

A decoder's KV cache is a pytree `{'index': int32 [], 'layers': [{'k', 'v'}, ...]}`
of fixed length S: `index` slots are filled; a call with T new tokens writes
slots [index, index + T) of every layer and advances `index` by T. Slots are
in time order, so causality is by slot; position ids (for RoPE or learned
position embeddings) are a separate input, which lets left-padded prompts
start at position 0.
"""
import jax
import jax.numpy as jnp
import numpy as np


def init_cache(config: dict, batch_size: int, max_length: int,
               dtype=jnp.float32) -> dict:
  """An empty cache for a decoder whose config has num_layers, num_kv_heads, head_dim."""
  shape = (batch_size, max_length, config['num_kv_heads'], config['head_dim'])
  return {'index': jnp.zeros((), jnp.int32),
          'layers': [{'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
                     for _ in range(config['num_layers'])]}


def write_cache(layer: dict, k, v, index) -> dict:
  """The layer's cache with k, v [B, T, Hkv, Dh] written at slots [index, index + T)."""
  return {'k': jax.lax.dynamic_update_slice_in_dim(layer['k'], k.astype(layer['k'].dtype), index, 1),
          'v': jax.lax.dynamic_update_slice_in_dim(layer['v'], v.astype(layer['v'].dtype), index, 1)}


def batch_and_length(input_ids, inputs_embeds, hidden_size: int, model: str):
  """(B, T) of a language model's one token input: ids [B, T] or embeddings [B, T, D]."""
  if (input_ids is None) == (inputs_embeds is None):
    raise ValueError(f'Give {model} either input_ids or inputs_embeds, not both or neither.')
  if inputs_embeds is None:
    dtype, shape = jnp.result_type(input_ids), np.shape(input_ids)
    if len(shape) != 2 or not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(f'input_ids must be integer [batch, length], got {dtype} {shape}.')
    return shape
  shape = np.shape(inputs_embeds)
  if len(shape) != 3 or shape[-1] != hidden_size:
    raise ValueError(f'inputs_embeds must be [batch, length, {hidden_size}], got {shape}.')
  return shape[:2]


def padding_mask(attention_mask, num_queries: int):
  """[B, S] (1 = real token) -> [B, 1, T, S]; None stays None (no padding)."""
  if attention_mask is None:
    return None
  mask = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
  return jnp.broadcast_to(mask, (mask.shape[0], 1, num_queries, mask.shape[-1]))


def causal_mask(num_queries: int, num_keys: int, offset=0):
  """[1, 1, T, S]: query t (at slot offset + t) sees keys at slots <= its own."""
  query_slots = offset + jnp.arange(num_queries)[:, None]
  return (jnp.arange(num_keys)[None, :] <= query_slots)[None, None]


def combine(*masks):
  """Logical and of the masks that are not None (None if all are)."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = jnp.logical_and(out, m)
  return out


def dot_product_attention(q, k, v, mask=None, *, dropout_rate: float = 0.0,
                          dropout_rng=None, deterministic: bool = True):
  """softmax(q k^T / sqrt(Dh)) v, scores and softmax in float32, grouped-query heads.

  mask: bool broadcastable to [B, H, T, S]. A query row with no visible key
  (a padding query) gets zeros rather than NaNs.

  Inference (`deterministic`), and training without dropout off CPU, go through
  `jax.nn.dot_product_attention`: it is the path to cuDNN on GPU, and on 2 CPU
  cores its forward pass is 10-50% faster than the einsums below. Training on
  CPU keeps the einsums: their forward + backward is 7-13% faster there, and
  they take dropout (`experiments/bench_attention.py`).
  """
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  if heads % kv_heads:
    raise ValueError(f'{heads} query heads are not a multiple of {kv_heads} key/value heads.')
  full_mask = None if mask is None else jnp.broadcast_to(mask, (batch, heads, length, k.shape[1]))
  dropout = not deterministic and dropout_rate > 0.0
  if deterministic or (not dropout and jax.default_backend() != 'cpu'):
    out = jax.nn.dot_product_attention(q, k, v, mask=full_mask)
  else:
    out = _einsum_attention(q, k, v, full_mask, dropout_rate if dropout else 0.0, dropout_rng)
  if mask is not None:  # zero the rows that see no key (softmax made them uniform)
    sees_a_key = jnp.broadcast_to(mask.any(axis=-1), (batch, heads, length))
    sees_a_key = sees_a_key.transpose(0, 2, 1)[..., None]
    out = jnp.where(sees_a_key, out, jnp.zeros((), out.dtype))
  return out


def _einsum_attention(q, k, v, mask, dropout_rate: float, dropout_rng):
  """The hand-written attention; 4-D einsums where every head has its own keys."""
  batch, length, heads, head_dim = q.shape
  kv_heads, num_keys = k.shape[2], k.shape[1]
  groups = heads // kv_heads
  q = q * jnp.asarray(head_dim ** -0.5, q.dtype)  # scaling q is cheaper than the [T, S] scores
  if groups == 1:
    scores = jnp.einsum('bthd,bshd->bhts', q, k, preferred_element_type=jnp.float32)
  else:
    scores = jnp.einsum('btkgd,bskd->bkgts', q.reshape(batch, length, kv_heads, groups, head_dim),
                        k, preferred_element_type=jnp.float32)
    scores = scores.reshape(batch, heads, length, num_keys)
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1)
  if dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  weights = weights.astype(v.dtype)
  if groups == 1:
    return jnp.einsum('bhts,bshd->bthd', weights, v)
  weights = weights.reshape(batch, kv_heads, groups, length, num_keys)
  out = jnp.einsum('bkgts,bskd->btkgd', weights, v)
  return out.reshape(batch, length, heads, head_dim)

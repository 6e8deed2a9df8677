"""Llama-family causal decoder (Llama 2/3, SmolLM2; Mistral and Qwen2 layouts).

Pre-norm decoder: embed_tokens -> layers of (RMSNorm, grouped-query
self-attention with rotary position embeddings, residual; RMSNorm, SwiGLU MLP,
residual) -> final RMSNorm -> lm_head, or the transposed embedding table when
the embeddings are tied.

Param tree (names mirror transformers' LlamaForCausalLM, so PEFT-style
regexes written for HF work here):
  embed_tokens                  {embedding (V, D)}
  layers_i/input_layernorm      {scale (D,)}
  layers_i/self_attn/q_proj     {kernel (D, H*Dh) [, bias]}     k_proj, v_proj: (D, Hkv*Dh)
  layers_i/self_attn/o_proj     {kernel (H*Dh, D) [, bias]}
  layers_i/post_attention_layernorm {scale}
  layers_i/mlp/{gate_proj, up_proj} (D, I), down_proj (I, D)
  norm                          {scale}
  lm_head                       {kernel (D, V)}                  untied only

RoPE follows HF's rotate-half convention (the first and second halves of each
head are the pairs), which is also what GGUF files hold once their Q/K row
permutation is undone. Only plain RoPE (`rope_scaling=None`) is implemented:
scaled variants (linear, dynamic, yarn, llama3) change the frequencies and
are refused rather than silently run unscaled.

Call contract (shared by the decoders, see models/attention.py for the cache):
  module.apply({'params': p}, input_ids [B, T], attention_mask=None, *,
               positions=None, cache=None, inputs_embeds=None, train=False)
  -> {'logits' [B, T, V] float32, 'last_hidden_state' [B, T, D] (after the
      final norm, as HF's), 'cache' (only when a cache was given)}.
"""
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from finetune_jax.models import architecture
from finetune_jax.models import attention
from finetune_jax.models import host_init
from finetune_jax.models import layers

# Architecture fields: the ones without a default must come from a variant or
# a checkpoint.
_ARCH_KEYS = ('vocab_size', 'hidden_size', 'num_layers', 'num_heads',
              'intermediate_size')

VARIANTS = {
    # Two layers, byte-level vocabulary (256 bytes + <|endoftext|>): tests.
    'tiny': dict(vocab_size=257, hidden_size=32, num_layers=2, num_heads=4,
                 num_kv_heads=2, intermediate_size=64, tie_word_embeddings=True,
                 max_position_embeddings=512, bos_token_id=256, eos_token_id=256),
    # HuggingFaceTB/SmolLM2-135M(-Instruct).
    'smollm2-135m': dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                         num_kv_heads=3, intermediate_size=1536, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True,
                         max_position_embeddings=8192, bos_token_id=1, eos_token_id=2),
    # meta-llama/Llama-2-7b-hf: only for counting parameters (27 GB in f32).
    'llama2-7b': dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                      num_kv_heads=32, intermediate_size=11008, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2),
}


def make_config(variant: str | None = 'tiny', **fields) -> dict:
  """The JSON-serialisable architecture config.

  variant: a VARIANTS key, or None when `fields` give vocab_size,
    hidden_size, num_layers, num_heads and intermediate_size (checkpoints).
  fields: overrides; num_kv_heads defaults to num_heads (no GQA) and
    head_dim to hidden_size // num_heads.
  """
  if variant is None:
    base = {}
  elif variant in VARIANTS:
    base = dict(VARIANTS[variant])
  else:
    raise ValueError(f'Unknown Llama variant {variant!r}; use one of {sorted(VARIANTS)} '
                     'or None with the architecture fields.')
  config = dict(
      model='llama', variant=variant, num_kv_heads=None, head_dim=None,
      max_position_embeddings=2048, rope_theta=10000.0, rope_scaling=None,
      rms_norm_eps=1e-6, tie_word_embeddings=False,
      qkv_bias=False,  # q/k/v_proj biases: Llama attention_bias, Qwen2
      o_bias=False,  # o_proj bias: Llama attention_bias
      mlp_bias=False, sliding_window=None,  # Mistral: keys within the last N slots
      attention_dropout=0.0, initializer_range=0.02,
      bos_token_id=None, eos_token_id=None, pad_token_id=None)
  config.update(base)
  unknown = set(fields) - set(config) - set(_ARCH_KEYS)
  if unknown:
    raise ValueError(f'Unknown Llama config keys {sorted(unknown)}; known: '
                     f'{sorted({*config, *_ARCH_KEYS})}.')
  config.update(fields)
  missing = [k for k in _ARCH_KEYS if config.get(k) is None]
  if missing:
    raise ValueError(f'A Llama config without a variant needs {missing}.')
  if config['num_kv_heads'] is None:
    config['num_kv_heads'] = config['num_heads']
  if config['head_dim'] is None:
    if config['hidden_size'] % config['num_heads']:
      raise ValueError(f'hidden_size={config["hidden_size"]} is not divisible by '
                       f'num_heads={config["num_heads"]}; give head_dim explicitly.')
    config['head_dim'] = config['hidden_size'] // config['num_heads']
  _validate(config)
  return config


def _validate(config: dict) -> None:
  if config['num_heads'] % config['num_kv_heads']:
    raise ValueError(f'num_heads={config["num_heads"]} is not a multiple of '
                     f'num_kv_heads={config["num_kv_heads"]} (grouped-query attention).')
  if config['head_dim'] % 2:
    raise ValueError(f'head_dim={config["head_dim"]} must be even for rotary embeddings.')
  check_rope_scaling(config['rope_scaling'], source='the Llama config')
  window = config['sliding_window']
  if window is not None and (not isinstance(window, int) or window <= 0):
    raise ValueError(f'sliding_window={window!r} must be a positive int or None.')


def check_rope_scaling(rope_scaling, source: str) -> None:
  """Only unscaled RoPE is implemented; anything else is refused by name."""
  if rope_scaling is None:
    return
  kind = rope_scaling.get('rope_type', rope_scaling.get('type')) if isinstance(
      rope_scaling, dict) else rope_scaling
  if kind != 'default':
    raise ValueError(
        f'{source} uses rope_scaling={rope_scaling!r}; only plain RoPE '
        '(rope_scaling None / rope_type "default") is implemented. Scaled RoPE '
        '(linear, dynamic, yarn, llama3, ...) changes the rotary frequencies, so '
        'running it unscaled would give wrong outputs: use a checkpoint without '
        'rope_scaling, or implement that scaling in models/llama/model.py.')


def variant_of(config: dict) -> str | None:
  """The named variant with these dimensions, if any."""
  keys = (*_ARCH_KEYS, 'num_kv_heads', 'head_dim', 'tie_word_embeddings')
  for name in VARIANTS:
    reference = make_config(name)
    if all(config.get(k) == reference[k] for k in keys):
      return name
  return None


def block_names(config: dict) -> tuple[str, ...]:
  """Top-level param keys from input to output, without lm_head."""
  return ('embed_tokens', *(f'layers_{i}' for i in range(config['num_layers'])), 'norm')


# ------------------------------------------------------------------- init


def param_shapes(module: 'LlamaForCausalLM') -> dict:
  """Flat {path: ShapeDtypeStruct}, computing nothing."""
  return host_init.param_shapes(module, (1, 1), jnp.int32)


def _host_value(path: str, shape, dtype, seed: int, std: float) -> np.ndarray:
  """HF's init: normal(0, initializer_range) weights, zero biases, unit norms."""
  leaf = path.rsplit('/', 1)[-1]
  if leaf == 'scale':
    return np.ones(shape, dtype)
  if leaf == 'bias':
    return np.zeros(shape, dtype)
  if leaf in ('kernel', 'embedding'):
    rng = host_init.leaf_rng(seed, path)
    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)
  raise ValueError(f'No initializer for parameter {path!r}.')


def init_params(module: 'LlamaForCausalLM', seed: int = 0, draw=None) -> dict:
  """Initial params drawn on the host with numpy (compiling `module.init` is slow)."""
  value = functools.partial(_host_value, std=module.initializer_range)
  return host_init.init_params(module, (1, 1), value, seed, jnp.int32, draw)


# ------------------------------------------------------------------- modules


def rope_cos_sin(positions, head_dim: int, theta: float):
  """cos, sin [B, T, 1, Dh] for integer positions [B, T], as HF computes them (f32)."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """x [B, T, H, Dh] rotated by position; pairs are (i, i + Dh/2) (rotate-half)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos + rotated * sin).astype(x.dtype)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, computed in float32 as HF's LlamaRMSNorm."""
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale * y.astype(x.dtype)


class LlamaAttention(nn.Module):
  """Grouped-query self-attention with RoPE and an optional KV cache layer."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  qkv_bias: bool = False
  o_bias: bool = False
  attention_dropout: float = 0.0
  initializer_range: float = 0.02

  @nn.compact
  def __call__(self, x, cos, sin, mask, layer_cache=None, index=None, train=False):
    batch, length, width = x.shape
    init = nn.initializers.normal(self.initializer_range)

    def project(name, heads):
      y = nn.Dense(heads * self.head_dim, use_bias=self.qkv_bias, kernel_init=init,
                   name=name)(x)
      return y.reshape(batch, length, heads, self.head_dim)

    q = apply_rope(project('q_proj', self.num_heads), cos, sin)
    k = apply_rope(project('k_proj', self.num_kv_heads), cos, sin)
    v = project('v_proj', self.num_kv_heads)
    if layer_cache is not None:
      layer_cache = attention.write_cache(layer_cache, k, v, index)
      k, v = layer_cache['k'], layer_cache['v']
    dropout = train and self.attention_dropout > 0.0
    y = attention.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), mask,
        dropout_rate=self.attention_dropout,
        dropout_rng=self.make_rng('dropout') if dropout else None, deterministic=not dropout)
    y = y.reshape(batch, length, self.num_heads * self.head_dim)
    return nn.Dense(width, use_bias=self.o_bias, kernel_init=init, name='o_proj')(y), layer_cache


class LlamaMLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  intermediate_size: int
  mlp_bias: bool = False
  initializer_range: float = 0.02

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(n, use_bias=self.mlp_bias, name=name,
                                     kernel_init=nn.initializers.normal(self.initializer_range))
    y = nn.silu(dense(self.intermediate_size, 'gate_proj')(x)) * dense(
        self.intermediate_size, 'up_proj')(x)
    return dense(x.shape[-1], 'down_proj')(y)


class LlamaDecoderLayer(nn.Module):
  """x + attn(norm(x)), then + mlp(norm(x))."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  attention_dropout: float = 0.0
  initializer_range: float = 0.02

  @nn.compact
  def __call__(self, x, cos, sin, mask, layer_cache=None, index=None, train=False):
    y, layer_cache = LlamaAttention(
        self.num_heads, self.num_kv_heads, self.head_dim, self.qkv_bias, self.o_bias,
        self.attention_dropout, self.initializer_range, name='self_attn')(
            RMSNorm(self.rms_norm_eps, name='input_layernorm')(x), cos, sin, mask,
            layer_cache, index, train)
    x = x + y
    y = LlamaMLP(self.intermediate_size, self.mlp_bias, self.initializer_range, name='mlp')(
        RMSNorm(self.rms_norm_eps, name='post_attention_layernorm')(x))
    return x + y, layer_cache


class LlamaForCausalLM(nn.Module):
  """The decoder; see the module docstring for the call contract.

  With a cache of length S, the T new tokens fill slots [index, index + T),
  attend to every filled slot at or before their own (and within
  `sliding_window` slots when set), and `attention_mask` [B, S] (1 = real
  token) covers the whole cache. Positions default to the slot numbers; give
  them explicitly for left-padded prompts so that text starts at 0.
  inputs_embeds [B, T, D] replaces input_ids (HF's inputs_embeds; prompt
  tuning prepends learned ones).
  """
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None
  attention_dropout: float = 0.0
  initializer_range: float = 0.02
  remat: str = 'none'  # layers.REMAT_MODES: recompute each block in the backward pass

  @nn.compact
  def __call__(self, input_ids=None, attention_mask=None, *, positions=None, cache=None,
               inputs_embeds=None, train: bool = False) -> dict[str, Any]:
    batch, length = attention.batch_and_length(input_ids, inputs_embeds, self.hidden_size,
                                               'Llama')
    if attention_mask is not None:
      attention_mask = jnp.asarray(attention_mask)
    slots = length if cache is None else cache['layers'][0]['k'].shape[1]
    if slots > self.max_position_embeddings:
      raise ValueError(
          f'A sequence of {slots} tokens (input or KV cache length) is longer than the '
          f'model\'s context of max_position_embeddings={self.max_position_embeddings}. '
          'Truncate the text (the data config\'s max length) or generate fewer tokens.')
    if cache is not None and len(cache['layers']) != self.num_layers:
      raise ValueError(f'The cache has {len(cache["layers"])} layers, the model '
                       f'{self.num_layers}: make it with attention.init_cache(config, ...).')
    if attention_mask is not None and attention_mask.shape != (batch, slots):
      what = 'the cache length' if cache is not None else 'the input length'
      raise ValueError(f'attention_mask has shape {attention_mask.shape}; expected '
                       f'{(batch, slots)} ([batch, {what}]).')
    index = None if cache is None else cache['index']
    if positions is None:
      positions = jnp.arange(length, dtype=jnp.int32) + (0 if index is None else index)
    positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (batch, length))
    cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta)

    offset = 0 if index is None else index
    mask = attention.combine(
        attention.causal_mask(length, slots, offset),
        _window_mask(length, slots, offset, self.sliding_window),
        attention.padding_mask(attention_mask, length))

    embed = nn.Embed(self.vocab_size, self.hidden_size, name='embed_tokens',
                     embedding_init=nn.initializers.normal(self.initializer_range))
    x = embed(jnp.asarray(input_ids)) if inputs_embeds is None else jnp.asarray(inputs_embeds)
    new_layers = []
    for i in range(self.num_layers):
      x, layer_cache = layers.remat(LlamaDecoderLayer, self.remat, static_argnums=(7,))(
          self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size,
          self.rms_norm_eps, self.qkv_bias, self.o_bias, self.mlp_bias,
          self.attention_dropout, self.initializer_range, name=f'layers_{i}')(
              x, cos, sin, mask, None if cache is None else cache['layers'][i], index, train)
      new_layers.append(layer_cache)
    x = RMSNorm(self.rms_norm_eps, name='norm')(x)
    if self.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(self.vocab_size, use_bias=False, name='lm_head',
                        kernel_init=nn.initializers.normal(self.initializer_range))(x)
    out = {'logits': logits.astype(jnp.float32), 'last_hidden_state': x}
    if cache is not None:
      out['cache'] = {'index': cache['index'] + length, 'layers': new_layers}
    return out


def _window_mask(num_queries: int, num_keys: int, offset, window: int | None):
  """[1, 1, T, S]: query slot q sees key slots > q - window (HF's sliding window)."""
  if window is None:
    return None
  query_slots = offset + jnp.arange(num_queries)[:, None]
  return (jnp.arange(num_keys)[None, :] > query_slots - window)[None, None]


def num_params(config: dict) -> int:
  """Parameter count from shapes only (nothing allocated)."""
  module = architecture.build_module(LlamaForCausalLM, config)
  return sum(math.prod(s.shape) for s in param_shapes(module).values())

"""GPT-2 (Radford et al., 2019), as Hugging Face's GPT2LMHeadModel.

Pre-LN decoder: token (wte) + learned position (wpe) embeddings -> blocks of
(LayerNorm, causal self-attention with a fused q/k/v projection, residual;
LayerNorm, gelu_new MLP, residual) -> final LayerNorm -> logits through the
token embedding (tied) or a separate `lm_head` (untied checkpoints).

Param tree (names mirror HF modules, so PEFT-style regexes carry over):
  wte/embedding        (V, D)
  wpe/embedding        (P, D)
  h_i                  {ln_1, attn {c_attn (D, 3D), c_proj}, ln_2, mlp {c_fc, c_proj}}
  ln_f                 {scale, bias}
  lm_head/kernel       (D, V)   untied models only
HF's Conv1D weights are already (in, out), the layout of a Dense kernel.

The decoder contract (shared with Llama, relied on by `generate`):
  apply({'params': p}, input_ids, attention_mask=None, *, positions=None,
        cache=None, inputs_embeds=None, train=False)
  -> {'logits', 'last_hidden_state'[, 'cache']}
See models/attention.py for the cache layout.
"""
import functools
import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from finetune_jax.models import attention
from finetune_jax.models import host_init
from finetune_jax.models import layers

# hidden_size, num_layers, num_heads (and vocab / context) of the released models.
VARIANTS = {
    'small': dict(hidden_size=768, num_layers=12, num_heads=12),  # 124M
    'medium': dict(hidden_size=1024, num_layers=24, num_heads=16),  # 355M
    'large': dict(hidden_size=1280, num_layers=36, num_heads=20),  # 774M
    'xl': dict(hidden_size=1600, num_layers=48, num_heads=25),  # 1.5B
}
# Byte-level toy: 256 bytes + <|endoftext|> (models/tokenization.byte_level_tokenizer).
TINY = dict(hidden_size=32, num_layers=2, num_heads=4, vocab_size=257,
            max_position_embeddings=256, bos_token_id=256, eos_token_id=256)
# A byte-level model small enough to train from scratch on a CPU (3.3M params).
MINI = dict(TINY, hidden_size=256, num_layers=4, num_heads=4, max_position_embeddings=512)
BYTE_LEVEL = {'tiny': TINY, 'mini': MINI}

# Activations HF GPT-2 configs name; the gelu_new family is the tanh approximation.
ACTIVATIONS = {
    'gelu_new': lambda x: nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: nn.gelu(x, approximate=True),
    'gelu_fast': lambda x: nn.gelu(x, approximate=True),
    'gelu': lambda x: nn.gelu(x, approximate=False),
    'relu': nn.relu,
    'silu': nn.silu,
    'swish': nn.silu,
}

_ARCH_KEYS = ('hidden_size', 'num_layers', 'num_heads')


def make_config(variant: str | None = 'small', **fields) -> dict:
  """The JSON-serialisable architecture config.

  variant: 'tiny', 'mini', 'small', 'medium', 'large', 'xl', or None when `fields`
    give hidden_size, num_layers and num_heads (checkpoints).
  fields: overrides, e.g. vocab_size, max_position_embeddings, dropout rates.
  """
  if variant in BYTE_LEVEL:
    base = dict(BYTE_LEVEL[variant])
  elif variant in VARIANTS:
    base = dict(VARIANTS[variant])
  elif variant is None:
    base = {}
  else:
    raise ValueError(f'Unknown GPT-2 variant {variant!r}; use one of '
                     f'{[*BYTE_LEVEL, *VARIANTS]}.')
  config = dict(
      model='gpt2', variant=variant, vocab_size=50257, max_position_embeddings=1024,
      intermediate_size=None,  # None: 4 * hidden_size (HF n_inner)
      activation='gelu_new', layer_norm_eps=1e-5, tie_word_embeddings=True,
      embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1,
      scale_attn_by_inverse_layer_idx=False,
      bos_token_id=50256, eos_token_id=50256)
  config.update(base)
  unknown = set(fields) - set(config) - set(_ARCH_KEYS) - {'num_kv_heads', 'head_dim'}
  if unknown:
    raise ValueError(f'Unknown GPT-2 config keys {sorted(unknown)}; known: '
                     f'{sorted({*config, *_ARCH_KEYS})}.')
  config.update(fields)
  missing = [k for k in _ARCH_KEYS if k not in config]
  if missing:
    raise ValueError(f'A GPT-2 config without a variant needs {missing}.')
  if config['hidden_size'] % config['num_heads']:
    raise ValueError(f'hidden_size={config["hidden_size"]} is not divisible by '
                     f'num_heads={config["num_heads"]}.')
  if config['activation'] not in ACTIVATIONS:
    raise ValueError(f'activation={config["activation"]!r} is not supported; use one '
                     f'of {sorted(ACTIVATIONS)}.')
  if config['intermediate_size'] is None:
    config['intermediate_size'] = 4 * config['hidden_size']
  # The decoder fields `generate` and attention.init_cache read (no GQA in GPT-2).
  config['num_kv_heads'] = config['num_heads']
  config['head_dim'] = config['hidden_size'] // config['num_heads']
  if fields.get('num_kv_heads', config['num_heads']) != config['num_heads'] or fields.get(
      'head_dim', config['head_dim']) != config['head_dim']:
    raise ValueError('GPT-2 has num_kv_heads == num_heads and head_dim == '
                     'hidden_size // num_heads; do not set them.')
  return config


def block_names(config: dict) -> tuple[str, ...]:
  """Top-level param keys from input to output, without the head."""
  return ('wte', 'wpe', *(f'h_{i}' for i in range(config['num_layers'])), 'ln_f')


# ------------------------------------------------------------------- init


def _host_value(path: str, shape, dtype, seed: int, num_layers: int) -> np.ndarray:
  """HF's GPT-2 init: N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 L))."""
  leaf = path.rsplit('/', 1)[-1]
  if leaf == 'scale':
    return np.ones(shape, dtype)
  if leaf == 'bias':
    return np.zeros(shape, dtype)
  if leaf not in ('kernel', 'embedding'):
    raise ValueError(f'No initializer for parameter {path!r}.')
  std = 0.02
  if path.endswith('/c_proj/kernel'):
    std /= math.sqrt(2 * num_layers)
  return (host_init.leaf_rng(seed, path).standard_normal(shape) * std).astype(dtype)


def param_shapes(module: 'GPT2') -> dict:
  """Flat {path: ShapeDtypeStruct}, without running anything."""
  return host_init.param_shapes(module, (1, 1), jnp.int32)


def init_params(module: 'GPT2', seed: int = 0, draw=None) -> dict:
  """Initial params drawn on the host with numpy (compiling `module.init` is slow)."""
  value = functools.partial(_host_value, num_layers=module.num_layers)
  return host_init.init_params(module, (1, 1), value, seed, jnp.int32, draw)


# ------------------------------------------------------------------- modules

_normal = nn.initializers.normal(0.02)


class Attention(nn.Module):
  """Causal self-attention: fused c_attn -> q, k, v; optional KV cache."""
  num_heads: int
  attn_pdrop: float = 0.0
  resid_pdrop: float = 0.0
  query_scale: float = 1.0  # 1 / (layer + 1) with scale_attn_by_inverse_layer_idx

  @nn.compact
  def __call__(self, x, mask, cache_layer=None, index=None, train: bool = False):
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    qkv = nn.Dense(3 * width, kernel_init=_normal, name='c_attn')(x)
    q, k, v = (t.reshape(batch, length, self.num_heads, head_dim)
               for t in jnp.split(qkv, 3, axis=-1))
    if self.query_scale != 1.0:
      q = q * self.query_scale
    if cache_layer is not None:
      cache_layer = attention.write_cache(cache_layer, k, v, index)
      k, v = cache_layer['k'], cache_layer['v']
    dropout = train and self.attn_pdrop > 0
    y = attention.dot_product_attention(
        q, k, v, mask, dropout_rate=self.attn_pdrop,
        dropout_rng=self.make_rng('dropout') if dropout else None,
        deterministic=not dropout)
    y = nn.Dense(width, kernel_init=_normal, name='c_proj')(y.reshape(batch, length, width))
    return nn.Dropout(self.resid_pdrop)(y, deterministic=not train), cache_layer


class Mlp(nn.Module):
  intermediate_size: int
  activation: str = 'gelu_new'
  resid_pdrop: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.Dense(self.intermediate_size, kernel_init=_normal, name='c_fc')(x)
    y = ACTIVATIONS[self.activation](y)
    y = nn.Dense(x.shape[-1], kernel_init=_normal, name='c_proj')(y)
    return nn.Dropout(self.resid_pdrop)(y, deterministic=not train)


class Block(nn.Module):
  """x + attn(ln_1(x)), then + mlp(ln_2(x))."""
  num_heads: int
  intermediate_size: int
  activation: str = 'gelu_new'
  layer_norm_eps: float = 1e-5
  attn_pdrop: float = 0.0
  resid_pdrop: float = 0.0
  query_scale: float = 1.0

  @nn.compact
  def __call__(self, x, mask, cache_layer=None, index=None, train: bool = False):
    norm = lambda name: nn.LayerNorm(self.layer_norm_eps, use_fast_variance=False, name=name)
    y, cache_layer = Attention(self.num_heads, self.attn_pdrop, self.resid_pdrop,
                               self.query_scale, name='attn')(
                                   norm('ln_1')(x), mask, cache_layer, index, train)
    x = x + y
    x = x + Mlp(self.intermediate_size, self.activation, self.resid_pdrop,
                name='mlp')(norm('ln_2')(x), train)
    return x, cache_layer


class GPT2(nn.Module):
  """GPT-2; returns {'logits' [B, T, V] float32, 'last_hidden_state' [B, T, D]}.

  attention_mask: 1 for real tokens, 0 for padding; [B, T] without a cache,
    [B, S] over every cache slot with one.
  positions: [B, T] position ids; default cache['index'] + arange(T) (or
    arange(T)). Left-padded prompts pass cumsum(mask) - 1 so that every row
    starts at position 0.
  cache: attention.init_cache(config, B, S); the updated one is returned as
    'cache'. `train=True` enables dropout (rng 'dropout').
  inputs_embeds [B, T, D]: token embeddings in place of input_ids (HF's
    inputs_embeds; prompt tuning prepends learned ones).
  """
  vocab_size: int = 50257
  max_position_embeddings: int = 1024
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  activation: str = 'gelu_new'
  layer_norm_eps: float = 1e-5
  tie_word_embeddings: bool = True
  embd_pdrop: float = 0.0
  attn_pdrop: float = 0.0
  resid_pdrop: float = 0.0
  scale_attn_by_inverse_layer_idx: bool = False
  remat: str = 'none'  # layers.REMAT_MODES: recompute each block in the backward pass

  @nn.compact
  def __call__(self, input_ids=None, attention_mask=None, *, positions=None, cache=None,
               inputs_embeds=None, train: bool = False):
    batch, length = attention.batch_and_length(input_ids, inputs_embeds, self.hidden_size,
                                               'GPT-2')
    if cache is None:
      index, num_keys = 0, length
      if positions is None and length > self.max_position_embeddings:
        raise ValueError(
            f'{length} tokens exceed GPT-2\'s context of {self.max_position_embeddings} '
            'positions: truncate the text (or split it into windows) before the model.')
    else:
      index, num_keys = cache['index'], cache['layers'][0]['k'].shape[1]
      if len(cache['layers']) != self.num_layers:
        raise ValueError(f'The cache has {len(cache["layers"])} layers, the model '
                         f'{self.num_layers}: build it with attention.init_cache(config, ...).')
    if attention_mask is not None and tuple(np.shape(attention_mask)) != (batch, num_keys):
      where = 'every cache slot' if cache is not None else 'the input tokens'
      raise ValueError(f'attention_mask has shape {tuple(np.shape(attention_mask))}; '
                       f'expected {(batch, num_keys)} (one per {where}).')
    mask = attention.combine(attention.causal_mask(length, num_keys, index),
                             attention.padding_mask(attention_mask, length))
    if positions is None:
      positions = jnp.broadcast_to(index + jnp.arange(length), (batch, length))

    wte = nn.Embed(self.vocab_size, self.hidden_size, embedding_init=_normal, name='wte')
    wpe = nn.Embed(self.max_position_embeddings, self.hidden_size,
                   embedding_init=_normal, name='wpe')
    x = wte(jnp.asarray(input_ids)) if inputs_embeds is None else jnp.asarray(inputs_embeds)
    x = x + wpe(jnp.asarray(positions, jnp.int32))
    x = nn.Dropout(self.embd_pdrop)(x, deterministic=not train)
    new_layers = []
    for i in range(self.num_layers):
      scale = 1.0 / (i + 1) if self.scale_attn_by_inverse_layer_idx else 1.0
      x, layer = layers.remat(Block, self.remat, static_argnums=(5,))(
          self.num_heads, self.intermediate_size, self.activation, self.layer_norm_eps,
          self.attn_pdrop, self.resid_pdrop, scale, name=f'h_{i}')(
              x, mask, None if cache is None else cache['layers'][i], index, train)
      new_layers.append(layer)
    x = nn.LayerNorm(self.layer_norm_eps, use_fast_variance=False, name='ln_f')(x)
    if self.tie_word_embeddings:
      logits = wte.attend(x)
    else:
      logits = nn.Dense(self.vocab_size, use_bias=False, kernel_init=_normal,
                        name='lm_head')(x)
    out = {'logits': logits.astype(jnp.float32), 'last_hidden_state': x}
    if cache is not None:
      out['cache'] = {'index': cache['index'] + length, 'layers': new_layers}
    return out

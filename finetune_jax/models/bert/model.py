"""BERT encoder (Devlin et al., 2019), as transformers' BertModel.

Post-LN encoder: word + learned absolute position + token-type embeddings ->
LayerNorm -> layers of (self-attention, dense, residual, LayerNorm; GELU
intermediate, dense, residual, LayerNorm) -> pooled features -> optional head.
MiniLM (all-MiniLM-L6-v2) is the same architecture at 6 layers of width 384.

Param tree (names mirror HF modules, so PEFT regexes written for HF apply):
  embeddings  {word_embeddings, position_embeddings, token_type_embeddings}/embedding,
              LayerNorm {scale, bias}
  layer_i     attention/self/{query, key, value}, attention/output/{dense, LayerNorm},
              intermediate/dense, output/{dense, LayerNorm}
  pooler      dense (Dense + tanh on [CLS]; only with add_pooler)
  head        Dense on `features`, zero-initialised (only with num_classes)
Dense kernels are (in, out): HF nn.Linear weights transposed.

Pooling ('features', what the head sees): 'cls' the final hidden state of
token 0; 'mean' its masked mean over the attention mask (sentence-transformers
pooling); 'pooler' the pooler's output, which is what HF
BertForSequenceClassification feeds its classifier, so fine-tuned HF
classifiers load with identical logits.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from finetune_jax.models import attention
from finetune_jax.models import host_init
from finetune_jax.models import layers

VARIANTS = {
    # bert-base-uncased.
    'base': dict(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                 intermediate_size=3072),
    # nreimers/MiniLM-L6-H384-uncased, the body of all-MiniLM-L6-v2.
    'minilm-l6': dict(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                      intermediate_size=1536),
    # A two-layer toy over the byte-level vocabulary (256 bytes + 5 specials).
    'tiny': dict(vocab_size=261, hidden_size=32, num_layers=2, num_heads=4,
                 intermediate_size=64, pad_token_id=256),
}
POOLINGS = ('cls', 'mean', 'pooler')
# HF hidden_act -> approximate GELU? ('gelu' is exact erf GELU.)
ACTIVATIONS = {'gelu': False, 'gelu_new': True, 'gelu_pytorch_tanh': True}

_ARCH_KEYS = ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'intermediate_size')


def make_config(variant: str | None = 'base', num_classes: int | None = None,
                **fields) -> dict:
  """The JSON-serialisable architecture config.

  variant: 'base', 'minilm-l6', 'tiny', or None when `fields` give
    vocab_size, hidden_size, num_layers, num_heads, intermediate_size (checkpoints).
  num_classes: None or 0 builds no head.
  """
  if variant in VARIANTS:
    base = dict(VARIANTS[variant])
  elif variant is None:
    base = {}
  else:
    raise ValueError(f'Unknown BERT variant {variant!r}; use one of {sorted(VARIANTS)}.')
  config = dict(
      model='bert', variant=variant, max_position_embeddings=512, type_vocab_size=2,
      layer_norm_eps=1e-12, hidden_act='gelu', hidden_dropout_prob=0.1,
      attention_probs_dropout_prob=0.1, classifier_dropout=None, pooling='cls',
      add_pooler=True, pad_token_id=0)
  config.update(base)
  unknown = set(fields) - set(config) - set(_ARCH_KEYS)
  if unknown:
    raise ValueError(f'Unknown BERT config keys {sorted(unknown)}; known: '
                     f'{sorted({*config, *_ARCH_KEYS})}.')
  config.update(fields)
  config['num_classes'] = num_classes or 0
  missing = [k for k in _ARCH_KEYS if k not in config]
  if missing:
    raise ValueError(f'A BERT config without a variant needs {missing}.')
  _validate(config)
  return config


def _validate(config: dict) -> None:
  if config['hidden_size'] % config['num_heads']:
    raise ValueError(f'hidden_size={config["hidden_size"]} is not divisible by '
                     f'num_heads={config["num_heads"]}.')
  if config['pooling'] not in POOLINGS:
    raise ValueError(f'pooling={config["pooling"]!r}; use one of {POOLINGS}.')
  if config['pooling'] == 'pooler' and not config['add_pooler']:
    raise ValueError("pooling='pooler' needs a pooler, and this model has none "
                     "(add_pooler=False); use pooling='cls' or 'mean'.")
  if config['hidden_act'] not in ACTIVATIONS:
    raise ValueError(f'hidden_act={config["hidden_act"]!r} is not supported; use one '
                     f'of {sorted(ACTIVATIONS)}.')
  for key in ('hidden_dropout_prob', 'attention_probs_dropout_prob', 'classifier_dropout'):
    rate = config[key]
    if rate is not None and not 0.0 <= rate < 1.0:
      raise ValueError(f'{key}={rate!r} must be in [0, 1).')


def variant_of(config: dict) -> str | None:
  """The named variant with these dimensions, if any."""
  dims = {k: config[k] for k in _ARCH_KEYS}
  return next((name for name, v in VARIANTS.items()
               if {k: v[k] for k in _ARCH_KEYS} == dims), None)


def block_names(config: dict) -> tuple[str, ...]:
  """Top-level param keys from input to output, without the head."""
  pooler = ('pooler',) if config['add_pooler'] else ()
  return ('embeddings', *(f'layer_{i}' for i in range(config['num_layers'])), *pooler)


# ------------------------------------------------------------------- init


def param_shapes(module: 'BertEncoder') -> dict:
  """Flat {path: ShapeDtypeStruct}, without running anything."""
  return host_init.param_shapes(module, (1, 1), jnp.int32)


def _host_value(path: str, shape, dtype, seed: int, pad_token_id: int | None) -> np.ndarray:
  """HF BertPreTrainedModel._init_weights: N(0, 0.02) weights, zero biases and padding row."""
  leaf = path.rsplit('/', 1)[-1]
  if leaf == 'scale':
    return np.ones(shape, dtype)
  if leaf == 'bias' or path.startswith('head/'):
    return np.zeros(shape, dtype)
  if leaf not in ('kernel', 'embedding'):
    raise ValueError(f'No initializer for parameter {path!r}.')
  value = (host_init.leaf_rng(seed, path).standard_normal(shape) * 0.02).astype(dtype)
  if path == 'embeddings/word_embeddings/embedding' and pad_token_id is not None:
    value[pad_token_id] = 0
  return value


def init_params(module: 'BertEncoder', seed: int = 0, draw=None) -> dict:
  """Initial params drawn on the host with numpy (compiling `module.init` is slow)."""
  value = functools.partial(_host_value, pad_token_id=module.pad_token_id)
  return host_init.init_params(module, (1, 1), value, seed, jnp.int32, draw)


# ------------------------------------------------------------------- modules

_normal = nn.initializers.normal(0.02)


def _dense(features: int, name: str) -> nn.Dense:
  return nn.Dense(features, kernel_init=_normal, name=name)


def _layer_norm(eps: float) -> nn.LayerNorm:
  return nn.LayerNorm(eps, use_fast_variance=False, name='LayerNorm')


class Embeddings(nn.Module):
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float
  dropout_rate: float

  @nn.compact
  def __call__(self, input_ids, token_type_ids, positions, train: bool, inputs_embeds=None):
    embed = lambda n, name: nn.Embed(n, self.hidden_size, embedding_init=_normal, name=name)
    x = (embed(self.vocab_size, 'word_embeddings')(input_ids) if inputs_embeds is None
         else inputs_embeds)
    x = x + embed(self.max_position_embeddings, 'position_embeddings')(positions)
    x = x + embed(self.type_vocab_size, 'token_type_embeddings')(token_type_ids)
    x = _layer_norm(self.layer_norm_eps)(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=not train)


class SelfAttention(nn.Module):
  """Query/key/value projections and scaled dot-product attention (no output dense)."""
  num_heads: int
  dropout_rate: float

  @nn.compact
  def __call__(self, x, mask, train: bool, cache_layer=None, index=None):
    batch, length, width = x.shape
    heads = lambda name: _dense(width, name)(x).reshape(
        batch, length, self.num_heads, width // self.num_heads)
    q, k, v = heads('query'), heads('key'), heads('value')
    if cache_layer is not None:
      cache_layer = attention.write_cache(cache_layer, k, v, index)
      k, v = cache_layer['k'].astype(q.dtype), cache_layer['v'].astype(q.dtype)
    dropout = train and self.dropout_rate > 0
    y = attention.dot_product_attention(
        q, k, v, mask,
        dropout_rate=self.dropout_rate,
        dropout_rng=self.make_rng('dropout') if dropout else None,
        deterministic=not dropout)
    return y.reshape(batch, length, width), cache_layer


class DenseNorm(nn.Module):
  """HF BertSelfOutput / BertOutput: LayerNorm(dropout(dense(y)) + residual)."""
  hidden_size: int
  layer_norm_eps: float
  dropout_rate: float

  @nn.compact
  def __call__(self, y, residual, train: bool):
    y = _dense(self.hidden_size, 'dense')(y)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    return _layer_norm(self.layer_norm_eps)(y + residual)


class Attention(nn.Module):
  num_heads: int
  layer_norm_eps: float
  hidden_dropout_prob: float
  attention_probs_dropout_prob: float

  @nn.compact
  def __call__(self, x, mask, train: bool, cache_layer=None, index=None):
    y, cache_layer = SelfAttention(self.num_heads, self.attention_probs_dropout_prob,
                                   name='self')(x, mask, train, cache_layer, index)
    return DenseNorm(x.shape[-1], self.layer_norm_eps, self.hidden_dropout_prob,
                     name='output')(y, x, train), cache_layer


class Intermediate(nn.Module):
  intermediate_size: int
  gelu_approximate: bool

  @nn.compact
  def __call__(self, x):
    return nn.gelu(_dense(self.intermediate_size, 'dense')(x),
                   approximate=self.gelu_approximate)


class Layer(nn.Module):
  num_heads: int
  intermediate_size: int
  layer_norm_eps: float
  gelu_approximate: bool
  hidden_dropout_prob: float
  attention_probs_dropout_prob: float

  @nn.compact
  def __call__(self, x, mask, train: bool, cache_layer=None, index=None):
    x, cache_layer = Attention(self.num_heads, self.layer_norm_eps, self.hidden_dropout_prob,
                               self.attention_probs_dropout_prob, name='attention')(
                                   x, mask, train, cache_layer, index)
    y = Intermediate(self.intermediate_size, self.gelu_approximate, name='intermediate')(x)
    return DenseNorm(x.shape[-1], self.layer_norm_eps, self.hidden_dropout_prob,
                     name='output')(y, x, train), cache_layer


class Pooler(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.tanh(_dense(x.shape[-1], 'dense')(x[:, 0]))


def mean_pool(x, attention_mask):
  """Masked mean over tokens, as sentence-transformers (count clamped at 1e-9)."""
  if attention_mask is None:
    return jnp.mean(x, axis=1)
  m = jnp.asarray(attention_mask).astype(x.dtype)[..., None]
  return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


class BertEncoder(nn.Module):
  """BERT; returns {'last_hidden_state' [B, T, D], 'features' [B, D],
  'pooler_output' [B, D] (with add_pooler), 'logits' [B, C] (with num_classes)}.

  attention_mask [B, T]: 1 for real tokens, 0 for padding (keys only, as HF).
  token_type_ids [B, T]: segment ids, zeros by default.
  inputs_embeds [B, T, D]: word embeddings in place of input_ids (HF's
    inputs_embeds; prompt tuning prepends learned ones).
  cache: key/value slots from attention.init_cache (HF's past_key_values;
    prefix tuning fills the first ones). The T tokens write slots
    [index, index + T), attend to every slot the mask [B, S] keeps (an
    encoder: no causal mask) and take positions index + t, as transformers
    4's BERT did with past_key_values. The updated cache comes back as 'cache'.
  `train=True` enables dropout (rng 'dropout').
  """
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = 'gelu'  # an ACTIVATIONS key, as HF's config names it
  pad_token_id: int | None = 0  # its embedding row starts at zero, as in HF
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  classifier_dropout: float | None = None  # None: hidden_dropout_prob, as in HF
  pooling: str = 'cls'
  add_pooler: bool = True
  num_classes: int = 0
  remat: str = 'none'  # layers.REMAT_MODES: recompute each block in the backward pass

  @nn.compact
  def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, *,
               inputs_embeds=None, cache=None, train: bool = False) -> dict[str, Any]:
    batch, length = attention.batch_and_length(input_ids, inputs_embeds, self.hidden_size,
                                               'BERT')
    index = 0 if cache is None else cache['index']
    slots = length if cache is None else cache['layers'][0]['k'].shape[1]
    if slots > self.max_position_embeddings:
      raise ValueError(
          f'Sequence length {slots} exceeds this BERT\'s {self.max_position_embeddings} '
          'positions. Truncate the text to the model\'s context when tokenizing '
          '(the data config\'s max length) or split it into shorter pieces.')
    if cache is not None and len(cache['layers']) != self.num_layers:
      raise ValueError(f'The cache has {len(cache["layers"])} layers, the model '
                       f'{self.num_layers}: build it with attention.init_cache.')
    if attention_mask is not None and tuple(np.shape(attention_mask)) != (batch, slots):
      raise ValueError(f'attention_mask has shape {tuple(np.shape(attention_mask))}; '
                       f'expected {(batch, slots)} (one per '
                       f'{"cache slot" if cache is not None else "input token"}).')
    if token_type_ids is None:
      token_type_ids = jnp.zeros((batch, length), jnp.int32)
    positions = index + jnp.arange(length)[None]
    x = Embeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                   self.type_vocab_size, self.layer_norm_eps, self.hidden_dropout_prob,
                   name='embeddings')(input_ids, token_type_ids, positions, train,
                                      inputs_embeds)
    mask = attention.padding_mask(attention_mask, length)
    if cache is not None:  # slots not yet written hold nothing to attend to
      mask = attention.combine(mask, (jnp.arange(slots) < index + length)[None, None, None])
    new_layers = []
    for i in range(self.num_layers):
      x, layer = layers.remat(Layer, self.remat, static_argnums=(3,))(
          self.num_heads, self.intermediate_size, self.layer_norm_eps,
          ACTIVATIONS[self.hidden_act], self.hidden_dropout_prob,
          self.attention_probs_dropout_prob, name=f'layer_{i}')(
              x, mask, train, None if cache is None else cache['layers'][i], index)
      new_layers.append(layer)
    if cache is not None and attention_mask is not None:
      # Pooling reads the new tokens' own mask entries.
      attention_mask = jax.lax.dynamic_slice_in_dim(jnp.asarray(attention_mask), index,
                                                    length, axis=1)
    out = {'last_hidden_state': x}
    if self.add_pooler:
      out['pooler_output'] = Pooler(name='pooler')(x)
    if self.pooling == 'pooler':
      features = out['pooler_output']
    elif self.pooling == 'mean':
      features = mean_pool(x, attention_mask)
    else:
      features = x[:, 0]
    classifier_dropout = (self.hidden_dropout_prob if self.classifier_dropout is None
                          else self.classifier_dropout)
    out.update(layers.classifier_outputs(features, self.num_classes, classifier_dropout,
                                         train))
    if cache is not None:
      out['cache'] = {'index': cache['index'] + length, 'layers': new_layers}
    return out

"""Llama-family GGUF files (llama.cpp) -> the tensors of a Hugging Face dir.

  hf_config, tensors, tokenizer = read_llama_gguf('model.Q4_1.gguf')

`hf_config` has transformers' LlamaConfig keys and `tensors` the names,
(out, in) layouts and float32 values that the safetensors of the same model's
HF dir would hold, so one mapping serves both formats. Reading the file
(metadata, dequantisation, the tokenizer) is `formats/gguf.py`'s; what is
Llama's here:

- Names: GGUF's tensor names (blk.{i}.attn_q.weight) map to HF's.
- Q/K rows: llama.cpp's converter permutes the rows of q_proj and k_proj so
  each head's rotary pairs are interleaved (its RoPE rotates (x0, x1),
  (x2, x3), ...); HF pairs the first half of a head with the second
  (rotate-half). The inverse permutation restores HF's layout exactly.
"""
import functools

import jax
import numpy as np

from finetune_jax import errors
from finetune_jax.formats import gguf as gguf_format

SUPPORTED_ARCHITECTURES = ('llama',)

# GGUF tensor -> HF tensor ('{i}' is the layer index). The permuted ones get
# their rows un-interleaved with n_head (q) or n_head_kv (k).
_LAYER_NAMES = {
    'attn_norm.weight': 'input_layernorm.weight',
    'attn_q.weight': 'self_attn.q_proj.weight',
    'attn_q.bias': 'self_attn.q_proj.bias',
    'attn_k.weight': 'self_attn.k_proj.weight',
    'attn_k.bias': 'self_attn.k_proj.bias',
    'attn_v.weight': 'self_attn.v_proj.weight',
    'attn_v.bias': 'self_attn.v_proj.bias',
    'attn_output.weight': 'self_attn.o_proj.weight',
    'attn_output.bias': 'self_attn.o_proj.bias',
    'ffn_norm.weight': 'post_attention_layernorm.weight',
    'ffn_gate.weight': 'mlp.gate_proj.weight',
    'ffn_up.weight': 'mlp.up_proj.weight',
    'ffn_down.weight': 'mlp.down_proj.weight',
}
_TOP_NAMES = {
    'token_embd.weight': 'model.embed_tokens.weight',
    'output_norm.weight': 'model.norm.weight',
    'output.weight': 'lm_head.weight',
}
_PERMUTED = {'attn_q': 'num_attention_heads', 'attn_k': 'num_key_value_heads'}


def read_llama_gguf(path: str, keep_quantized: bool = False):
  """Reads a Llama-family GGUF file as Hugging Face would hold the model.

  keep_quantized: the matrices (projections, embedding, lm_head) stored in Q8_0,
    Q4_0 or Q4_1 come back with their blocks kept (`gguf_format.quantized`), for a
    quantized base; everything else is dequantised.

  Returns:
    (hf_config, tensors, tokenizer): a dict with LlamaConfig keys, {HF name:
    float32 array in nn.Linear (out, in) layout} without 'lm_head.weight' when
    the embeddings are tied, and a `tokenizers.Tokenizer` (None: the file has none).
  """
  reader = gguf_format.open_gguf(path)
  arch = gguf_format.metadata(reader, 'general.architecture', path)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise errors.CheckpointError(
        path, f'holds a {arch!r} model; GGUF loading supports the '
        f'{"/".join(SUPPORTED_ARCHITECTURES)} architecture (Llama 1/2/3, SmolLM2, TinyLlama, '
        'Mistral-7B exported as llama). Load other models from their Hugging Face dir.')
  config = _hf_config(reader, path)
  tensors = _hf_tensors(reader, path, config, keep_quantized)
  config['tie_word_embeddings'] = 'lm_head.weight' not in tensors
  config['attention_bias'] = 'model.layers.0.self_attn.q_proj.bias' in tensors
  tokenizer = gguf_format.tokenizer(reader, path)
  return config, tensors, tokenizer


def _hf_config(reader, path: str) -> dict:
  def get(key, default=gguf_format.REQUIRED):
    return gguf_format.metadata(reader, f'llama.{key}', path, default)

  def token_id(key):
    return gguf_format.metadata(reader, f'tokenizer.ggml.{key}', path, None)

  experts = get('expert_count', 0)
  if experts:
    raise errors.CheckpointError(path, f'a mixture-of-experts model ({experts} experts, e.g. '
                                 'Mixtral); only dense Llama models are supported.')
  hidden, heads = get('embedding_length'), get('attention.head_count')
  kv_heads = get('attention.head_count_kv', heads)
  if not isinstance(heads, int) or not isinstance(kv_heads, int):
    raise errors.CheckpointError(path, 'per-layer head counts; only uniform ones are supported.')
  head_dim = get('attention.key_length', hidden // heads)
  value_dim = get('attention.value_length', head_dim)
  rope_dim = get('rope.dimension_count', head_dim)
  if value_dim != head_dim or rope_dim != head_dim:
    raise errors.CheckpointError(
        path, f'key length {head_dim}, value length {value_dim} and rotary dimension '
        f'{rope_dim} differ; the Llama model needs them equal (full-width RoPE).')
  scaling = get('rope.scaling.type', 'none')
  if scaling in ('none', None):
    rope_scaling = None
  elif scaling == 'linear':
    rope_scaling = {'rope_type': 'linear', 'factor': get('rope.scaling.factor')}
  else:
    rope_scaling = {'rope_type': scaling, 'factor': get('rope.scaling.factor', None)}
  tokens = reader.get_field('tokenizer.ggml.tokens')
  vocab = get('vocab_size', len(tokens.data) if tokens is not None else gguf_format.REQUIRED)
  return {
      'model_type': 'llama',
      'architectures': ['LlamaForCausalLM'],
      'vocab_size': vocab,
      'hidden_size': hidden,
      'intermediate_size': get('feed_forward_length'),
      'num_hidden_layers': get('block_count'),
      'num_attention_heads': heads,
      'num_key_value_heads': kv_heads,
      'head_dim': head_dim,
      'rms_norm_eps': get('attention.layer_norm_rms_epsilon', 1e-5),
      'rope_theta': get('rope.freq_base', 10000.0),
      'rope_scaling': rope_scaling,
      'max_position_embeddings': get('context_length'),
      'tie_word_embeddings': None,  # set from the tensors
      'attention_bias': None,  # set from the tensors
      'bos_token_id': token_id('bos_token_id'),
      'eos_token_id': token_id('eos_token_id'),
      'pad_token_id': token_id('padding_token_id'),
  }


def hf_name(gguf_name: str) -> str | None:
  """The HF LlamaForCausalLM name of a GGUF tensor, or None if it has none."""
  if gguf_name in _TOP_NAMES:
    return _TOP_NAMES[gguf_name]
  parts = gguf_name.split('.', 2)
  if len(parts) == 3 and parts[0] == 'blk' and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
    return f'model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}'
  return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp convert_hf_to_gguf's `permute` (q: n_head, k: n_head_kv).

  llama.cpp interleaves each head's two rotary halves row by row; this
  restores HF's [first half; second half] order. Works on weights and biases.
  """
  rows = w.shape[0]
  return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's permutation (HF -> GGUF layout), for writing test files."""
  rows = w.shape[0]
  return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def _expected_shape(name: str, c: dict) -> tuple | None:
  d, v, i = c['hidden_size'], c['vocab_size'], c['intermediate_size']
  q, kv = c['num_attention_heads'] * c['head_dim'], c['num_key_value_heads'] * c['head_dim']
  leaf = name.split('.', 3)[-1] if name.startswith('model.layers.') else name
  return {
      'model.embed_tokens.weight': (v, d), 'lm_head.weight': (v, d), 'model.norm.weight': (d,),
      'input_layernorm.weight': (d,), 'post_attention_layernorm.weight': (d,),
      'self_attn.q_proj.weight': (q, d), 'self_attn.q_proj.bias': (q,),
      'self_attn.k_proj.weight': (kv, d), 'self_attn.k_proj.bias': (kv,),
      'self_attn.v_proj.weight': (kv, d), 'self_attn.v_proj.bias': (kv,),
      'self_attn.o_proj.weight': (d, q), 'self_attn.o_proj.bias': (d,),
      'mlp.gate_proj.weight': (i, d), 'mlp.up_proj.weight': (i, d), 'mlp.down_proj.weight': (d, i),
  }.get(leaf)


def _hf_tensors(reader, path: str, config: dict, keep_quantized: bool) -> dict:
  tensors = {}
  for tensor in reader.tensors:
    if tensor.name == 'rope_freqs.weight':
      raise errors.CheckpointError(
          path, key=tensor.name, why='Llama 3.1-style scaled RoPE, which the Llama '
          'model does not implement; use a model with plain RoPE (Llama 2/3.0, SmolLM2).')
    name = hf_name(tensor.name)
    if name is None:
      raise errors.CheckpointError(
          path, 'no Llama counterpart (not a plain dense Llama checkpoint?); nothing was '
          'loaded.', key=tensor.name)
    layer = int(tensor.name.split('.')[1]) if name.startswith('model.layers.') else None
    if layer is not None and layer >= config['num_hidden_layers']:
      raise errors.CheckpointError(
          path, f'past llama.block_count = {config["num_hidden_layers"]}.', key=tensor.name)
    matrix = len(tensor.shape) == 2
    value = gguf_format.quantized(tensor, path) if keep_quantized and matrix else None
    if value is None:
      value = gguf_format.dequantize(tensor, path)
    kind = tensor.name.split('.')[2] if layer is not None else None
    if kind in _PERMUTED:  # whole rows move, so kept blocks (and their scales) move along
      value = jax.tree.map(functools.partial(unpermute_rows, n_head=config[_PERMUTED[kind]]),
                           value)
    expected = _expected_shape(name, config)
    if value.shape != expected:
      raise errors.CheckpointError(
          path, f'shape {value.shape}, but the metadata implies {expected} for {name}.',
          key=tensor.name)
    tensors[name] = value
  required = ['model.embed_tokens.weight', 'model.norm.weight']
  for i in range(config['num_hidden_layers']):
    required += [f'model.layers.{i}.{n}' for n in _LAYER_NAMES.values() if n.endswith('weight')]
  missing = [n for n in required if n not in tensors]
  if missing:
    raise errors.CheckpointError(path, f'lacks the tensors for {missing[:6]}'
                                 f'{" ..." if len(missing) > 6 else ""}; the file is incomplete.')
  return tensors

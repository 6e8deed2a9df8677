"""transformers LlamaForCausalLM checkpoints <-> our Llama param tree.

Names (see models/llama/model.py for ours); 'model.' may be absent (a bare LlamaModel):
  model.embed_tokens.weight                          -> embed_tokens/embedding
  model.layers.{i}.input_layernorm.weight            -> layers_{i}/input_layernorm/scale
  model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias}
                                                     -> layers_{i}/self_attn/{q,k,v,o}_proj/{kernel,bias}
  model.layers.{i}.post_attention_layernorm.weight   -> layers_{i}/post_attention_layernorm/scale
  model.layers.{i}.mlp.{gate,up,down}_proj.{weight,bias}
                                                     -> layers_{i}/mlp/{...}/{kernel,bias}
  model.norm.weight                                  -> norm/scale
  lm_head.weight                                     -> lm_head/kernel (untied only)
nn.Linear weights (out, in) become Dense kernels (in, out). Mistral and Qwen2
checkpoints use the same names (Qwen2 adds q/k/v biases). A key that maps to
nothing is an error, so a wrong architecture fails here, not as bad outputs.
"""
import re

import numpy as np
from flax import traverse_util

from finetune_jax import quantized
from finetune_jax.formats import mapping
from finetune_jax.models.llama import model as llama

_LAYER = {
    'input_layernorm.weight': 'input_layernorm/scale',
    'post_attention_layernorm.weight': 'post_attention_layernorm/scale',
    **{f'self_attn.{p}.{leaf}': f'self_attn/{p}/{ours}'
       for p in ('q_proj', 'k_proj', 'v_proj', 'o_proj')
       for leaf, ours in (('weight', 'kernel'), ('bias', 'bias'))},
    **{f'mlp.{p}.{leaf}': f'mlp/{p}/{ours}'
       for p in ('gate_proj', 'up_proj', 'down_proj')
       for leaf, ours in (('weight', 'kernel'), ('bias', 'bias'))},
}
_TOP = {'embed_tokens.weight': 'embed_tokens/embedding', 'norm.weight': 'norm/scale'}
_LAYER_RE = re.compile(r'^layers\.(\d+)\.(.+)$')
# Non-persistent RoPE buffers that old checkpoints saved; recomputed, checked.
_INV_FREQ_RE = re.compile(r'^layers\.\d+\.self_attn\.rotary_emb\.inv_freq$')


def hf_to_params(tensors: dict, config: dict, source: str = '<HF checkpoint>') -> dict:
  """Our flat {path: array} from LlamaForCausalLM tensors (HF names and layout).

  config: our make_config dict; with tied embeddings an lm_head.weight equal
    to the embedding table (some exporters write both) is dropped, a
    different one is an error.
  """
  params = mapping.ParamCollector(
      source, 'Llama', 'Is this a transformers LlamaForCausalLM (or Mistral / Qwen2) '
      'checkpoint? Add a dont_load pattern only for tensors the model truly lacks.',
      mixed='keys with and without the "model." prefix are mixed')
  lm_head = None
  for key, value in tensors.items():
    value = value if quantized.is_quantized(value) else np.asarray(value)
    if key == 'lm_head.weight':
      lm_head = value
      continue
    name = key[len('model.'):] if key.startswith('model.') else key
    if _INV_FREQ_RE.match(name):
      _check_inv_freq(value, config, key, source)
      continue
    m = _LAYER_RE.match(name)
    if name in _TOP:
      ours = _TOP[name]
    elif m and m[2] in _LAYER:
      ours = f'layers_{m[1]}/{_LAYER[m[2]]}'
    else:
      params.unmapped(key)
      continue
    if ours.endswith('/kernel'):
      value = params.transposed(key, value)
    params.add(ours, key, value)
  flat = params.result()
  mapping.add_lm_head(flat, lm_head, tied=config['tie_word_embeddings'],
                      embedding='embed_tokens/embedding',
                      embedding_key='model.embed_tokens.weight', source=source)
  return flat


def _check_inv_freq(value, config, key, source):
  expected = 1.0 / (config['rope_theta'] ** (
      np.arange(0, config['head_dim'], 2, dtype=np.float32) / config['head_dim']))
  if value.shape != expected.shape or not np.allclose(value, expected, rtol=1e-4):
    raise ValueError(f'{source}: {key} is not plain RoPE with rope_theta='
                     f'{config["rope_theta"]}: the checkpoint scales its rotary '
                     'frequencies, which models/llama/model.py does not implement.')


_TOP_HF = {v: k for k, v in _TOP.items()}
_LAYER_HF = {v: k for k, v in _LAYER.items()}


def hf_name(path: str) -> str:
  """The LlamaForCausalLM name of our param `path`."""
  if path == 'lm_head/kernel':
    return 'lm_head.weight'
  m = re.match(r'^layers_(\d+)/(.+)$', path)
  if path in _TOP_HF:
    return f'model.{_TOP_HF[path]}'
  if m and m[2] in _LAYER_HF:
    return f'model.layers.{m[1]}.{_LAYER_HF[m[2]]}'
  raise ValueError(f'Parameter {path!r} has no LlamaForCausalLM name.')


def params_to_hf(params: dict, config: dict) -> dict[str, np.ndarray]:
  """LlamaForCausalLM tensors (HF names, (out, in) Linear weights) from our params."""
  del config  # the names and layouts follow from the paths alone
  return {hf_name(path): np.ascontiguousarray(
              np.asarray(value).T if path.endswith('/kernel') else np.asarray(value))
          for path, value in traverse_util.flatten_dict(dict(params), sep='/').items()}


# ------------------------------------------------------------------ config

# Same layout and maths as Llama (Qwen2: q/k/v biases; Mistral: sliding window).
MODEL_TYPES = ('llama', 'mistral', 'qwen2')


def hf_architecture(hf_config: dict, source: str = '<config.json>') -> dict:
  """make_config fields from a transformers Llama / Mistral / Qwen2 config dict.

  Also reads the dicts the GGUF reader builds (HF LlamaConfig keys); absent
  keys take LlamaConfig's defaults: head_dim = hidden_size // heads,
  num_key_value_heads = heads.
  """
  model_type = hf_config.get('model_type', 'llama')
  if model_type not in MODEL_TYPES:
    raise ValueError(f'{source}: model_type={model_type!r}; the Llama loader reads '
                     f'{MODEL_TYPES}.')

  def get(key):
    if hf_config.get(key) is None:
      raise ValueError(f'{source} lacks {key!r}; is this a {model_type} config?')
    return hf_config[key]

  act = hf_config.get('hidden_act', 'silu')
  if act not in ('silu', 'swish'):
    raise ValueError(f'{source}: hidden_act={act!r}; the Llama MLP is SwiGLU (silu) only.')
  rope = hf_config.get('rope_parameters')  # transformers >= 5
  if isinstance(rope, dict) and 'rope_theta' in rope:
    theta = rope['rope_theta']
    scaling = None if rope.get('rope_type', 'default') == 'default' else rope
    if rope.get('partial_rotary_factor', 1.0) != 1.0:
      raise ValueError(f'{source}: partial_rotary_factor={rope["partial_rotary_factor"]}; '
                       'only full-width RoPE is implemented.')
  else:
    theta = hf_config.get('rope_theta', 10000.0)
    scaling = hf_config.get('rope_scaling')
  llama.check_rope_scaling(scaling, source)

  heads = get('num_attention_heads')
  hidden = get('hidden_size')
  fields = dict(
      vocab_size=get('vocab_size'), hidden_size=hidden,
      num_layers=get('num_hidden_layers'), num_heads=heads,
      num_kv_heads=hf_config.get('num_key_value_heads') or heads,
      head_dim=hf_config.get('head_dim') or hidden // heads,
      intermediate_size=get('intermediate_size'),
      max_position_embeddings=hf_config.get('max_position_embeddings', 2048),
      rope_theta=float(theta), rope_scaling=None,
      rms_norm_eps=float(hf_config.get('rms_norm_eps', 1e-6)),
      tie_word_embeddings=bool(hf_config.get('tie_word_embeddings', False)),
      attention_dropout=float(hf_config.get('attention_dropout', 0.0)),
      initializer_range=float(hf_config.get('initializer_range', 0.02)),
      bos_token_id=_token_id(hf_config.get('bos_token_id')),
      eos_token_id=_token_id(hf_config.get('eos_token_id')),
      pad_token_id=_token_id(hf_config.get('pad_token_id')))
  if model_type == 'llama':
    bias = bool(hf_config.get('attention_bias', False))
    fields.update(qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf_config.get('mlp_bias', False)))
  elif model_type == 'qwen2':
    fields.update(qkv_bias=True)
    _check_layer_types(hf_config, source)
    if hf_config.get('use_sliding_window'):
      raise ValueError(f'{source}: use_sliding_window=true (sliding attention on some '
                       'Qwen2 layers) is not implemented.')
  else:  # mistral
    _check_layer_types(hf_config, source)
    fields['sliding_window'] = hf_config.get('sliding_window')
  return fields


def _check_layer_types(hf_config, source):
  kinds = set(hf_config.get('layer_types') or ['full_attention'])
  if kinds != {'full_attention'}:
    raise ValueError(f'{source}: layer_types {sorted(kinds)}; only full attention on '
                     'every layer is implemented.')


def _token_id(value):
  """HF allows a list of ids (Llama 3 eos); one id stays an int."""
  if isinstance(value, (list, tuple)):
    return int(value[0]) if len(value) == 1 else [int(v) for v in value]
  return None if value is None else int(value)


def hf_config(config: dict) -> dict:
  """A transformers config.json for our Llama config (Mistral / Qwen2 by their fields).

  RoPE is written both ways: `rope_parameters` (transformers >= 5) and
  `rope_theta` (older versions).
  """
  llama.check_rope_scaling(config['rope_scaling'], 'the Llama config')  # plain RoPE only
  out = {
      'vocab_size': config['vocab_size'], 'hidden_size': config['hidden_size'],
      'intermediate_size': config['intermediate_size'],
      'num_hidden_layers': config['num_layers'], 'num_attention_heads': config['num_heads'],
      'num_key_value_heads': config['num_kv_heads'], 'head_dim': config['head_dim'],
      'max_position_embeddings': config['max_position_embeddings'],
      'rope_theta': config['rope_theta'],
      'rope_parameters': {'rope_type': 'default', 'rope_theta': config['rope_theta']},
      'rms_norm_eps': config['rms_norm_eps'],
      'tie_word_embeddings': config['tie_word_embeddings'], 'hidden_act': 'silu',
      'attention_dropout': config['attention_dropout'],
      'initializer_range': config['initializer_range'],
      'bos_token_id': config['bos_token_id'], 'eos_token_id': config['eos_token_id'],
      'pad_token_id': config['pad_token_id']}
  if config['sliding_window'] is not None:
    if config['qkv_bias'] or config['o_bias'] or config['mlp_bias']:
      raise ValueError('A Llama config with both a sliding window and biases has no '
                       'transformers model type (Mistral has no biases).')
    return {'architectures': ['MistralForCausalLM'], 'model_type': 'mistral',
            'sliding_window': config['sliding_window'], **out}
  if config['qkv_bias'] and not config['o_bias'] and not config['mlp_bias']:
    return {'architectures': ['Qwen2ForCausalLM'], 'model_type': 'qwen2',
            'use_sliding_window': False, **out}
  if config['qkv_bias'] != config['o_bias']:
    raise ValueError(f'qkv_bias={config["qkv_bias"]} with o_bias={config["o_bias"]} has '
                     'no transformers model type (Llama attention_bias sets both).')
  return {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
          'attention_bias': config['qkv_bias'], 'mlp_bias': config['mlp_bias'], **out}

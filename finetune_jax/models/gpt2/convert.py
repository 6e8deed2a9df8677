"""Hugging Face GPT-2 checkpoints <-> our GPT-2 param tree (models/gpt2/model.py).

Keys of a GPT2LMHeadModel ('transformer.' prefix, optional 'lm_head.weight')
or a GPT2Model (no prefix) map one to one:
  wte.weight, wpe.weight                       -> wte/embedding, wpe/embedding
  h.{i}.ln_1, h.{i}.ln_2, ln_f: weight, bias   -> scale, bias
  h.{i}.attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj: weight, bias -> kernel, bias
  lm_head.weight (V, D)                        -> lm_head/kernel (D, V), untied only
HF's Conv1D stores weights (in, out), already a Dense kernel. The causal-mask
buffers old checkpoints saved (h.{i}.attn.bias / attn.masked_bias, square)
are skipped; any other unmapped key is an error.
"""
import re

import numpy as np
from flax import traverse_util

from finetune_jax.formats import mapping

_PREFIX = 'transformer.'
_MODULES = (  # (HF module, ours, layout)
    ('wte', 'wte', 'embed'),
    ('wpe', 'wpe', 'embed'),
    ('h.{i}.ln_1', 'h_{i}/ln_1', 'norm'),
    ('h.{i}.attn.c_attn', 'h_{i}/attn/c_attn', 'conv1d'),
    ('h.{i}.attn.c_proj', 'h_{i}/attn/c_proj', 'conv1d'),
    ('h.{i}.ln_2', 'h_{i}/ln_2', 'norm'),
    ('h.{i}.mlp.c_fc', 'h_{i}/mlp/c_fc', 'conv1d'),
    ('h.{i}.mlp.c_proj', 'h_{i}/mlp/c_proj', 'conv1d'),
    ('ln_f', 'ln_f', 'norm'),
)
_LEAVES = {
    'embed': {'weight': 'embedding'},
    'norm': {'weight': 'scale', 'bias': 'bias'},
    'conv1d': {'weight': 'kernel', 'bias': 'bias'},
}
_BUFFER = re.compile(r'^h\.\d+\.attn\.(bias|masked_bias)$')
_TEMPLATES = mapping.Templates(_MODULES, _LEAVES)


def hf_to_params(tensors: dict, *, tie_word_embeddings: bool = True,
                 source: str = '<HF checkpoint>') -> dict:
  """Our flat {path: array} from the tensors of a transformers GPT-2 checkpoint.

  A tied model's checkpoint may still carry 'lm_head.weight' (a copy of the
  token embedding); it is dropped if it is that copy, an error otherwise.
  """
  params = mapping.ParamCollector(
      source, 'GPT-2', 'Is this a transformers GPT2LMHeadModel / GPT2Model checkpoint?',
      mixed='keys with and without the "transformer." prefix are mixed')
  lm_head = None
  for key, value in tensors.items():
    name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    if _BUFFER.match(name):
      continue  # HF's causal-mask buffers (non-persistent in new versions)
    if name == 'lm_head.weight':
      lm_head = np.asarray(value)
      continue
    mapped = _TEMPLATES.match(name)
    if mapped is None:
      params.unmapped(key)
    else:
      params.add(mapped[0], key, value)
  flat = params.result()
  mapping.add_lm_head(flat, lm_head, tied=tie_word_embeddings, embedding='wte/embedding',
                      embedding_key='wte.weight', source=source)
  return flat


def hf_name(path: str, prefix: str = _PREFIX) -> str:
  """The HF name of our param `path` (GPT2LMHeadModel's with the default prefix)."""
  if path == 'lm_head/kernel':
    return 'lm_head.weight'
  found = _TEMPLATES.theirs(path)
  if found is None:
    raise ValueError(f'Parameter {path!r} has no GPT-2 checkpoint name.')
  return prefix + found[0]


def params_to_hf(params: dict, *, prefix: str = _PREFIX) -> dict[str, np.ndarray]:
  """HF tensors from our params; Conv1D keeps (in, out), only the LM head transposes."""
  tensors = {}
  for path, value in traverse_util.flatten_dict(dict(params), sep='/').items():
    value = np.asarray(value)
    tensors[hf_name(path, prefix)] = (np.ascontiguousarray(value.T) if path == 'lm_head/kernel'
                                      else value)
  return tensors


def hf_architecture(hf_config: dict, source: str = '<config.json>') -> dict:
  """models.gpt2.make_config fields from a transformers GPT2Config dict."""
  def get(*keys):
    for key in keys:
      if key in hf_config:
        return hf_config[key]
    raise ValueError(f'{source}: config.json lacks {keys[0]!r}; is this a GPT-2 config?')

  if hf_config.get('add_cross_attention'):
    raise ValueError(f'{source}: add_cross_attention=True (an encoder-decoder GPT-2) '
                     'is not supported; use a decoder-only checkpoint.')
  if not hf_config.get('scale_attn_weights', True):
    raise ValueError(f'{source}: scale_attn_weights=False is not supported (attention '
                     'here always scales by 1/sqrt(head_dim)).')
  vocab = int(get('vocab_size'))

  def token(key):  # ids outside the vocabulary (HF's 50256 default on toy configs)
    value = hf_config.get(key)
    if isinstance(value, list):
      value = value[0] if value else None
    return value if isinstance(value, int) and 0 <= value < vocab else None

  return dict(
      vocab_size=vocab, hidden_size=int(get('n_embd', 'hidden_size')),
      num_layers=int(get('n_layer', 'num_hidden_layers')),
      num_heads=int(get('n_head', 'num_attention_heads')),
      max_position_embeddings=int(get('n_positions', 'max_position_embeddings')),
      intermediate_size=hf_config.get('n_inner'),
      activation=hf_config.get('activation_function', 'gelu_new'),
      layer_norm_eps=float(hf_config.get('layer_norm_epsilon', 1e-5)),
      tie_word_embeddings=bool(hf_config.get('tie_word_embeddings', True)),
      embd_pdrop=float(hf_config.get('embd_pdrop', 0.1)),
      attn_pdrop=float(hf_config.get('attn_pdrop', 0.1)),
      resid_pdrop=float(hf_config.get('resid_pdrop', 0.1)),
      scale_attn_by_inverse_layer_idx=bool(
          hf_config.get('scale_attn_by_inverse_layer_idx', False)),
      bos_token_id=token('bos_token_id'), eos_token_id=token('eos_token_id'))


def hf_config(config: dict) -> dict:
  """A transformers GPT2LMHeadModel config.json for our GPT-2 config."""
  return {
      'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2',
      'vocab_size': config['vocab_size'], 'n_embd': config['hidden_size'],
      'n_layer': config['num_layers'], 'n_head': config['num_heads'],
      'n_positions': config['max_position_embeddings'],
      'n_inner': config['intermediate_size'],
      'activation_function': config['activation'],
      'layer_norm_epsilon': config['layer_norm_eps'],
      'tie_word_embeddings': config['tie_word_embeddings'],
      'embd_pdrop': config['embd_pdrop'], 'attn_pdrop': config['attn_pdrop'],
      'resid_pdrop': config['resid_pdrop'],
      'scale_attn_by_inverse_layer_idx': config['scale_attn_by_inverse_layer_idx'],
      'scale_attn_weights': True,
      'bos_token_id': config['bos_token_id'], 'eos_token_id': config['eos_token_id']}

"""Llama family: parameter counts, HF parity (Llama/Mistral/Qwen2), KV cache, GGUF, real SmolLM2."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

import finetune_jax
from finetune_jax import models
from finetune_jax import sampling
from finetune_jax.models import attention
from finetune_jax.models import llama as zoo_llama
from finetune_jax.models import tokenization
from finetune_jax.models.llama import convert as convert_llama
from finetune_jax.models.llama import model as llama

# Small HF configs: GQA (4 heads, 2 kv heads), vocab 260 > the byte-level
# tokenizer's 257 ids. The untied one also has biases, its own head_dim and rope_theta.
HF_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=64, vocab_size=260,
                 max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=256,
                 eos_token_id=256)
HF_CONFIGS = {
    'tied': dict(tie_word_embeddings=True),
    'untied': dict(tie_word_embeddings=False, head_dim=16, attention_bias=True, mlp_bias=True,
                   rope_parameters={'rope_type': 'default', 'rope_theta': 500.0}),
}
PROMPT = ('The capital of France is Paris. The capital of Germany is Berlin. '
          'The capital of Italy is')


def _flat(params):
  return traverse_util.flatten_dict(dict(params), sep='/')


def _count(params):
  return sum(v.size for v in _flat(params).values())


def _randomise(torch_model, seed=0):
  """Weights of order 0.2 and non-trivial norms, so mapping mistakes show."""
  import torch
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in torch_model.named_parameters():
      if 'norm' in name:
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.2)
  return torch_model.eval()


def _inputs():
  """Two rows of 9 tokens: row 0 right-padded (last 3), row 1 left-padded (first 2)."""
  ids = np.random.default_rng(1).integers(0, 260, (2, 9)).astype(np.int64)
  mask = np.ones((2, 9), np.int64)
  mask[0, 6:] = 0
  mask[1, :2] = 0
  return ids, mask


def _torch_logits(model, ids, mask):
  import torch
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids),
                 attention_mask=torch.from_numpy(mask)).logits.numpy()


def _save_hf(model, path, **kw):
  model.save_pretrained(path, **kw)
  tokenization.byte_level_tokenizer(('<|endoftext|>',)).save(os.path.join(path, 'tokenizer.json'))
  return str(path)


def _ours_logits(pretrained, ids, mask):
  out = jax.jit(pretrained.module.apply)({'params': pretrained.params},
                                         jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
  return np.asarray(out['logits'])


def _assert_close_on_real_tokens(ours, theirs, mask):
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
  """kind -> (kind, saved dir, torch model, torch logits on the padded inputs)."""
  from transformers import LlamaConfig, LlamaForCausalLM
  out = {}
  for kind, fields in HF_CONFIGS.items():
    config = LlamaConfig(**HF_COMMON, **fields)
    config._attn_implementation = 'eager'
    model = _randomise(LlamaForCausalLM(config))
    path = tmp_path_factory.mktemp('hf') / f'llama-{kind}'
    # The untied one is sharded: a model.safetensors.index.json dir.
    _save_hf(model, path, **({'max_shard_size': '40KB'} if kind == 'untied' else {}))
    out[kind] = (kind, str(path), model, _torch_logits(model, *_inputs()))
  return out


@pytest.fixture(params=sorted(HF_CONFIGS))
def hf_llama(request, hf_dirs):
  return hf_dirs[request.param]


# ------------------------------------------------------------------ architecture


def test_parameter_counts():
  counts = {v: llama.num_params(llama.make_config(v)) for v in llama.VARIANTS}
  assert counts == {'tiny': 26_816, 'smollm2-135m': 134_515_008, 'llama2-7b': 6_738_415_616}
  # SmolLM2-135M per transformers, built on the meta device (nothing allocated).
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  with torch.device('meta'):
    reference = LlamaForCausalLM(LlamaConfig(
        vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True))
  assert sum(p.numel() for p in reference.parameters()) == 134_515_008
  config = llama.make_config('smollm2-135m')
  shapes = llama.param_shapes(zoo_llama.ARCHITECTURE.build(config))
  assert shapes['layers_3/self_attn/k_proj/kernel'].shape == (576, 192)
  assert shapes['layers_3/mlp/down_proj/kernel'].shape == (1536, 576)
  assert 'lm_head/kernel' not in shapes
  assert llama.block_names(config) == (
      'embed_tokens', *(f'layers_{i}' for i in range(30)), 'norm')
  assert llama.variant_of(config) == 'smollm2-135m'
  with pytest.raises(ValueError, match='not a multiple of num_kv_heads'):
    llama.make_config('tiny', num_kv_heads=3)
  with pytest.raises(ValueError, match='Unknown Llama variant'):
    llama.make_config('llama-70b')


def test_tiny_alias_api():
  model = models.load_pretrained('llama-tiny')
  config = model.config
  assert _count(model.params) == 26_816 and set(model.params) == set(model.blocks)
  assert model.head == 'lm_head' and 'lm_head' not in model.params  # tied
  for key in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'num_kv_heads',
              'head_dim', 'max_position_embeddings', 'tie_word_embeddings',
              'bos_token_id', 'eos_token_id'):
    assert key in config
  assert (config['model'], config['num_kv_heads'], config['head_dim']) == ('llama', 2, 8)
  tok = model.tokenizer
  enc = tok.encode('héllo<|endoftext|>')
  assert enc.ids[-1] == config['eos_token_id'] == 256 and max(enc.ids) < config['vocab_size']
  assert tok.decode(enc.ids, skip_special_tokens=True) == 'héllo'
  out = model.module.apply({'params': model.params}, jnp.asarray([enc.ids]))
  assert out['logits'].shape == (1, len(enc.ids), 257) and out['logits'].dtype == jnp.float32
  assert out['last_hidden_state'].shape == (1, len(enc.ids), 32) and 'cache' not in out
  assert {'llama-tiny', 'smollm2-135m', 'smollm2-135m-random'} <= set(models.list_aliases())


def test_bad_calls_and_options():
  with pytest.raises(ValueError, match='no classifier, so num_classes=3'):
    models.load_pretrained('llama-tiny', num_classes=3)
  with pytest.raises(ValueError, match="Unknown options \\['pooling'\\]"):
    zoo_llama.load_random(None, variant='tiny', num_classes=None, dont_load=(), seed=0,
                          pooling='mean')
  model = zoo_llama.load_random(None, variant='tiny', num_classes=None, dont_load=(), seed=0,
                                max_position_embeddings=8, attention_dropout=0.1)
  assert model.config['max_position_embeddings'] == 8
  with pytest.raises(ValueError, match='longer than the model\'s context.*Truncate'):
    model.module.apply({'params': model.params}, jnp.zeros((1, 9), jnp.int32))
  with pytest.raises(ValueError, match='attention_mask has shape'):
    model.module.apply({'params': model.params}, jnp.zeros((1, 4), jnp.int32),
                       jnp.ones((1, 5), jnp.int32))


def test_train_mode_is_attention_dropout_only():
  model = zoo_llama.load_random(None, variant='tiny', num_classes=None, dont_load=(), seed=0,
                                attention_dropout=0.5)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 257, (2, 6)), jnp.int32)
  apply = jax.jit(lambda train, seed: model.module.apply(
      {'params': model.params}, ids, train=train,
      rngs={'dropout': jax.random.PRNGKey(seed)})['logits'], static_argnums=0)
  np.testing.assert_array_equal(apply(False, 0), apply(False, 1))
  assert not np.allclose(apply(True, 0), apply(False, 0))
  assert not np.allclose(apply(True, 0), apply(True, 1))


@pytest.mark.parametrize('window', [None, 3])
def test_kv_cache_matches_full_forward(window):
  """Prefill + one token at a time equals one uncached pass, with left padding
  (and with a Mistral-style sliding window, which the cache must respect)."""
  config = llama.make_config('tiny', sliding_window=window)
  module = zoo_llama.ARCHITECTURE.build(config)
  apply = jax.jit(module.apply)
  p = {'params': llama.init_params(module, seed=3)}
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 257, (2, 8)), jnp.int32)
  mask = jnp.asarray([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]], jnp.int32)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  full = apply(p, ids, mask, positions=positions)['logits']

  cache = attention.init_cache(config, 2, 10)
  cache_mask = jnp.zeros((2, 10), jnp.int32).at[:, :8].set(mask)
  out = apply(p, ids[:, :5], cache_mask, positions=positions[:, :5], cache=cache)
  logits = [out['logits']]
  for t in range(5, 8):
    out = apply(p, ids[:, t:t + 1], cache_mask, positions=positions[:, t:t + 1],
                cache=out['cache'])
    logits.append(out['logits'])
  assert int(out['cache']['index']) == 8
  cached = jnp.concatenate(logits, axis=1)
  real = np.asarray(mask).astype(bool)
  np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], atol=1e-5)
  if window:
    return
  # Default positions with a cache are the slot numbers.
  plain = apply(p, ids)['logits']
  out = apply(p, ids[:, :3], cache=attention.init_cache(config, 2, 8))
  out = apply(p, ids[:, 3:], cache=out['cache'])
  np.testing.assert_allclose(out['logits'], plain[:, 3:], atol=1e-5)


# ------------------------------------------------------------------ HF parity


def test_hf_parity(hf_llama):
  kind, path, _, expected = hf_llama
  if kind == 'untied':
    assert os.path.exists(os.path.join(path, 'model.safetensors.index.json'))
    assert len([f for f in os.listdir(path) if f.endswith('.safetensors')]) > 1
  ours = models.load_pretrained(path)
  config = ours.config
  assert config['tie_word_embeddings'] == (kind == 'tied')
  assert ('lm_head' in ours.params) == (kind == 'untied')
  assert (config['num_heads'], config['num_kv_heads']) == (4, 2)
  if kind == 'untied':
    assert (config['head_dim'], config['rope_theta'], config['qkv_bias']) == (16, 500.0, True)
  ids, mask = _inputs()
  _assert_close_on_real_tokens(_ours_logits(ours, ids, mask), expected, mask)


@pytest.mark.parametrize('model_type', ['mistral', 'qwen2'])
def test_hf_parity_mistral_qwen2(model_type, tmp_path):
  import transformers
  if model_type == 'mistral':  # a window shorter than the input, so it masks
    config = transformers.MistralConfig(**HF_COMMON, sliding_window=3)
    cls = transformers.MistralForCausalLM
  else:  # q/k/v biases, tied embeddings
    config = transformers.Qwen2Config(**HF_COMMON, tie_word_embeddings=True)
    cls = transformers.Qwen2ForCausalLM
  config._attn_implementation = 'eager'
  model = _randomise(cls(config))
  ids, mask = _inputs()
  ours = models.load_pretrained(_save_hf(model, tmp_path / model_type))
  _assert_close_on_real_tokens(_ours_logits(ours, ids, mask), _torch_logits(model, ids, mask),
                               mask)


def test_params_to_hf_round_trip(hf_llama):
  _, path, model, _ = hf_llama
  ours = models.load_pretrained(path)
  tensors = convert_llama.params_to_hf(ours.params, ours.config)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  if ours.config['tie_word_embeddings']:
    state.pop('lm_head.weight')
  assert set(tensors) == set(state)
  for key, value in tensors.items():
    np.testing.assert_array_equal(value, state[key], err_msg=key)


def test_dont_load_keeps_init(hf_llama):
  _, path, _, _ = hf_llama
  loaded = models.load_pretrained(path, dont_load=['^layers_1/mlp/'], seed=4)
  init = llama.init_params(zoo_llama.ARCHITECTURE.build(loaded.config), seed=4)
  np.testing.assert_array_equal(loaded.params['layers_1']['mlp']['up_proj']['kernel'],
                                init['layers_1']['mlp']['up_proj']['kernel'])
  assert not np.array_equal(loaded.params['layers_0']['mlp']['up_proj']['kernel'],
                            init['layers_0']['mlp']['up_proj']['kernel'])


# ------------------------------------------------------------------ bad input


def _copy(path, tmp_path):
  dest = tmp_path / 'copy'
  shutil.copytree(path, dest)
  return dest


def _edit_config(path, **changes):
  with open(path / 'config.json') as f:
    config = json.load(f)
  config.update(changes)
  with open(path / 'config.json', 'w') as f:
    json.dump(config, f)


def _edit_weights(path, edit):
  """Rewrites the first (or only) safetensors file through `edit(tensors)`."""
  file = sorted(f for f in os.listdir(path) if f.endswith('.safetensors'))[0]
  tensors = safetensors.numpy.load_file(path / file)
  edit(tensors)
  safetensors.numpy.save_file(tensors, path / file, metadata={'format': 'pt'})
  return str(path / file)


def test_bad_checkpoints(hf_dirs, tmp_path):
  tied = hf_dirs['tied'][1]
  path = _copy(tied, tmp_path)
  with pytest.raises(ValueError, match='num_classes=2'):
    models.load_pretrained(str(path), num_classes=2)

  _edit_weights(path, lambda t: t.update({'model.layers.0.self_attn.extra.weight':
                                          np.zeros((2, 2), np.float32)}))
  with pytest.raises(ValueError, match=f'{path}.*model.layers.0.self_attn.extra.weight'):
    models.load_pretrained(str(path))
  _edit_weights(path, lambda t: [t.pop('model.layers.0.self_attn.extra.weight'),
                                 t.pop('model.layers.1.mlp.up_proj.weight')])
  with pytest.raises(ValueError, match='lacks 1 parameters.*layers_1/mlp/up_proj/kernel'):
    models.load_pretrained(str(path))

  path = _copy(tied, tmp_path / 'b')
  _edit_config(path, rope_parameters={'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 1e4})
  with pytest.raises(ValueError, match='only plain RoPE'):
    models.load_pretrained(str(path))
  _edit_config(path, rope_parameters=None, rope_theta=1e4,
               rope_scaling={'type': 'dynamic', 'factor': 2.0})
  with pytest.raises(ValueError, match='rope_scaling='):
    models.load_pretrained(str(path))

  path = _copy(tied, tmp_path / 'c')
  _edit_weights(path, lambda t: t.update(
      {'lm_head.weight': np.ones_like(t['model.embed_tokens.weight'])}))
  with pytest.raises(ValueError, match='lm_head.weight differs'):
    models.load_pretrained(str(path))
  # Weights load without a tokenizer, as in every family; only text needs one.
  path = _copy(tied, tmp_path / 'no_tokenizer')
  os.remove(path / 'tokenizer.json')
  bare, full = models.load_pretrained(str(path)), models.load_pretrained(tied)
  assert bare.tokenizer is None and full.tokenizer is not None
  for (p, v), w in zip(traverse_util.flatten_dict(bare.params).items(),
                       traverse_util.flatten_dict(full.params).values()):
    np.testing.assert_array_equal(v, w, err_msg=str(p))
  with pytest.raises(ValueError, match='has no tokenizer'):
    sampling.generate_text(bare, ['hello'], max_new_tokens=2)

  path = _copy(tied, tmp_path / 'd')
  tokenization.byte_level_tokenizer(
      [f'<s{i}>' for i in range(10)]).save(str(path / 'tokenizer.json'))
  with pytest.raises(ValueError, match='266 ids but the model embeds only 260'):
    models.load_pretrained(str(path))
  with pytest.raises(ValueError, match="hidden_act='gelu'"):
    convert_llama.hf_architecture({**HF_COMMON, 'hidden_act': 'gelu'})


# ------------------------------------------------------------------ GGUF


def _permute(w, n_head):
  """llama.cpp convert_hf_to_gguf's Q/K row permutation (rotate-half -> interleaved)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


_GGUF_LAYER = {
    'input_layernorm': 'attn_norm', 'post_attention_layernorm': 'ffn_norm',
    'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k', 'self_attn.v_proj': 'attn_v',
    'self_attn.o_proj': 'attn_output', 'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up',
    'mlp.down_proj': 'ffn_down'}


def _write_gguf(path, model):
  """A float32 GGUF of a transformers Llama, written as llama.cpp's converter does."""
  import gguf
  c = model.config
  heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
  head_dim = c.head_dim
  w = gguf.GGUFWriter(str(path), 'llama')
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_block_count(c.num_hidden_layers)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(heads)
  w.add_head_count_kv(kv_heads)
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  w.add_rope_dimension_count(head_dim)
  w.add_rope_freq_base(c.rope_parameters['rope_theta'])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  # Byte-level BPE: the 256 byte symbols, <|endoftext|>, one merge, 2 spare ids.
  byte_symbols = tokenization._bytes_to_unicode()  # pylint: disable=protected-access
  tokens = [byte_symbols[b] for b in range(256)] + ['<|endoftext|>', 'Ġt', '<pad0>', '<pad1>']
  types = [1] * 256 + [3, 1, 3, 3]
  w.add_tokenizer_model('gpt2')
  w.add_tokenizer_pre('gpt-2')
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(['Ġ t'])
  w.add_bos_token_id(256)
  w.add_eos_token_id(256)
  w.add_add_bos_token(False)
  for name, tensor in model.state_dict().items():
    value = tensor.numpy().astype(np.float32)
    if name == 'lm_head.weight':
      if c.tie_word_embeddings:
        continue
      out = 'output.weight'
    elif name == 'model.embed_tokens.weight':
      out = 'token_embd.weight'
    elif name == 'model.norm.weight':
      out = 'output_norm.weight'
    else:
      _, _, i, rest = name.split('.', 3)
      module, leaf = rest.rsplit('.', 1)
      out = f'blk.{i}.{_GGUF_LAYER[module]}.{leaf}'
      if module == 'self_attn.q_proj':
        value = _permute(value, heads)
      elif module == 'self_attn.k_proj':
        value = _permute(value, kv_heads)
    w.add_tensor(out, np.ascontiguousarray(value))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def test_gguf_parity(tmp_path):
  """A GGUF written from a random transformers Llama gives transformers' logits."""
  from transformers import LlamaConfig, LlamaForCausalLM
  config = LlamaConfig(**{**HF_COMMON, 'vocab_size': 260}, tie_word_embeddings=False,
                       rope_parameters={'rope_type': 'default', 'rope_theta': 500.0})
  config._attn_implementation = 'eager'
  model = _randomise(LlamaForCausalLM(config), seed=5)
  path = _write_gguf(tmp_path / 'random.gguf', model)
  ours = models.load_pretrained(path)
  assert not ours.config['tie_word_embeddings'] and ours.config['rope_theta'] == 500.0
  assert ours.tokenizer.decode(ours.tokenizer.encode(' the cat').ids) == ' the cat'
  ids, mask = _inputs()
  _assert_close_on_real_tokens(_ours_logits(ours, ids, mask), _torch_logits(model, ids, mask),
                               mask)
  with pytest.raises(ValueError, match='num_classes'):
    models.load_pretrained(path, num_classes=5)


# ------------------------------------------------------------------ real SmolLM2


def test_smollm2_greedy_answers_rome():
  """The real SmolLM2-135M-Instruct (Q4_1 GGUF) completes a factual pattern."""
  model = models.load_pretrained('smollm2-135m')
  assert model.config['variant'] == 'smollm2-135m'
  assert _count(model.params) == 134_515_008
  assert model.tokenizer.get_vocab_size() == 49152
  text, = finetune_jax.generate_text(model, [PROMPT], max_new_tokens=2, pad_multiple=1)
  assert text.startswith(' Rome'), text

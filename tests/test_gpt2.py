"""GPT-2: parameter counts, HF parity, the KV cache, checkpoint layouts, bad input."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from finetune_jax import models
from hf_files import copy_hf_dir
from finetune_jax.models import attention
from finetune_jax.models import tokenization
from finetune_jax.models.gpt2 import convert as convert_gpt2
from finetune_jax.models import gpt2 as zoo_gpt2
from finetune_jax.models.gpt2 import model as gpt2

# A small HF config: 2 blocks, width 32, 4 heads, 300 tokens, context 64.
HF_SMALL = dict(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                bos_token_id=299, eos_token_id=299)


def _flat(params):
  return traverse_util.flatten_dict(dict(params), sep='/')


def randomise(torch_model, seed=0):
  """Weights of order 0.3 and non-trivial LayerNorms, so mapping mistakes show."""
  import torch
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in torch_model.named_parameters():
      if ('ln_' in name) and name.endswith('weight'):
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.3)
  return torch_model.eval()


def _inputs():
  """Two rows, the second left-padded by 3: ids, mask, positions (cumsum - 1)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 300, (2, 9)).astype(np.int32)
  mask = np.ones((2, 9), np.int32)
  mask[1, :3] = 0
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  return ids, mask, positions


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """A saved transformers GPT2LMHeadModel (tied) and its logits / hidden states."""
  import torch
  from transformers import GPT2Config, GPT2LMHeadModel
  model = randomise(GPT2LMHeadModel(GPT2Config(**HF_SMALL)))
  path = tmp_path_factory.mktemp('hf') / 'gpt2'
  model.save_pretrained(path)
  ids, mask, positions = _inputs()
  with torch.no_grad():
    args = dict(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long(),
                position_ids=torch.from_numpy(positions).long())
    logits = model(**args).logits.numpy()
    hidden = model.transformer(**args).last_hidden_state.numpy()
  return path, model, logits, hidden


@pytest.fixture(scope='module')
def ours(hf_dir):
  return models.load_pretrained(str(hf_dir[0]))


@pytest.fixture(scope='module')
def apply(ours):
  """One jitted apply for the module's tests, so equal shapes compile once."""
  return jax.jit(ours.module.apply)


def _max_diff_on_real_tokens(a, b, mask):
  real = mask.astype(bool)
  return float(np.abs(np.asarray(a)[real] - np.asarray(b)[real]).max())


# ------------------------------------------------------------------ architecture


def test_parameter_counts_and_names():
  build = zoo_gpt2.ARCHITECTURE.build
  counts = {v: sum(s.size for s in gpt2.param_shapes(build(gpt2.make_config(v))).values())
            for v in ('tiny', 'small', 'medium')}
  assert counts == {'tiny': 41_888, 'small': 124_439_808, 'medium': 354_823_168}
  config = gpt2.make_config('small')
  shapes = gpt2.param_shapes(zoo_gpt2.ARCHITECTURE.build(config))
  assert shapes['h_11/attn/c_attn/kernel'].shape == (768, 2304)
  assert shapes['h_0/mlp/c_fc/kernel'].shape == (768, 3072)
  assert shapes['wte/embedding'].shape == (50257, 768) and 'lm_head/kernel' not in shapes
  assert gpt2.block_names(config) == ('wte', 'wpe', *(f'h_{i}' for i in range(12)), 'ln_f')
  untied = gpt2.param_shapes(
      zoo_gpt2.ARCHITECTURE.build(gpt2.make_config('tiny', tie_word_embeddings=False)))
  assert untied['lm_head/kernel'].shape == (32, 257)
  for key in ('model', 'vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'num_kv_heads',
              'head_dim', 'max_position_embeddings', 'tie_word_embeddings', 'bos_token_id',
              'eos_token_id'):
    assert key in config
  assert (config['num_kv_heads'], config['head_dim']) == (12, 64)
  assert gpt2.make_config(**config) == config  # configs round-trip
  with pytest.raises(ValueError, match='Unknown GPT-2 variant'):
    gpt2.make_config('huge')
  with pytest.raises(ValueError, match='Unknown GPT-2 config keys'):
    gpt2.make_config('tiny', n_embd=64)


def test_tiny_alias_api():
  model = models.load_pretrained('gpt2-tiny')
  assert sum(v.size for v in _flat(model.params).values()) == 41_888
  assert model.head == 'lm_head' and set(model.params) == set(model.blocks)
  assert model.blocks == ('wte', 'wpe', 'h_0', 'h_1', 'ln_f')
  assert model.config['model'] == 'gpt2' and model.config['eos_token_id'] == 256
  assert model.tokenizer.get_vocab_size() == 257
  assert model.tokenizer.encode('hé').ids == [104, 195, 169]
  assert model.tokenizer.token_to_id('<|endoftext|>') == 256
  assert {'gpt2-tiny', 'gpt2-small-random'} <= set(models.list_aliases())
  json.loads(json.dumps(model.config))
  out = jax.jit(model.module.apply)({'params': model.params}, jnp.array([[1, 2, 3]]))
  assert set(out) == {'logits', 'last_hidden_state'}
  assert out['logits'].shape == (1, 3, 257) and out['logits'].dtype == jnp.float32
  assert out['last_hidden_state'].shape == (1, 3, 32)
  for bad in (3, 0):
    with pytest.raises(ValueError, match='causal LMs keep their LM head'):
      models.load_pretrained('gpt2-tiny', num_classes=bad)
  with pytest.raises(ValueError, match='exceed GPT-2.s context of 256 positions: truncate'):
    model.module.apply({'params': model.params}, jnp.zeros((1, 257), jnp.int32))


def test_host_init_matches_module_init_structure():
  module = zoo_gpt2.ARCHITECTURE.build(gpt2.make_config('tiny', num_layers=2))
  ours = _flat(gpt2.init_params(module, seed=0))
  shapes = _flat(jax.eval_shape(module.init, jax.random.PRNGKey(0),
                                jnp.zeros((1, 4), jnp.int32))['params'])
  assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {
      k: (v.shape, v.dtype) for k, v in shapes.items()}
  np.testing.assert_array_equal(ours['ln_f/scale'], 1.0)
  assert not np.any(ours['h_0/attn/c_attn/bias'])
  assert abs(float(jnp.std(ours['wte/embedding'])) - 0.02) < 0.002
  # HF scales the residual projections by 1 / sqrt(2 * num_layers).
  assert abs(float(jnp.std(ours['h_1/mlp/c_proj/kernel'])) - 0.01) < 0.002
  other = _flat(gpt2.init_params(module, seed=1))
  assert not np.array_equal(other['wte/embedding'], ours['wte/embedding'])


def test_train_mode_is_dropout_only():
  config = gpt2.make_config('tiny', num_layers=1)
  module = zoo_gpt2.ARCHITECTURE.build(config)
  params = gpt2.init_params(module, seed=0)
  ids = jnp.array([[5, 6, 7, 8]])
  apply = jax.jit(lambda train, seed: module.apply(
      {'params': params}, ids, train=train, rngs={'dropout': jax.random.PRNGKey(seed)}
  )['logits'], static_argnums=0)
  eval_out = apply(False, 0)
  np.testing.assert_array_equal(apply(False, 1), eval_out)
  assert not np.allclose(apply(True, 0), eval_out)
  assert not np.allclose(apply(True, 0), apply(True, 1))


# ------------------------------------------------------------------ HF parity


def test_hf_parity_with_padding(ours, apply, hf_dir):
  _, _, logits, hidden = hf_dir
  ids, mask, positions = _inputs()
  out = apply({'params': ours.params}, ids, mask, positions=positions)
  assert _max_diff_on_real_tokens(out['logits'], logits, mask) <= 1e-4
  assert _max_diff_on_real_tokens(out['last_hidden_state'], hidden, mask) <= 1e-4
  assert np.abs(logits).max() > 1  # the comparison is not between near-zeros
  config = ours.config
  assert (config['vocab_size'], config['num_layers'], config['max_position_embeddings'],
          config['eos_token_id'], config['variant'], config['tie_word_embeddings']) == (
              300, 2, 64, 299, None, True)
  assert ours.tokenizer is None  # the dir holds no tokenizer
  json.loads(json.dumps(config))


def test_hf_untied_head_and_gpt2_model_dirs(hf_dir, ours, tmp_path):
  import torch
  from transformers import GPT2Config, GPT2LMHeadModel
  _, hf_model, _, _ = hf_dir
  # A GPT2Model dir (no 'transformer.' prefix, no head) is the same tied model.
  hf_model.transformer.save_pretrained(tmp_path / 'base')
  base = models.load_pretrained(str(tmp_path / 'base'))
  for path, value in _flat(ours.params).items():
    np.testing.assert_array_equal(_flat(base.params)[path], value, err_msg=path)
  # Untied: a separate lm_head.
  untied = randomise(GPT2LMHeadModel(GPT2Config(**HF_SMALL, tie_word_embeddings=False)), 1)
  untied.save_pretrained(tmp_path / 'untied')
  ids, mask, positions = _inputs()
  with torch.no_grad():
    expected = untied(input_ids=torch.from_numpy(ids).long(),
                      attention_mask=torch.from_numpy(mask).long(),
                      position_ids=torch.from_numpy(positions).long()).logits.numpy()
  model = models.load_pretrained(str(tmp_path / 'untied'))
  assert model.params['lm_head']['kernel'].shape == (32, 300)
  assert model.blocks[-1] == 'ln_f' and 'lm_head' not in model.blocks
  out = jax.jit(model.module.apply)({'params': model.params}, ids, mask, positions=positions)
  assert _max_diff_on_real_tokens(out['logits'], expected, mask) <= 1e-4
  # Our params -> HF names -> ours is the identity.
  back = convert_gpt2.hf_to_params(convert_gpt2.params_to_hf(model.params),
                                   tie_word_embeddings=False)
  assert set(back) == set(_flat(model.params))
  for path, value in _flat(model.params).items():
    np.testing.assert_array_equal(back[path], value, err_msg=path)


def test_kv_cache_matches_the_full_pass(ours, apply):
  """Prefill of a prompt, then one token at a time, equals one pass without a cache."""
  ids, padded_mask, padded_positions = _inputs()
  arange = np.broadcast_to(np.arange(9, dtype=np.int32), (2, 9))
  prompt = 6
  for mask, positions in ((padded_mask, padded_positions), (np.ones_like(padded_mask), None)):
    explicit = arange if positions is None else positions
    full = apply({'params': ours.params}, ids, mask, positions=explicit)['logits']
    cache_mask = np.zeros((2, 12), np.int32)
    cache_mask[:, :9] = mask
    out = apply({'params': ours.params}, ids[:, :prompt], cache_mask,
                positions=explicit[:, :prompt], cache=attention.init_cache(ours.config, 2, 12))
    logits = [out['logits']]
    for t in range(prompt, 9):  # without padding, positions default to index + arange(T)
      out = apply({'params': ours.params}, ids[:, t:t + 1], cache_mask,
                  positions=None if positions is None else positions[:, t:t + 1],
                  cache=out['cache'])
      logits.append(out['logits'])
    assert int(out['cache']['index']) == 9
    assert _max_diff_on_real_tokens(np.concatenate(logits, 1), full, mask) <= 1e-4
  with pytest.raises(ValueError, match=r'expected \(2, 12\) \(one per every cache slot\)'):
    ours.module.apply({'params': ours.params}, ids, padded_mask,
                      cache=attention.init_cache(ours.config, 2, 12))


# ------------------------------------------------------------------ checkpoint layouts


def test_sharded_safetensors_and_vocab_merges_tokenizer(hf_dir, ours, tmp_path):
  _, hf_model, _, _ = hf_dir
  hf_model.save_pretrained(tmp_path / 'sharded', max_shard_size='30KB')
  shards = sorted(p.name for p in (tmp_path / 'sharded').iterdir())
  assert 'model.safetensors.index.json' in shards and len(shards) > 3
  # GPT-2's tokenizer as vocab.json + merges.txt (here: bytes, no merges).
  vocab = tokenization.byte_level_tokenizer().get_vocab()
  (tmp_path / 'sharded' / 'vocab.json').write_text(json.dumps(vocab))
  (tmp_path / 'sharded' / 'merges.txt').write_text('#version: 0.2\n')
  model = models.load_pretrained(str(tmp_path / 'sharded'))
  for path, value in _flat(ours.params).items():
    np.testing.assert_array_equal(_flat(model.params)[path], value, err_msg=path)
  assert model.tokenizer.encode('hi!').ids == [104, 105, 33]
  assert model.tokenizer.decode([104, 105, 256]) == 'hi'  # <|endoftext|> is special


# ------------------------------------------------------------------ bad input


def test_bad_checkpoints_fail_loudly(hf_dir, ours, tmp_path):
  src = hf_dir[0]
  with pytest.raises(ValueError, match='causal LMs keep their LM head'):
    models.load_pretrained(str(src), num_classes=2)
  # Old checkpoints' causal-mask buffers are skipped; other extras are errors.
  buffers = copy_hf_dir(src, tmp_path / 'buffers', edit=lambda t: {
      **t, 'transformer.h.0.attn.bias': np.tril(np.ones((1, 1, 64, 64), np.float32)),
      'transformer.h.1.attn.masked_bias': np.array(-1e4, np.float32)})
  np.testing.assert_array_equal(models.load_pretrained(buffers).params['wte']['embedding'],
                                ours.params['wte']['embedding'])
  extra = copy_hf_dir(src, tmp_path / 'extra', edit=lambda t: {
      **t, 'transformer.h.0.attn.q_attn.weight': np.zeros((32, 32), np.float32)})
  with pytest.raises(ValueError, match=r"1 tensors have no GPT-2 parameter: \['transformer.h.0.attn.q_attn.weight'\]"):
    models.load_pretrained(extra)
  missing = copy_hf_dir(src, tmp_path / 'missing', edit=lambda t: {
      k: v for k, v in t.items() if 'h.1.mlp.c_fc' not in k})
  with pytest.raises(ValueError, match=r"lacks 2 parameters .*'h_1/mlp/c_fc/"):
    models.load_pretrained(missing)
  head = copy_hf_dir(src, tmp_path / 'head', edit=lambda t: {
      **t, 'lm_head.weight': np.ones((300, 32), np.float32)})
  with pytest.raises(ValueError, match='"tie_word_embeddings": false'):
    models.load_pretrained(head)
  with pytest.raises(ValueError, match='add_cross_attention'):
    models.load_pretrained(copy_hf_dir(src, tmp_path / 'cross', config={'add_cross_attention': True}))
  with pytest.raises(ValueError, match='activation=.swiglu. is not supported'):
    models.load_pretrained(copy_hf_dir(src, tmp_path / 'act', config={'activation_function': 'swiglu'}))
  # A tokenizer with more ids (306) than the model embeds (300).
  big = copy_hf_dir(src, tmp_path / 'big_tokenizer')
  tokenization.byte_level_tokenizer([f'<extra_{i}>' for i in range(50)]).save(
      f'{big}/tokenizer.json')
  with pytest.raises(ValueError, match='has 306 ids but the model embeds only 300'):
    models.load_pretrained(big)

"""Prompt and prefix tuning: what the model sees, training invariants, counts, HF PEFT parity."""
import jax.numpy as jnp
import jax
import numpy as np
import pytest

from finetune_jax import base_config
from finetune_jax import peft
from finetune_jax import sampling
from finetune_jax import tasks
from finetune_jax.peft import paths
from finetune_jax.peft import prefix_tuning
from finetune_jax.peft import prompt_tuning
from finetune_jax.peft import virtual_tokens
from test_export import _make_bert, _make_gpt2, _make_llama
from test_lora import _train, assert_only_trainable_moved, text_batch, zoo  # noqa: F401

P = 3
LANGUAGE = ('bert-tiny', 'gpt2-tiny', 'llama-tiny')
DECODERS = ('gpt2-tiny', 'llama-tiny')
METHODS = {  # (method, options)
    'prompt': ('prompt_tuning', {}),
    'prefix': ('prefix_tuning', {}),
    'prefix-mlp': ('prefix_tuning', {'projection_size': 16}),
}


def peft_config(method, **options):
  c = base_config.get_config().peft
  c.method = method
  c[method].update({'num_virtual_tokens': P, **options})
  return c


def adapt(model, key):
  method, options = METHODS[key]
  return peft.adapt(model, peft_config(method, **options))


def padded_ids():
  ids = np.array([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]], np.int32)
  return ids, (ids > 0).astype(np.int32)


def with_real_prefix(ids, mask, prefix_ids):
  """The input with `prefix_ids` as real tokens in front."""
  batch = ids.shape[0]
  return (np.concatenate([np.broadcast_to(prefix_ids, (batch, P)), ids], 1).astype(np.int32),
          np.concatenate([np.ones((batch, P), np.int32), mask], 1))


def perturb(params, seed=1):
  """Trained-looking prompts and prefixes, so that they show in the outputs."""
  rng = np.random.default_rng(seed)
  flat = paths.flatten(params)
  for p, v in flat.items():
    if p.startswith((prompt_tuning.KEY, prefix_tuning.KEY + '/')):
      flat[p] = v + jnp.asarray(0.5 * rng.standard_normal(v.shape), v.dtype)
  return paths.unflatten(flat)


# ------------------------------------------------------------------ what the model sees


@pytest.mark.parametrize('alias', LANGUAGE)
def test_vocab_prompt_is_those_tokens_prepended(zoo, alias):
  """A prompt of sampled token embeddings = the same tokens as text, mask and positions included."""
  model = zoo[alias]
  adapted = adapt(model, 'prompt')
  ids, mask = padded_ids()
  ours = adapted.module.apply({'params': adapted.params}, ids, mask)
  full = model.module.apply({'params': model.params},
                            *with_real_prefix(ids, mask, virtual_tokens.sample_token_ids(model, P, 0)))
  assert ours['last_hidden_state'].shape == (2, 6, 32)  # per-token outputs: the input's length
  np.testing.assert_array_equal(ours['last_hidden_state'], full['last_hidden_state'][:, P:])
  if alias == 'bert-tiny':  # mean pooling over the prompt and the unpadded text
    np.testing.assert_array_equal(ours['features'], full['features'])
  else:
    np.testing.assert_array_equal(ours['logits'], full['logits'][:, P:])


@pytest.mark.parametrize('alias', DECODERS)
def test_vocab_prefix_is_those_tokens_prepended(zoo, alias):
  """A decoder's prefix init is the keys and values of P real tokens: causal
  attention makes that exactly the model reading them first."""
  model = zoo[alias]
  adapted = adapt(model, 'prefix')
  ids, mask = padded_ids()
  ours = adapted.module.apply({'params': adapted.params}, ids, mask)
  full = model.module.apply({'params': model.params},
                            *with_real_prefix(ids, mask, virtual_tokens.sample_token_ids(model, P, 0)))
  np.testing.assert_allclose(ours['logits'], full['logits'][:, P:], rtol=1e-5, atol=1e-5)


def test_prefix_mlp_matches_its_unrolled_prefixes(zoo):
  """The MLP's output, laid out (P, layer, k|v, head, dim), is the prefix the layers see."""
  model = zoo['llama-tiny']
  mlp = adapt(model, 'prefix-mlp')
  params = perturb(mlp.params)
  keys, values = mlp.module.prefixes(params[prefix_tuning.KEY])
  layers, kv_heads, head_dim = virtual_tokens.cache_spec(model.config)
  assert keys.shape == values.shape == (layers, P, kv_heads, head_dim)
  plain = adapt(model, 'prefix')
  unrolled = {**plain.params, prefix_tuning.KEY: {'keys': keys, 'values': values}}
  ids, mask = padded_ids()
  np.testing.assert_allclose(
      mlp.module.apply({'params': params}, ids, mask)['logits'],
      plain.module.apply({'params': unrolled}, ids, mask)['logits'], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('key', ['prompt', 'prefix'])
@pytest.mark.parametrize('alias', DECODERS)
def test_cached_generation_sees_what_training_saw(zoo, alias, key):
  """init_cache + calls with a cache give the uncached logits; greedy generate follows them."""
  model = zoo[alias]
  adapted = adapt(model, key)
  params = perturb(adapted.params)
  ids = np.array([[5, 6, 7, 8]], np.int32)
  apply = jax.jit(adapted.module.apply)  # one program per shape, not one per operation
  uncached = apply({'params': params}, ids)['logits']
  cache = adapted.module.init_cache(params, 1, 8)
  mask = np.zeros((1, 8), np.int32)
  mask[:, :4] = 1
  cached = apply({'params': params}, ids, mask, cache=cache)['logits']
  np.testing.assert_allclose(cached, uncached, rtol=1e-5, atol=1e-5)
  tokens = sampling.generate(adapted.module, params, model.config, ids, max_new_tokens=3,
                             eos_token_id=-1)
  seq = ids
  for _ in range(3):  # the same tokens one uncached forward pass at a time
    step = apply({'params': params}, seq)['logits'][:, -1].argmax(-1)
    seq = np.concatenate([seq, np.asarray(step, np.int32)[:, None]], 1)
  np.testing.assert_array_equal(np.asarray(tokens), seq[:, 4:])


def test_text_and_random_inits(zoo):
  model = zoo['gpt2-tiny']
  table = np.asarray(model.params['wte']['embedding'])
  text = peft.adapt(model, peft_config('prompt_tuning', init='text', init_text='ab'))
  ids = np.resize(model.tokenizer.encode('ab').ids, P)  # 'a', 'b', then 'a' again
  np.testing.assert_array_equal(text.params[prompt_tuning.KEY], table[ids])
  random = peft.adapt(model, peft_config('prompt_tuning', init='random'))
  assert random.params[prompt_tuning.KEY].shape == (P, 32)
  assert 0.5 < np.std(random.params[prompt_tuning.KEY]) / table.std() < 2
  prefix = peft.adapt(model, peft_config('prefix_tuning', init='random'))
  assert prefix.params[prefix_tuning.KEY]['keys'].shape == (2, P, 4, 8)


# ------------------------------------------------------------------ training


@pytest.fixture(scope='module')
def hf_zoo(tmp_path_factory):
  out = {}
  for family, make in (('bert', _make_bert), ('gpt2', _make_gpt2), ('llama', _make_llama)):
    hf, ours = make(tmp_path_factory.mktemp('hf') / family)
    out[family] = (hf, ours)
  return out



TRAIN_CASES = {
    # (alias, method): (task, learning rate)
    ('bert-tiny', 'prompt'): (lambda: tasks.TextClassification(2), 3e-2),
    # A zoo decoder's N(0, 0.02) weights barely react to a prompt; this Llama's
    # are N(0, 0.2), like a trained model's.
    ('llama', 'prompt'): (tasks.CausalLM, 0.1),
    ('llama-tiny', 'prefix'): (tasks.CausalLM, 0.1),
    ('bert-tiny', 'prefix-mlp'): (lambda: tasks.TextClassification(2), 3e-2),
}


@pytest.mark.parametrize('case', list(TRAIN_CASES), ids='-'.join)
def test_training_moves_only_the_virtual_tokens_and_head(zoo, hf_zoo, case):
  alias, key = case
  task, lr = TRAIN_CASES[case]
  model = zoo[alias] if alias in zoo else hf_zoo[alias][1]
  adapted = adapt(model, key)
  batch = text_batch(model, labels=alias == 'bert-tiny')
  state, frozen, losses = _train(model, adapted, task(), batch, 6, lr=lr)
  assert losses[-1] < losses[0] - 0.05, losses  # the same small real batch each step
  before = paths.flatten(adapted.params)
  after = paths.flatten(paths.join(state['trainable'], frozen))
  head = {p for p in before if p.startswith('head/')} if alias == 'bert-tiny' else set()
  own = {p for p in before if p.startswith((prompt_tuning.KEY, prefix_tuning.KEY + '/'))}
  assert own and adapted.trainable == own | head
  assert_only_trainable_moved(adapted, state, before, after)


# ------------------------------------------------------------------ counts


@pytest.mark.parametrize('alias', LANGUAGE)
def test_trainable_counts(zoo, alias):
  model = zoo[alias]
  layers, kv_heads, head_dim = virtual_tokens.cache_spec(model.config)
  d, kv = model.config['hidden_size'], kv_heads * head_dim
  head = paths.count(model.params['head']) if alias == 'bert-tiny' else 0
  expected = {
      'prompt': P * d,
      'prefix': layers * P * 2 * kv,
      'prefix-mlp': P * d + (d * 16 + 16) + (16 * layers * 2 * kv + layers * 2 * kv),
  }
  for key, count in expected.items():
    adapted = adapt(model, key)
    trainable = paths.split(adapted.params, adapted.trainable)[0]
    assert paths.count(trainable) - head == count, key
    assert paths.count(adapted.params) - paths.count(model.params) == count, key


# ------------------------------------------------------------------ bad input


def test_models_without_token_embeddings_are_refused(zoo):
  for method in ('prompt_tuning', 'prefix_tuning'):
    for alias in ('resnet-tiny', 'vit-tiny'):
      with pytest.raises(ValueError, match=f'peft.method={method} does not apply to this '
                         'model.*token embeddings.*Choose another peft.method'):
        peft.adapt(zoo[alias], peft_config(method))


def test_bad_options(zoo):
  model = zoo['gpt2-tiny']
  cases = [
      ('prompt_tuning', {'num_virtual_tokens': 0}, 'num_virtual_tokens=0 must be a positive'),
      ('prompt_tuning', {'init': 'zeros'}, r"init='zeros' must be one of \('vocab'"),
      ('prompt_tuning', {'init': 'text'}, "init='text' and a non-empty"),
      ('prompt_tuning', {'init_text': 'hello'}, "init='text' and a non-empty"),
      ('prefix_tuning', {'projection_size': -1}, 'projection_size=-1 must be 0'),
      ('prefix_tuning', {'init': 'text'}, r"init='text' must be one of \('vocab', 'random'\)"),
  ]
  for method, options, message in cases:
    with pytest.raises(ValueError, match=message):
      peft.adapt(model, peft_config(method, **options))


def test_context_is_shared_with_the_virtual_tokens(zoo):
  """Prompts that fit alone but not after P virtual positions are refused up front."""
  model = zoo['gpt2-tiny']  # 256 positions
  adapted = adapt(model, 'prompt')
  ids = np.ones((1, 250), np.int32)
  sampling.generate(model.module, model.params, model.config, ids, max_new_tokens=4)
  with pytest.raises(ValueError, match=r'context of 256 positions \(3 taken by prompt'):
    sampling.generate(adapted.module, adapted.params, model.config, ids, max_new_tokens=4)


# ------------------------------------------------------------------ HF PEFT parity


def _hf_logits(hf_peft, ids, mask):
  import torch
  with torch.no_grad():
    out = hf_peft(input_ids=torch.tensor(ids, dtype=torch.long),
                  attention_mask=torch.tensor(mask, dtype=torch.long))
  return out.logits.numpy()


def _ids(family):
  rng = np.random.default_rng(0)
  ids = rng.integers(5, {'bert': 99, 'gpt2': 300, 'llama': 260}[family], (2, 7)).astype(np.int32)
  mask = np.ones_like(ids)
  if family == 'bert':
    mask[1, 5:] = 0  # the encoder masks padding; decoders' rows are unpadded (HF pads right)
  return ids, mask


@pytest.mark.parametrize('family', ['bert', 'gpt2', 'llama'])
def test_prompt_tuning_matches_hf_peft(hf_zoo, family):
  import copy
  import torch
  from peft import PromptTuningConfig, get_peft_model
  hf, ours = hf_zoo[family]
  adapted = peft.adapt(ours, peft_config('prompt_tuning'))
  params = perturb(adapted.params)
  task = 'SEQ_CLS' if family == 'bert' else 'CAUSAL_LM'
  hf_peft = get_peft_model(copy.deepcopy(hf), PromptTuningConfig(
      task_type=task, num_virtual_tokens=P)).eval()
  with torch.no_grad():
    hf_peft.prompt_encoder['default'].embedding.weight.copy_(
        torch.tensor(np.asarray(params[prompt_tuning.KEY])))
  ids, mask = _ids(family)
  theirs = _hf_logits(hf_peft, ids, mask)
  if family != 'bert':
    theirs = theirs[:, P:]  # HF returns the virtual positions' logits too
  mine = np.asarray(adapted.module.apply({'params': params}, ids, mask)['logits'])
  np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('family', ['gpt2', 'llama'])
def test_prefix_tuning_matches_hf_peft(hf_zoo, family):
  """HF PEFT's prefix embedding (P, layers * 2 * kv width) holds the same numbers as ours.

  (transformers 5's BERT takes no past_key_values, so HF has no BERT reference.)
  """
  import copy
  import torch
  from peft import PrefixTuningConfig, get_peft_model
  hf, ours = hf_zoo[family]
  adapted = peft.adapt(ours, peft_config('prefix_tuning'))
  params = perturb(adapted.params)
  own = params[prefix_tuning.KEY]
  hf_peft = get_peft_model(copy.deepcopy(hf), PrefixTuningConfig(
      task_type='CAUSAL_LM', num_virtual_tokens=P)).eval()
  with torch.no_grad():
    hf_peft.prompt_encoder['default'].embedding.weight.copy_(
        torch.tensor(prefix_tuning.to_rows(own['keys'], own['values'])))
  ids, mask = _ids(family)
  mine = np.asarray(adapted.module.apply({'params': params}, ids, mask)['logits'])
  np.testing.assert_allclose(mine, _hf_logits(hf_peft, ids, mask), rtol=1e-4, atol=1e-4)

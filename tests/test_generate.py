"""generate(): greedy parity with HF and with full re-runs, sampling filters, EOS, padding, jit."""
import jax
import numpy as np
import pytest

from finetune_jax import generate
from finetune_jax import generate_text
from finetune_jax import models
from finetune_jax import sampling

# 2 blocks, width 32, 300 tokens, context 32; EOS 299.
HF_SMALL = dict(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                bos_token_id=299, eos_token_id=299)
NEW = 10


def _randomise(torch_model, seed=0):
  """Weights of order 0.3, so that the next token is rarely a near tie."""
  import torch
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in torch_model.named_parameters():
      if 'ln_' in name and name.endswith('weight'):
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.3)
  return torch_model.eval()


def _prompts():
  """Two prompts (6 and 3 tokens), the second left-padded."""
  ids = np.array([[5, 17, 42, 7, 99, 3], [0, 0, 0, 250, 11, 64]], np.int32)
  mask = np.array([[1] * 6, [0, 0, 0, 1, 1, 1]], np.int32)
  return ids, mask


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """(our model, HF model, our greedy tokens for _prompts())."""
  from transformers import GPT2Config, GPT2LMHeadModel
  hf = _randomise(GPT2LMHeadModel(GPT2Config(**HF_SMALL)))
  path = tmp_path_factory.mktemp('hf') / 'gpt2'
  hf.save_pretrained(path)
  model = models.load_pretrained(str(path))
  ids, mask = _prompts()
  greedy = np.asarray(generate(model.module, model.params, model.config, ids, mask,
                               max_new_tokens=NEW))
  return model, hf, greedy


def _run(model, ids, mask, **kw):
  return np.asarray(generate(model.module, model.params, model.config, ids, mask,
                             max_new_tokens=kw.pop('max_new_tokens', NEW), **kw))


def test_greedy_matches_hf_generate(setup):
  import torch
  _, hf, greedy = setup
  ids, mask = _prompts()
  with torch.no_grad():
    expected = hf.generate(torch.from_numpy(ids).long(),
                           attention_mask=torch.from_numpy(mask).long(),
                           max_new_tokens=NEW, do_sample=False, pad_token_id=299)
  expected = expected[:, ids.shape[1]:].numpy()
  assert greedy.shape == (2, NEW) and greedy.dtype == np.int32
  # HF stops once every row has ended; it pads the rest as we do.
  np.testing.assert_array_equal(greedy[:, :expected.shape[1]], expected)
  assert len(set(greedy.ravel().tolist())) > 3  # not a degenerate repetition


def test_greedy_equals_argmax_of_full_reruns(setup):
  """Teacher-forcing prompt + generated tokens through the model without a cache
  gives, at every step, the generated token as the argmax (causality makes one
  pass equal to re-running each prefix)."""
  model, _, greedy = setup
  ids, mask = _prompts()
  if (greedy == 299).any():
    pytest.skip('a row hit EOS; the comparison below assumes none')
  seq = np.concatenate([ids, greedy[:, :-1]], axis=1)
  seq_mask = np.concatenate([mask, np.ones((2, NEW - 1), np.int32)], axis=1)
  positions = np.maximum(np.cumsum(seq_mask, 1) - 1, 0)
  logits = jax.jit(model.module.apply)({'params': model.params}, seq, seq_mask,
                                       positions=positions)['logits']
  np.testing.assert_array_equal(np.argmax(logits[:, ids.shape[1] - 1:], -1), greedy)


def test_filters_that_keep_one_token_are_greedy_and_sampling_is_seeded(setup):
  model, _, greedy = setup
  ids, mask = _prompts()
  key = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(_run(model, ids, mask, temperature=1.0, top_k=1, rng=key), greedy)
  np.testing.assert_array_equal(_run(model, ids, mask, temperature=1.0, top_p=1e-6, rng=key),
                                greedy)
  first = _run(model, ids, mask, temperature=2.0, rng=key)
  np.testing.assert_array_equal(_run(model, ids, mask, temperature=2.0, rng=key), first)
  other = _run(model, ids, mask, temperature=2.0, rng=jax.random.PRNGKey(1))
  assert not np.array_equal(first, other)
  assert not np.array_equal(first, greedy)
  np.testing.assert_array_equal(_run(model, ids, mask, temperature=2.0, rng=1), other)  # int seed
  # top_k=3 only ever picks one of the three most likely tokens (checked on step 0).
  logits = jax.jit(model.module.apply)({'params': model.params}, ids, mask, positions=np.maximum(
      np.cumsum(mask, 1) - 1, 0))['logits'][:, -1]
  top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
  for seed in range(4):
    step0 = _run(model, ids, mask, temperature=5.0, top_k=3, rng=seed)[:, 0]
    assert all(step0[r] in top3[r] for r in range(2))


def test_left_padded_batch_equals_each_prompt_alone(setup):
  model, _, greedy = setup
  ids, mask = _prompts()
  np.testing.assert_array_equal(_run(model, ids[:1], None), greedy[:1])
  np.testing.assert_array_equal(_run(model, ids[1:, 3:], None), greedy[1:])


def test_eos_ends_a_row_with_padding(setup):
  model, _, greedy = setup
  ids, mask = _prompts()
  eos = int(greedy[0, 3])  # row 0 ends at step 3 (or earlier, if the token came before)
  out = _run(model, ids, mask, eos_token_id=eos, pad_token_id=7)
  for row in range(2):
    hits = np.flatnonzero(greedy[row] == eos)
    stop = hits[0] + 1 if hits.size else NEW
    np.testing.assert_array_equal(out[row, :stop], greedy[row, :stop])
    assert (out[row, stop:] == 7).all()
  assert (out[0, 4:] == 7).all()
  # pad defaults to the EOS id.
  out = _run(model, ids, mask, eos_token_id=[eos, 1000])
  assert (out[0, 4:] == eos).all()


def test_the_loop_compiles_once_per_shape(setup):
  model, _, _ = setup
  ids, mask = _prompts()
  _run(model, ids, mask, temperature=0.7, rng=0)
  before = sampling._TRACE_COUNT[0]
  for seed, (temperature, top_k, top_p) in enumerate([(0.7, 0, 1.0), (1.3, 5, 0.9),
                                                      (0.2, 1, 0.5)]):
    _run(model, ids, mask, temperature=temperature, top_k=top_k, top_p=top_p, rng=seed)
  _run(model, ids + 1, mask)  # greedy: compiled by the fixture
  assert sampling._TRACE_COUNT[0] == before


def test_generate_text_and_bad_input(setup):
  tiny = models.load_pretrained('gpt2-tiny')
  texts = generate_text(tiny, ['Hello', 'A longer prompt'], max_new_tokens=5)
  assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
  # The same as generate() on the prompts left-padded to 16 tokens, decoded up to EOS.
  ids = np.full((2, 16), 256, np.int32)
  mask = np.zeros((2, 16), np.int32)
  for row, text in enumerate(['Hello', 'A longer prompt']):
    encoded = list(text.encode())
    ids[row, 16 - len(encoded):], mask[row, 16 - len(encoded):] = encoded, 1
  tokens = np.asarray(generate(tiny.module, tiny.params, tiny.config, ids, mask,
                               max_new_tokens=5))
  for row in range(2):
    new = tokens[row].tolist()
    new = new[:new.index(256)] if 256 in new else new
    assert texts[row] == tiny.tokenizer.decode(new)
  model, _, _ = setup
  ids, mask = _prompts()
  with pytest.raises(ValueError, match='exceed the model.s context of 32 positions'):
    _run(model, ids, mask, max_new_tokens=27)
  with pytest.raises(ValueError, match=r'needs a seed: pass rng=jax.random.PRNGKey'):
    _run(model, ids, mask, temperature=1.0)
  with pytest.raises(ValueError, match='must be left-padded'):
    _run(model, ids, mask[:, ::-1])
  with pytest.raises(ValueError, match='has no tokens'):
    _run(model, ids, mask * np.array([[1], [0]]))
  with pytest.raises(ValueError, match=r'token ids must be in \[0, 300\)'):
    _run(model, ids + 295, mask)
  with pytest.raises(ValueError, match='top_p=0 must be in'):
    _run(model, ids, mask, temperature=1.0, top_p=0, rng=0)
  with pytest.raises(ValueError, match='no tokenizer'):
    generate_text(model, ['hi'], max_new_tokens=2)

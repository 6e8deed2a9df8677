"""GGUF files (llama.cpp): metadata, dequantised tensors and the tokenizer.

The file format only; which tensor is which layer of which model is the
architecture's (`models/llama/gguf.py`).

- Dimension order: GGUF lists dims innermost first; gguf's reader already
  reverses them, so a row of a weight is one output unit, as in nn.Linear.
- Quantisation: every supported type is dequantised to float32 with the
  reference numpy code of the `gguf` package (llama.cpp's own Python library).
  tests/test_gguf.py checks F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1
  against its own decoding of the block formats; the k-quants (Q2_K..Q6_K,
  what "Q4_K_M" files hold) go through the same package code, untested here.
- Quantised blocks kept: `quantized` reads Q8_0, Q4_0 and Q4_1 tensors with
  their blocks as they are (finetune_jax/quantized.py), which dequantise to the
  same floats: a quantized base (QLoRA) then holds the file's own 4-bit
  weights, with no float copy and no second rounding.
- Tokenizer: rebuilt as a `tokenizers.Tokenizer` from the vocabulary in the
  metadata ('gpt2' byte-level BPE with merges, or 'llama' SentencePiece-style
  BPE with scores and byte fallback). The pre-tokenizer regexes are llama.cpp's
  for the file's `tokenizer.ggml.pre` (see `_PRE_TOKENIZER_REGEXES`).
"""
import math
import os
import struct
import warnings

import gguf
import ml_dtypes
import numpy as np
import tokenizers
from gguf import GGMLQuantizationType as _Q
from tokenizers import decoders
from tokenizers import models as tokenizer_models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import processors

from finetune_jax import errors
from finetune_jax import quantized as quantized_lib

SUPPORTED_TYPES = (_Q.F32, _Q.F16, _Q.BF16, _Q.Q8_0, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1,
                   _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K)

# llama.cpp's pre-tokenizer (llama-vocab.cpp, llm_tokenizer_bpe): regexes
# applied in turn, each splitting every piece into its matches and the text
# between them, which is what a sequence of tokenizers' Split(...,
# 'isolated') does. Regexes as llama.cpp writes them, except llama3's, which
# is the original from Llama 3's tokenizer.json (llama.cpp spells (?i:...) out
# letter by letter for its own regex engine; the two are equivalent).
# Onig's \s and \p{..} classes may differ from llama.cpp's hand-written
# matchers on exotic Unicode whitespace; ordinary text splits identically.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZER_REGEXES = {
    # No `tokenizer.ggml.pre` (old files): llama.cpp's default.
    'default': (r'[\p{P}\$\+<=>\^~\|]+', _GPT2_REGEX, r'\p{N}+', '[0-9][0-9][0-9]'),
    # Digits one by one, then GPT-2's regex (SmolLM2's tokenizer.json says
    # the same: Digits(individual_digits) + ByteLevel(use_regex)).
    **dict.fromkeys(('smollm', 'starcoder', 'refact', 'command-r', 'codeshell', 'exaone',
                     'minerva-7b'), (r'\p{N}', _GPT2_REGEX)),
    **dict.fromkeys(('gpt-2', 'mpt', 'olmo', 'jais', 'trillion'), (_GPT2_REGEX,)),
    **dict.fromkeys(('llama3', 'llama-v3', 'llama-bpe', 'falcon3', 'pixtral', 'dbrx',
                     'smaug-bpe'), (_LLAMA3_REGEX,)),
    **dict.fromkeys(('qwen2', 'stablelm2'), (_QWEN2_REGEX,)),
}
# Pre types for which llama.cpp ignores merges when a whole word is a token
# and adds BOS unless the file says otherwise.
_LLAMA3_PRE = ('llama3', 'llama-v3', 'llama-bpe', 'falcon3', 'pixtral')

_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER, _TOKEN_UNUSED, _TOKEN_BYTE = range(1, 7)
_SPM_SPACE = '\u2581'  # SentencePiece's visible space


# ---------------------------------------------------------------- reading


class _Reader(gguf.GGUFReader):
  """GGUFReader over a plain ndarray view of its memory map.

  Slicing an np.memmap builds a memmap object per slice; the reader slices
  once per metadata string (~100k for a 49k vocabulary), which made opening
  SmolLM2 2-3x slower. The view keeps the map alive through its base.
  """

  @property
  def data(self):
    return self._data

  @data.setter
  def data(self, value):
    self._data = value.view(np.ndarray)


def open_gguf(path: str) -> gguf.GGUFReader:
  """A `gguf.GGUFReader`, with unreadable files as `errors.CheckpointError`."""
  try:
    reader = _Reader(path)
  except (ValueError, KeyError, IndexError, TypeError, OSError, UnicodeDecodeError,
          struct.error) as e:
    raise errors.CheckpointError(
        path, f'not a readable GGUF file ({type(e).__name__}: {e}). It may be '
        'truncated or corrupt, or not a GGUF file: download or export it again.') from None
  if reader.byte_order != 'I':
    raise errors.CheckpointError(
        path, 'a GGUF file for the other byte order (big-endian); convert it to '
        'little-endian with gguf-py\'s gguf_convert_endian.py.')
  splits = metadata(reader, 'split.count', path, default=1)
  if splits > 1:
    raise errors.CheckpointError(
        path, f'one of {splits} shards of a split GGUF model; merge them first: '
        '`llama-gguf-split --merge first-shard.gguf merged.gguf`.')
  return reader


def gguf_architecture(path: str) -> str | None:
  """`general.architecture` of a GGUF file, or None when it is not one.

  Reads only the start of the header (the key comes first in files written
  by llama.cpp and gguf-py), so registry `claims` checks stay cheap.
  """
  try:
    with open(path, 'rb') as f:
      if f.read(4) != b'GGUF':
        return None
      _version, _n_tensors, n_kv = struct.unpack('<IQQ', f.read(20))
      for _ in range(min(n_kv, 8)):
        key = _read_str(f)
        (vtype,) = struct.unpack('<I', f.read(4))
        if key == 'general.architecture' and vtype == 8:
          return _read_str(f)
        if not _skip_value(f, vtype):
          return None
  except (OSError, struct.error, UnicodeDecodeError, ValueError):
    return None
  return None


def _read_str(f) -> str:
  (n,) = struct.unpack('<Q', f.read(8))
  if n > 1 << 20:
    raise ValueError('implausible string length')
  return f.read(n).decode('utf-8')


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _skip_value(f, vtype: int) -> bool:
  if vtype in _SCALAR_SIZES:
    f.seek(_SCALAR_SIZES[vtype], os.SEEK_CUR)
  elif vtype == 8:
    _read_str(f)
  else:  # arrays never precede general.architecture in practice
    return False
  return True


REQUIRED = object()  # `metadata` default: the key must be there


def metadata(reader, key: str, path: str, default=REQUIRED):
  """The value of metadata `key`; without it, `default`, or an error naming the key."""
  field = reader.get_field(key)
  if field is None:
    if default is REQUIRED:
      raise errors.CheckpointError(path, 'a required GGUF metadata key is missing; re-export '
                                   'it with a current llama.cpp convert_hf_to_gguf.py.', key=key)
    return default
  value = field.contents()
  if field.types and field.types[0] == gguf.GGUFValueType.FLOAT32:
    value = float(str(np.float32(value)))  # 1e-05, not 9.999999747378752e-06
  return value


def dequantize(tensor, path: str = '<gguf>') -> np.ndarray:
  """A gguf ReaderTensor as a float32 array in numpy (row-major) order."""
  qtype = tensor.tensor_type
  if qtype not in SUPPORTED_TYPES:
    names = ', '.join(t.name for t in SUPPORTED_TYPES)
    raise errors.CheckpointError(
        path, key=tensor.name, why=f'GGUF type {qtype.name}, which this loader cannot '
        f'dequantise (supported: {names}). Re-export the model with a supported type, e.g. '
        '`llama-quantize --allow-requantize model.gguf model-Q8_0.gguf Q8_0`, or convert '
        'the HF checkpoint with `convert_hf_to_gguf.py --outtype f16` (or q8_0).')
  values = gguf.quants.dequantize(tensor.data, qtype)
  shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
  if values.shape != shape:
    raise errors.CheckpointError(path, f'dequantised to shape {values.shape}, expected {shape}; '
                                 'the file may be corrupt.', key=tensor.name)
  # F32 comes back as a view of the memory-mapped file: own it.
  return np.array(values, dtype=np.float32, copy=True) if qtype == _Q.F32 else values


# Block formats kept as they are: (storage dtype, offset of the quants in a block).
_KEPT_TYPES = {
    _Q.Q8_0: (np.int8, 2),  # d (f16), 32 int8: d * q
    _Q.Q4_0: (ml_dtypes.int4, 2),  # d, 16 bytes of nibbles: d * (q - 8)
    _Q.Q4_1: (ml_dtypes.uint4, 4),  # d, m (f16), nibbles: d * q + m
}


def quantized(tensor, path: str = '<gguf>') -> quantized_lib.BlockQuantized | None:
  """A Q8_0, Q4_0 or Q4_1 tensor with its blocks kept, in numpy (row-major) order: the
  quants, and float16 d (and Q4_1's m) per block of 32 along a row, as numpy arrays. It
  dequantizes to `dequantize(tensor)` exactly. None for any other type."""
  if tensor.tensor_type not in _KEPT_TYPES:
    return None
  storage, start = _KEPT_TYPES[tensor.tensor_type]
  block, size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
  shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
  raw = np.asarray(tensor.data).view(np.uint8).reshape(-1)
  if raw.size * block != math.prod(shape) * size or shape[-1] % block:
    raise errors.CheckpointError(path, f'{raw.size} bytes of {tensor.tensor_type.name} blocks '
                                 f'do not hold shape {shape}; the file may be corrupt.',
                                 key=tensor.name)
  blocks = raw.reshape(-1, size)
  per_block = shape[:-1] + (shape[-1] // block,)

  def half(column):  # an f16 field of every block, in per-block layout
    return blocks[:, column:column + 2].copy().view(np.float16).reshape(per_block)

  quants = blocks[:, start:]
  if storage is np.int8:
    q = quants.view(np.int8)
  else:  # low nibbles are a block's first 16 values, high nibbles its last 16
    q = np.concatenate([quants & 0x0F, quants >> 4], axis=1)
    if tensor.tensor_type == _Q.Q4_0:
      q = q.astype(np.int8) - 8
  return quantized_lib.BlockQuantized(
      qvalue=q.astype(storage).reshape(shape), scale=half(0),
      offset=half(2) if tensor.tensor_type == _Q.Q4_1 else None)


# ---------------------------------------------------------------- tokenizer


def tokenizer(reader, path: str) -> tokenizers.Tokenizer | None:
  """The file's vocabulary as a `tokenizers.Tokenizer`, with BOS/EOS as llama.cpp adds them.

  None for a file without one: its weights load, as an HF dir without
  tokenizer.json does, and only a task that needs text says so.
  """
  def get(key, default=REQUIRED):
    return metadata(reader, f'tokenizer.ggml.{key}', path, default)

  kind = get('model', None)
  if kind is None or reader.get_field('tokenizer.ggml.tokens') is None:
    return None
  tokens = reader.get_field('tokenizer.ggml.tokens').contents()
  types_field = reader.get_field('tokenizer.ggml.token_type')
  types = types_field.contents() if types_field is not None else [_TOKEN_NORMAL] * len(tokens)
  pre = get('pre', 'default')
  if kind == 'gpt2':
    merges = [tuple(m.split(' ', 1)) for m in get('merges')]
    tok = _bpe_tokenizer(tokens, merges, pre, path)
    add_bos_default = pre in _LLAMA3_PRE
  elif kind == 'llama':
    scores = get('scores', None)
    if scores is None:
      raise errors.CheckpointError(path, 'a SentencePiece ("llama") vocabulary without '
                                   'tokenizer.ggml.scores; re-export the GGUF file.')
    unk = get('unknown_token_id', None)
    tok = _spm_tokenizer(tokens, scores, types, unk, get('add_space_prefix', True))
    add_bos_default = True
  else:
    raise errors.CheckpointError(path, f'tokenizer.ggml.model {kind!r} is not supported; '
                                 'supported are "gpt2" (byte-level BPE) and "llama" '
                                 '(SentencePiece BPE).')

  # Control tokens (and the named specials) are matched whole before
  # pre-tokenization and skipped when decoding; user-defined ones are matched
  # whole but decoded as text (llama.cpp stores them as plain text).
  special_ids = {i for i, t in enumerate(types) if t in (_TOKEN_CONTROL, _TOKEN_UNKNOWN)}
  for key in ('bos', 'eos', 'unknown', 'padding', 'seperator', 'cls', 'mask'):
    i = get(f'{key}_token_id', None)
    if i is not None and 0 <= i < len(tokens):
      special_ids.add(i)
  tok.add_special_tokens([tokenizers.AddedToken(tokens[i], special=True, normalized=False)
                          for i in sorted(special_ids)])
  user = [i for i, t in enumerate(types) if t == _TOKEN_USER and i not in special_ids]
  if user:
    tok.add_tokens([tokenizers.AddedToken(tokens[i], special=False, normalized=False)
                    for i in user])

  # BOS/EOS the way llama.cpp adds them (the file's flags win over defaults).
  bos_id, eos_id = get('bos_token_id', None), get('eos_token_id', None)
  add_bos = get('add_bos_token', add_bos_default) and bos_id is not None
  add_eos = get('add_eos_token', False) and eos_id is not None
  if add_bos or add_eos:
    bos = f'{tokens[bos_id]} ' if add_bos else ''
    eos = f' {tokens[eos_id]}' if add_eos else ''
    specials = {tokens[i]: i for i, used in ((bos_id, add_bos), (eos_id, add_eos)) if used}
    tok.post_processor = processors.TemplateProcessing(
        single=f'{bos}$A{eos}', pair=f'{bos}$A{eos} {bos}$B:1{eos}',
        special_tokens=list(specials.items()))
  return tok


def _bpe_tokenizer(tokens, merges, pre: str, path: str) -> tokenizers.Tokenizer:
  """Byte-level BPE (GPT-2 style): tokens are byte-to-unicode mapped strings."""
  vocab = {}
  for i, t in enumerate(tokens):
    vocab.setdefault(t, i)
  if pre not in _PRE_TOKENIZER_REGEXES:
    warnings.warn(
        f'{path}: tokenizer.ggml.pre = {pre!r} is not one this reader knows; using GPT-2\'s '
        'pre-tokenizer regex. Token ids may differ from llama.cpp\'s on some text; prefer the '
        "model's HF dir (tokenizer.json) if exact ids matter.", stacklevel=3)
    regexes = (_GPT2_REGEX,)
  else:
    regexes = _PRE_TOKENIZER_REGEXES[pre]
  tok = tokenizers.Tokenizer(tokenizer_models.BPE(
      vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3_PRE))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Split(tokenizers.Regex(r), behavior='isolated') for r in regexes]
      + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  return tok


def _spm_tokenizer(tokens, scores, types, unk_id, add_space_prefix: bool) -> tokenizers.Tokenizer:
  """SentencePiece BPE (Llama 1/2, TinyLlama) as HF's LlamaTokenizerFast builds it.

  Merges come from the scores as transformers' SentencePieceExtractor derives
  them: every split of a piece into two pieces, ranked by the merged piece's
  score (highest first). Bytes missing from the vocabulary fall back to the
  <0xXX> tokens.
  """
  vocab = {}
  for i, t in enumerate(tokens):
    vocab.setdefault(t, i)
  mergeable = {t for t, ty in zip(tokens, types) if ty in (_TOKEN_NORMAL, _TOKEN_USER)}
  merges = []
  for i, piece in enumerate(tokens):
    if types[i] not in (_TOKEN_NORMAL, _TOKEN_USER):
      continue
    local = [(piece[:k], piece[k:]) for k in range(1, len(piece))
             if piece[:k] in mergeable and piece[k:] in mergeable]
    local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    merges += [(l, r, scores[i]) for l, r in local]
  merges.sort(key=lambda m: -m[2])  # stable: ties keep id order
  unk = tokens[unk_id] if unk_id is not None else None
  tok = tokenizers.Tokenizer(tokenizer_models.BPE(
      vocab=vocab, merges=[(l, r) for l, r, _ in merges], unk_token=unk, fuse_unk=True,
      byte_fallback=True))
  norm = [normalizers.Replace(' ', _SPM_SPACE)]
  if add_space_prefix:
    norm.insert(0, normalizers.Prepend(_SPM_SPACE))
  tok.normalizer = normalizers.Sequence(norm)
  dec = [decoders.Replace(_SPM_SPACE, ' '), decoders.ByteFallback(), decoders.Fuse()]
  if add_space_prefix:
    dec.append(decoders.Strip(' ', 1, 0))
  tok.decoder = decoders.Sequence(dec)
  return tok

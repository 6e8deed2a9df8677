"""Adapters and merged models in Hugging Face layouts, written and read back.

  save_peft(...)      adapter_config.json + adapter_model.safetensors (HF PEFT LoRA/DoRA/IA3,
                      prompt and prefix tuning)
  save_merged(...)    config.json + model.safetensors (transformers), updates folded in
  save_adapter(...)   adapter.json + adapter.safetensors: the trainable params, our paths
  load_adapter(adapted, model, dir)   either kind of adapter dir, onto an adapted model

HF PEFT names each LoRA tensor after the transformers *module* it adapts,
prefixed 'base_model.model.', in torch layouts:
  lora_A.weight          (r, in)  | (r, in, kh, kw)    ours lora_a (in, r) | (kh, kw, in, r)
  lora_B.weight          (out, r) | (out, r, 1, 1)     ours lora_b (r, out)
  lora_magnitude_vector  (out,)   | (1, out, 1, 1)     ours lora_magnitude (out,)
(Linear and GPT-2's Conv1D | Conv2d.) IA3's vector is '<module>.ia3_l': (out, 1),
or (1, in) for a feedforward module, (1, n, 1, 1) on a Conv2d; ours ia3_scale
(n,). GPT-2's c_attn vector covers q|k|v there (ours k|v: ones go before it).
A trained classifier head is a
`modules_to_save` module, stored as its plain weights. Module names come from
the converters' `params_to_hf`, so there is one name table per family. The
exception is ViT under transformers >= 5: its modules were renamed (q_proj,
mlp.fc1, ...) while its checkpoints kept the old names, and PEFT keys follow
the modules. Exports use the installed transformers' naming (v5 without one);
imports read both.

Prompt and prefix tuning (PEFT's prompt learning) adapt no module: their one
tensor is 'prompt_embeddings', with no prefix; a head is 'base_model.<name>'
(PEFT wraps the transformers model directly). Prompt tuning's is our prompt
(P, D). Prefix tuning's is (P, layers * 2 * kv_heads * head_dim), laid out
(P, layer, key|value, kv head, dim): what PEFT views as past_key_values.
PEFT saves that prefix, never its MLP (prefix_projection), so a prefix trained
through an MLP exports as the prefix the MLP makes, and imports as such.
"""
import collections
import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import re
from typing import Callable

import numpy as np
import safetensors.numpy

from finetune_jax.convert import bert as convert_bert
from finetune_jax.convert import gpt2 as convert_gpt2
from finetune_jax.convert import hf_dir
from finetune_jax.convert import llama as convert_llama
from finetune_jax.convert import vit as convert_vit
from finetune_jax.peft import ia3
from finetune_jax.peft import lora
from finetune_jax.peft import paths
from finetune_jax.peft import prefix_tuning
from finetune_jax.peft import prompt_tuning
from finetune_jax.peft import virtual_tokens

PEFT_CONFIG, PEFT_WEIGHTS = 'adapter_config.json', 'adapter_model.safetensors'
OUR_CONFIG, OUR_WEIGHTS = 'adapter.json', 'adapter.safetensors'
OUR_FORMAT = 'finetune_jax.adapter'
PEFT_PREFIX = 'base_model.model.'
FOLDING_METHODS = ('lora', 'dora', 'ia3')  # updates that fold into the weights
VIRTUAL_METHODS = ('prompt_tuning', 'prefix_tuning')  # positions before the input: no folding
PEFT_METHODS = FOLDING_METHODS + VIRTUAL_METHODS
VIRTUAL_TYPES = {'PROMPT_TUNING': 'prompt_tuning', 'PREFIX_TUNING': 'prefix_tuning'}
PROMPT_KEY = 'prompt_embeddings'  # prompt learning's one tensor in PEFT's file
PROMPT_HEAD_PREFIX = 'base_model.'  # its modules_to_save keys: no tuner model in between
# Methods whose params are the plain model: a merged export is the params as they are.
PLAIN_METHODS = ('full', 'linear_probe', 'bitfit', 'partial')
_TORCH_METADATA = {'format': 'pt'}  # what transformers and PEFT expect in the header


@dataclasses.dataclass(frozen=True)
class _Family:
  """How one model family maps onto transformers; pairs are (with head, without)."""
  to_hf: Callable  # (nested params, our config, prefix) -> {HF state-dict name: array}
  hf_config: Callable  # our config -> config.json
  prefix: tuple  # of the body's module names
  task_type: tuple  # PEFT's task_type
  fan_in_fan_out: bool = False  # GPT-2's Conv1D keeps weights (in, out)


_FAMILIES = {
    'bert': _Family(lambda p, c, prefix: convert_bert.params_to_hf(p, prefix=prefix),
                    convert_bert.hf_config, ('bert.', ''), ('SEQ_CLS', 'FEATURE_EXTRACTION')),
    'gpt2': _Family(lambda p, c, prefix: convert_gpt2.params_to_hf(p, prefix=prefix),
                    convert_gpt2.hf_config, ('transformer.',) * 2, ('CAUSAL_LM',) * 2,
                    fan_in_fan_out=True),
    'llama': _Family(lambda p, c, prefix: convert_llama.params_to_hf(p, c),
                     convert_llama.hf_config, ('model.',) * 2, ('CAUSAL_LM',) * 2),
    'vit': _Family(lambda p, c, prefix: convert_vit.params_to_hf(p, prefix=prefix),
                   convert_vit.hf_config, ('vit.', ''), (None, None)),
}

# transformers >= 5 ViT modules, from its checkpoint names (its conversion_mapping).
_VIT_V5_RENAMES = (
    (r'encoder\.layer\.(\d+)\.', r'layers.\1.'),
    (r'\.attention\.attention\.query$', '.attention.q_proj'),
    (r'\.attention\.attention\.key$', '.attention.k_proj'),
    (r'\.attention\.attention\.value$', '.attention.v_proj'),
    (r'\.attention\.output\.dense$', '.attention.o_proj'),
    (r'\.intermediate\.dense$', '.mlp.fc1'),
    (r'(layers\.\d+)\.output\.dense$', r'\1.mlp.fc2'),
)


def _transformers_major() -> int:
  """The installed transformers' major version; 5 (today's) when it is absent."""
  try:
    return int(importlib.metadata.version('transformers').split('.')[0])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return 5


def _family(model) -> _Family:
  name = model.config.get('model')
  if name not in _FAMILIES:
    raise ValueError(f'Model family {name!r} has no Hugging Face layout here; the HF '
                     f'formats cover {sorted(_FAMILIES)}. Use --format adapter (our '
                     'own layout) for this model.')
  return _FAMILIES[name]


def _has_head(model) -> bool:
  return bool(model.config.get('num_classes'))


def _prefix(model) -> str:
  return _family(model).prefix[0 if _has_head(model) else 1]


def _lora_hook(adapted):
  hook = getattr(adapted.module, 'hook', None)
  return hook if isinstance(hook, lora.Hook) else None


def _ia3_hook(adapted):
  hook = getattr(adapted.module, 'hook', None)
  return hook if isinstance(hook, ia3.Hook) else None


def _virtual(adapted):
  """The prompt- or prefix-tuning module, or None for other methods."""
  module = adapted.module
  return module if isinstance(module, virtual_tokens.VirtualTokens) else None


def _ia3_modules(flat: dict) -> list:
  """Our module paths that own an IA3 vector."""
  tail = '/' + ia3.SCALE
  return sorted(p[:-len(tail)] for p in flat if p.endswith(tail))


def _checkpoint_names(model, flat: dict, modules) -> dict:
  """{our module: transformers checkpoint module name}, from the family's converter."""
  fam, prefix = _family(model), _prefix(model)
  out = {}
  for m in modules:
    probe = {f'{m}/kernel': np.zeros((1,) * np.ndim(flat[f'{m}/kernel']), np.float32)}
    (name,) = fam.to_hf(paths.unflatten(probe), model.config, prefix)
    out[m] = name[:-len('.weight')]
  return out


def _vit_v5_name(name: str) -> str:
  for pattern, repl in _VIT_V5_RENAMES:
    name = re.sub(pattern, repl, name)
  return name


def _runtime_name(model, name: str) -> str:
  """The module's name inside the installed transformers' model (what PEFT keys use)."""
  if model.config.get('model') == 'vit' and _transformers_major() >= 5:
    return _vit_v5_name(name)
  return name


def module_names(model, flat: dict, modules) -> dict:
  """{our module path: the transformers module PEFT adapts}."""
  return {m: _runtime_name(model, n) for m, n in _checkpoint_names(model, flat, modules).items()}


def _extra_hf_modules(model) -> set:
  """Linear modules transformers builds that our params lack (randomly initialised there)."""
  config, prefix = model.config, _prefix(model)
  if config['model'] == 'bert' and not config.get('add_pooler', True):
    return {f'{prefix}pooler.dense'}
  if config['model'] == 'vit' and not _has_head(model) and not config.get('representation_size'):
    return {'pooler.dense'}
  return set()


def _target_modules(model, flat: dict, chosen: set):
  """PEFT's target_modules: short names ('query', 'value') when they select
  exactly `chosen`, else the full module names (exact in PEFT too)."""
  candidates = lora.candidate_modules(flat, model.head + '/' if _has_head(model) else None)
  everything = set(module_names(model, flat, candidates).values()) | _extra_hf_modules(model)
  leaves = sorted({n.rsplit('.', 1)[-1] for n in chosen})
  if {n for n in everything if n.rsplit('.', 1)[-1] in leaves} == chosen:
    return leaves
  return sorted(chosen)


def _head_tensors(model, flat: dict) -> dict:
  """The head's HF tensors ('classifier.weight', ...), or {} without a head."""
  if not _has_head(model):
    return {}
  head = {p: np.asarray(v) for p, v in flat.items() if p.startswith(model.head + '/')}
  return _family(model).to_hf(paths.unflatten(head), model.config, _prefix(model))


def _warn_head(model):
  config = model.config
  if config['model'] == 'bert' and _has_head(model) and config.get('pooling') != 'pooler':
    logging.warning(
        "This BERT's head reads pooling=%r features, but transformers' "
        'BertForSequenceClassification feeds its classifier the pooler output: its '
        'logits will differ from ours (hidden states match). Train with '
        "--config.text.pooling=pooler for identical logits.", config.get('pooling'))


def _host(params) -> dict:
  """Host numpy copies of a param tree."""
  return paths.unflatten({p: np.asarray(v) for p, v in paths.flatten(params).items()})


def _number(x: float):
  return int(x) if float(x).is_integer() else float(x)


def _write_safetensors(tensors: dict, path: str, metadata=None) -> None:
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                              path, metadata=metadata)


def _write_json(obj, path: str) -> None:
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)


def _unsupported(method: str, fmt: str, supported) -> ValueError:
  return ValueError(f'--format {fmt} is not supported yet for peft.method={method!r}; it '
                    f'covers {", ".join(supported)}. --format adapter saves any method.')


# ------------------------------------------------------------------ save


def save_peft(model, adapted, params, out_dir: str, *, method: str,
              base_model: str | None = None) -> None:
  """Writes the HF PEFT layout of a LoRA/DoRA/IA3/prompt/prefix run (params: adapted, trained)."""
  hook = _lora_hook(adapted)
  hook = _ia3_hook(adapted) if hook is None else hook
  virtual = _virtual(adapted)
  if method not in PEFT_METHODS or (hook is None and virtual is None):
    if method in PLAIN_METHODS:
      raise ValueError(f'peft.method={method!r} trains no adapter, so there is nothing for '
                       'the PEFT format to hold. Export it with --format merged.')
    raise _unsupported(method, 'peft', PEFT_METHODS)
  fam = _family(model)
  fam.hf_config(model.config)  # refuses a model transformers cannot express
  _warn_head(model)
  flat = paths.flatten(params)  # device arrays: only the adapter leaves are copied out
  head = _head_tensors(model, flat)
  common = {'task_type': fam.task_type[0 if _has_head(model) else 1],
            'base_model_name_or_path': base_model, 'revision': None,
            'modules_to_save': sorted({k.rsplit('.', 1)[0] for k in head}) or None,
            'inference_mode': True}
  if virtual is not None:
    tensors, config = _virtual_tensors(model, virtual, params)
    head_prefix = PROMPT_HEAD_PREFIX
  else:
    make = _ia3_tensors if isinstance(hook, ia3.Hook) else _lora_tensors
    tensors, config = make(model, hook, flat)
    config['fan_in_fan_out'] = fam.fan_in_fan_out
    head_prefix = PEFT_PREFIX
  tensors.update({head_prefix + k: v for k, v in head.items()})
  os.makedirs(out_dir, exist_ok=True)
  _write_json({**config, **common}, os.path.join(out_dir, PEFT_CONFIG))
  _write_safetensors(tensors, os.path.join(out_dir, PEFT_WEIGHTS), _TORCH_METADATA)


def _lora_tensors(model, hook, flat: dict) -> tuple[dict, dict]:
  """PEFT's LoRA/DoRA tensors and the config fields of their own."""
  modules = lora.adapted_modules(flat)
  names = module_names(model, flat, modules)
  tensors, ranks = {}, {}
  for m in modules:
    a, b = np.asarray(flat[f'{m}/{lora.A}']), np.asarray(flat[f'{m}/{lora.B}'])
    conv = a.ndim == 4
    key = PEFT_PREFIX + names[m]
    ranks[names[m]] = a.shape[-1]
    tensors[f'{key}.lora_A.weight'] = a.transpose(3, 2, 0, 1) if conv else a.T
    tensors[f'{key}.lora_B.weight'] = b.T[:, :, None, None] if conv else b.T
    if hook.dora:
      magnitude = np.asarray(flat[f'{m}/{lora.MAGNITUDE}'])
      tensors[f'{key}.lora_magnitude_vector'] = (
          magnitude.reshape(1, -1, 1, 1) if conv else magnitude)
  r = collections.Counter(ranks.values()).most_common(1)[0][0]
  return tensors, {
      'peft_type': 'LORA', 'r': r,
      'lora_alpha': _number(hook.alpha), 'lora_dropout': hook.dropout,
      'target_modules': _target_modules(model, flat, set(names.values())),
      'rank_pattern': {re.escape(n): k for n, k in ranks.items() if k != r},
      'alpha_pattern': {}, 'use_rslora': hook.rslora, 'use_dora': hook.dora,
      'bias': 'none', 'init_lora_weights': True}


def _ia3_tensors(model, hook, flat: dict) -> tuple[dict, dict]:
  """PEFT's IA3 vectors and config fields. Module lists are full names: PEFT
  matches feedforward_modules by bare suffix, so 'output.dense' would also
  catch BERT's attention.output.dense."""
  modules = _ia3_modules(flat)
  names = module_names(model, flat, modules)
  tensors = {}
  for m in modules:
    scale, kernel = np.asarray(flat[f'{m}/{ia3.SCALE}']), np.shape(flat[f'{m}/kernel'])
    if m in hook.fused_qkv and scale.shape[-1] != kernel[-1]:
      scale = np.asarray(ia3.full_scale(scale))  # HF scales q too: by 1
    shape = (1, -1, 1, 1) if len(kernel) == 4 else (1, -1) if m in hook.inputs else (-1, 1)
    tensors[f'{PEFT_PREFIX}{names[m]}.ia3_l'] = scale.reshape(shape)
  return tensors, {
      'peft_type': 'IA3', 'target_modules': sorted(names.values()),
      'feedforward_modules': sorted(names[m] for m in modules if m in hook.inputs),
      'exclude_modules': None, 'init_ia3_weights': True}


def _virtual_tensors(model, module, params) -> tuple[dict, dict]:
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
  return {PROMPT_KEY: prefix_rows(keys, values)}, {
      **fields, 'peft_type': 'PREFIX_TUNING', 'token_dim': width,
      'num_attention_heads': kv_heads, 'encoder_hidden_size': width,
      'prefix_projection': False, 'init_weights': None}


def prefix_rows(keys, values) -> np.ndarray:
  """(P, layers * 2 * kv_heads * head_dim) from keys and values (layers, P, kv_heads,
  head_dim): per virtual token, layer by layer, key then value (PEFT's layout)."""
  stacked = np.stack([np.asarray(keys), np.asarray(values)], axis=2)  # (L, P, 2, H, Dh)
  return stacked.swapaxes(0, 1).reshape(stacked.shape[1], -1)


def prefix_from_rows(rows, spec) -> tuple:
  """(keys, values), each (layers, P, kv_heads, head_dim): prefix_rows undone."""
  layers, kv_heads, head_dim = spec
  out = np.asarray(rows).reshape(len(rows), layers, 2, kv_heads, head_dim)
  return out[:, :, 0].swapaxes(0, 1), out[:, :, 1].swapaxes(0, 1)


def merged_params(adapted, params, *, method: str) -> dict:
  """Plain model params: LoRA/DoRA updates or IA3 vectors folded in, other plain
  methods as they are."""
  if _lora_hook(adapted) is not None:
    return lora.merge(adapted.module, params)
  if _ia3_hook(adapted) is not None:
    return ia3.merge(adapted.module, params)
  if method in PLAIN_METHODS:
    return params
  if method in VIRTUAL_METHODS or _virtual(adapted) is not None:
    raise ValueError(
        f'peft.method={method!r} learns positions ahead of the input, which no weight of the '
        'model can hold: there is no merged model to write. Export it with --format peft '
        '(HF PEFT, for peft.PeftModel.from_pretrained) or --format adapter.')
  raise _unsupported(method, 'merged', FOLDING_METHODS + PLAIN_METHODS)


def save_merged(model, adapted, params, out_dir: str, *, method: str) -> None:
  """Writes a transformers model dir (config.json, model.safetensors, tokenizer, ...)."""
  fam = _family(model)
  merged = merged_params(adapted, params, method=method)
  hf_config = fam.hf_config(model.config)  # refuses what transformers cannot express
  _warn_head(model)
  tensors = fam.to_hf(_host(merged), model.config, _prefix(model))
  os.makedirs(out_dir, exist_ok=True)
  _write_json(hf_config, os.path.join(out_dir, 'config.json'))
  _write_safetensors(tensors, os.path.join(out_dir, 'model.safetensors'), _TORCH_METADATA)
  if model.tokenizer is not None:
    model.tokenizer.save(os.path.join(out_dir, 'tokenizer.json'))
  if model.config['model'] == 'vit':
    _write_json(convert_vit.hf_preprocessor_config(model.config),
                os.path.join(out_dir, 'preprocessor_config.json'))


def save_adapter(model, adapted, params, out_dir: str, *, method: str,
                 base_model: str | None = None) -> None:
  """Writes the trainable params alone, under our param paths (any method)."""
  flat = paths.flatten(params)
  tensors = {p: np.asarray(flat[p]) for p in sorted(adapted.trainable)}
  hook = _lora_hook(adapted)
  meta = {'format': OUR_FORMAT, 'version': 1, 'method': method, 'pretrained': base_model,
          'model': model.config.get('model'), 'num_classes': model.config.get('num_classes'),
          'lora': None if hook is None else {
              'alpha': hook.alpha, 'rslora': hook.rslora, 'dora': hook.dora}}
  os.makedirs(out_dir, exist_ok=True)
  _write_json(meta, os.path.join(out_dir, OUR_CONFIG))
  _write_safetensors(tensors, os.path.join(out_dir, OUR_WEIGHTS))


# ------------------------------------------------------------------ load


def load_adapter(adapted, model, path: str):
  """`adapted` with its adapter (and head) params taken from the adapter dir `path`.

  Reads an HF PEFT dir (LoRA/DoRA/IA3, prompt or prefix tuning) or one from
  `--format adapter`. Anything about the adapter's base model or method that
  disagrees with this run is one ValueError naming both sides and the config
  change that fixes it.
  """
  path = os.fspath(path)
  if os.path.exists(os.path.join(path, PEFT_CONFIG)):
    return _load_peft(adapted, model, path)
  if os.path.exists(os.path.join(path, OUR_CONFIG)):
    return _load_ours(adapted, model, path)
  raise ValueError(
      f'peft.init_from={path!r} is not an adapter dir: it holds neither {PEFT_CONFIG} + '
      f'{PEFT_WEIGHTS} (HF PEFT save_pretrained) nor {OUR_CONFIG} + {OUR_WEIGHTS} '
      '(python -m finetune_jax.export --format adapter). Point it at one of those.')


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise hf_dir.CheckpointFileError(f'{path}: cannot read it as JSON ({e}).') from None


def _read_weights(path: str, name: str) -> dict:
  file = os.path.join(path, name)
  if not os.path.exists(file):
    others = [f for f in os.listdir(path) if f.startswith('adapter_model')]
    raise ValueError(f'{path} has no {name}{f" (it has {others})" if others else ""}; '
                     'only safetensors adapters are read: save it with '
                     'save_pretrained(dir, safe_serialization=True).')
  return hf_dir.read_safetensors(file)


def _mismatch(path: str, theirs: str, ours: str, fix: str) -> ValueError:
  return ValueError(f'adapter dir {path} was made for a base model whose {theirs}; this '
                    f"run's model {ours}. {fix}")


def _differs(path: str, theirs: str, ours: str, fix: str) -> ValueError:
  return ValueError(f'adapter dir {path} {theirs}; this run {ours}. {fix}')


def _fold(names) -> list:
  """Module names with layer numbers folded ('layer.*.attention'), for messages."""
  return sorted({re.sub(r'(?<=[._])\d+(?=[./]|$)', '*', n) for n in names})


def _inverse_names(model, flat: dict) -> dict:
  """{HF module name, in every naming we read: our module}, the head included."""
  fam = _family(model)
  modules = _model_modules(flat)
  checkpoint = _checkpoint_names(model, flat, modules)
  prefixes = {p for p in fam.prefix if p}
  out = {}
  for m, name in checkpoint.items():
    renamed = _vit_v5_name(name) if model.config['model'] == 'vit' else name
    for n in (name, renamed):  # adapters from either transformers generation
      core = next((n[len(p):] for p in prefixes if n.startswith(p)), n)
      for variant in (core, *(p + core for p in prefixes)):
        out.setdefault(variant, m)
  return out


def _model_modules(flat: dict) -> list:
  """The model's modules with a kernel; a prefix MLP's (a run's own) are not the model's."""
  return [m for m in lora.candidate_modules(flat) if not m.startswith(prefix_tuning.KEY + '/')]


def _targets_hint(wanted: set) -> str:
  leaves = sorted({m.rsplit('/', 1)[-1] for m in wanted})
  return '(' + ', '.join(repr(f'{n}$') for n in leaves) + (',)' if len(leaves) == 1 else ')')


def _load_peft(adapted, model, path):
  """The base model first (names, shapes), then method, targets, ranks, alpha, head."""
  cfg = _read_json(os.path.join(path, PEFT_CONFIG))
  if cfg.get('peft_type') == 'IA3':
    return _load_peft_ia3(adapted, model, path, cfg)
  if cfg.get('peft_type') in VIRTUAL_TYPES:
    return _load_peft_virtual(adapted, model, path, cfg)
  if cfg.get('peft_type') != 'LORA':
    raise ValueError(f'{path}: peft_type={cfg.get("peft_type")!r} adapters cannot be '
                     'imported yet; LORA (LoRA and DoRA), IA3, PROMPT_TUNING and '
                     'PREFIX_TUNING can.')
  flat = paths.flatten(adapted.params)
  loras, others = _split_peft_tensors(path, _read_weights(path, PEFT_WEIGHTS))
  new, ranks = _map_loras(path, cfg, model, flat, loras)
  _check_options(path, cfg, adapted)
  hook = _lora_hook(adapted)
  if hook.dora:
    missing = sorted(n for n, leaves in loras.items() if 'lora_magnitude_vector' not in leaves)
    if missing:
      raise ValueError(f'{path}: {missing[0]} has no lora_magnitude_vector, which DoRA needs.')
  _check_targets(path, ranks, lora.adapted_modules(flat))
  mine = {m: int(np.shape(flat[f'{m}/{lora.A}'])[-1]) for m in lora.adapted_modules(flat)}
  if mine != ranks:
    their = sorted(set(ranks.values()))
    fix = (f'Set --config.peft.lora.rank={their[0]}.' if len(their) == 1 else
           'Set peft.lora.rank and peft.lora.rank_overrides to these ranks.')
    raise _differs(path, f'has LoRA ranks {dict(sorted(ranks.items())[:4])}',
                   f'uses ranks {dict(sorted(mine.items())[:4])}', fix)
  _check_alpha(path, cfg, hook, list(loras))
  new.update(_head_from(path, model, flat, others))
  return _replaced(adapted, flat, new)


def _split_peft_tensors(path, tensors: dict) -> tuple[dict, dict]:
  """({HF module: {'lora_A'|'lora_B'|'lora_magnitude_vector': array}}, {other name: array})."""
  loras, others = collections.defaultdict(dict), {}
  for key, value in tensors.items():
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    m = re.match(r'^(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$',
                 name)
    if m:
      loras[m[1]][m[2].split('.')[0]] = np.asarray(value)
    elif '.lora_' in name:
      raise ValueError(f'{path}: {key} is a LoRA tensor of a kind this project does not '
                       'import (lora_A, lora_B and lora_magnitude_vector only).')
    else:
      others[name] = np.asarray(value)
  incomplete = sorted(n for n, leaves in loras.items()
                      if 'lora_A' not in leaves or 'lora_B' not in leaves)
  if incomplete:
    raise ValueError(f'{path}: {incomplete[0]} lacks lora_A or lora_B: the adapter file '
                     'is incomplete.')
  return dict(loras), others


def _map_loras(path, cfg, model, flat, loras) -> tuple[dict, dict]:
  """Our {param path: array} and {module: rank}; a module or shape that is not
  this base model's is a mismatch error."""
  family = model.config['model']
  inverse = _inverse_names(model, flat)
  fix = ('Load the adapter onto the base model it was trained on (--config.pretrained; '
         f'it names base_model_name_or_path={cfg.get("base_model_name_or_path")!r}).')
  unknown = sorted(n for n in loras if n not in inverse)
  if unknown:
    own = module_names(model, flat, _model_modules(flat)).values()
    raise _mismatch(path, f'adapted modules are {_fold(loras)}',
                    f'({family}) has no module {unknown[0]!r}; its modules are {_fold(own)}',
                    fix)
  new, ranks = {}, {}
  for name, leaves in loras.items():
    ours = inverse[name]
    kernel_shape = tuple(np.shape(flat[f'{ours}/kernel']))
    a_hf, b_hf = leaves['lora_A'], leaves['lora_B']
    a = a_hf.transpose(2, 3, 1, 0) if a_hf.ndim == 4 else a_hf.T
    b = b_hf.reshape(b_hf.shape[0], -1).T
    if (a.shape[:-1] != kernel_shape[:-1] or b.shape[-1] != kernel_shape[-1]
        or a.shape[-1] != b.shape[0]):
      raise _mismatch(path, f'{name} maps {a.shape[:-1]} -> {b.shape[-1]} features '
                      f'(lora_A {a_hf.shape}, lora_B {b_hf.shape})',
                      f'has {ours!r} with a {kernel_shape} kernel', fix)
    ranks[ours] = a.shape[-1]
    new[f'{ours}/{lora.A}'], new[f'{ours}/{lora.B}'] = a, b
    if 'lora_magnitude_vector' in leaves:
      new[f'{ours}/{lora.MAGNITUDE}'] = leaves['lora_magnitude_vector'].reshape(-1)
  return new, ranks


def _check_options(path, cfg, adapted) -> None:
  """The run's method and LoRA options must be the adapter's."""
  hook = _lora_hook(adapted)
  method = 'dora' if cfg.get('use_dora') else 'lora'
  if hook is None or hook.dora != bool(cfg.get('use_dora')):
    raise ValueError(f'{path} holds a {"DoRA" if method == "dora" else "LoRA"} adapter; set '
                     f'--config.peft.method={method} to load it with peft.init_from.')
  unsupported = [k for k, bad in (
      ('bias', cfg.get('bias', 'none') != 'none'), ('lora_bias', cfg.get('lora_bias')),
      ('layer_replication', cfg.get('layer_replication')),
      ('trainable_token_indices', cfg.get('trainable_token_indices'))) if bad]
  if unsupported:
    raise ValueError(f'{path} uses LoRA options this project does not implement: '
                     f'{", ".join(f"{k}={cfg.get(k)!r}" for k in unsupported)}.')
  rslora = bool(cfg.get('use_rslora'))
  if rslora != hook.rslora:
    raise ValueError(f'{path} has use_rslora={rslora}; set --config.peft.lora.rslora={rslora} '
                     'to match it.')


def _check_targets(path, theirs: dict, mine: list) -> None:
  missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
  if missing or extra:
    raise _differs(
        path, f'adapts {_fold(theirs)}',
        f'adapts {_fold(mine)} (peft.lora.targets)'
        + (f'; the adapter lacks {missing[:3]}' if missing else '')
        + (f'; this run leaves out {extra[:3]}' if extra else ''),
        f'Set --config.peft.lora.targets="{_targets_hint(set(theirs))}" (regexes over our '
        'module paths) to adapt the same modules.')


def _check_alpha(path, cfg, hook, names) -> None:
  """PEFT's lora_alpha (or an alpha_pattern entry) must be this run's alpha."""
  alpha = cfg.get('lora_alpha', 8)
  pattern = cfg.get('alpha_pattern') or {}
  alphas = set()
  for name in names:
    key = next((k for k in pattern if re.match(rf'(.*\.)?({k})$', name)), None)
    alphas.add(float(pattern[key] if key is not None else alpha))
  if len(alphas) > 1:
    raise ValueError(f'{path} scales its modules by different alphas ({sorted(alphas)}, '
                     'alpha_pattern); this project uses one peft.lora.alpha for all.')
  (theirs,) = alphas or {float(alpha)}
  if not math.isclose(theirs, hook.alpha, rel_tol=1e-6):
    raise ValueError(f'{path} has lora_alpha={_number(theirs)} but this run '
                     f'peft.lora.alpha={_number(hook.alpha)}; set '
                     f'--config.peft.lora.alpha={_number(theirs)} to match it.')


def _head_from(path, model, flat, others: dict) -> dict:
  """Our head params from the adapter's modules_to_save tensors ({} when it has none)."""
  if not others:
    if _has_head(model):
      logging.warning('%s saves no classifier head; the head starts from its init.', path)
    return {}
  head_names = {}  # HF name: our path
  if _has_head(model):
    for p in flat:
      if p.startswith(model.head + '/'):
        probe = paths.unflatten({p: np.zeros((1,) * np.ndim(flat[p]), np.float32)})
        (name,) = _family(model).to_hf(probe, model.config, _prefix(model))
        head_names[name] = p
  foreign = sorted(set(others) - set(head_names))
  if foreign:
    if not head_names and any(k.startswith('classifier.') for k in others):
      n = np.shape(others.get('classifier.weight', np.zeros((0, 0))))[0]
      raise ValueError(f'{path} saves a trained classifier ({n} classes) but this run '
                       f'builds no head; set --config.num_classes={n}.')
    raise ValueError(f'{path} saves modules_to_save tensors {foreign[:4]} that this '
                     f"{model.config['model']} model cannot take: only the classifier head "
                     f"({sorted(head_names) or 'none here'}) is imported.")
  out = {}
  for name, value in others.items():
    ours = head_names[name]
    value = np.asarray(value)
    value = value.T if ours.endswith('/kernel') else value
    if value.shape != tuple(np.shape(flat[ours])):
      classes = value.shape[-1]
      raise ValueError(f'{path} saves a classifier with {classes} classes but this run '
                       f'has {model.config["num_classes"]}; set '
                       f'--config.num_classes={classes}.')
    out[ours] = value
  return out


def _load_peft_ia3(adapted, model, path, cfg):
  """An HF PEFT IA3 dir: base model (names, shapes), then the scaled modules, head."""
  hook = _ia3_hook(adapted)
  if hook is None:
    raise ValueError(f'{path} holds an IA3 adapter; set --config.peft.method=ia3 to load '
                     'it with peft.init_from.')
  flat = paths.flatten(adapted.params)
  vectors, others = {}, {}
  for key, value in _read_weights(path, PEFT_WEIGHTS).items():
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    if name.endswith('.ia3_l'):
      vectors[name[:-len('.ia3_l')]] = np.asarray(value)
    elif '.ia3_' in name:
      raise ValueError(f'{path}: {key} is an IA3 tensor of a kind this project does not '
                       'import (ia3_l only).')
    else:
      others[name] = np.asarray(value)
  if not vectors:
    raise ValueError(f'{path}: its {PEFT_WEIGHTS} holds no ia3_l vector.')
  new, scaled_out, scaled_in = _map_ia3(path, cfg, model, flat, hook, vectors)
  mine = _ia3_modules(flat)
  mine_in = {m for m in mine if m in hook.inputs}
  mine_out = set(mine) - mine_in
  if (scaled_out, scaled_in) != (mine_out, mine_in):
    head = model.head + '/' if _has_head(model) else None
    candidates = paths.candidate_modules(flat, head)
    differ = sorted((scaled_out ^ mine_out) | (scaled_in ^ mine_in))
    raise _differs(
        path, f'scales the outputs of {_fold(scaled_out)} and the inputs of '
        f'{_fold(scaled_in)}', f'scales the outputs of {_fold(mine_out)} '
        f'(peft.ia3.targets) and the inputs of {_fold(mine_in)} (peft.ia3.feedforward), '
        f'unlike the adapter at {differ[:3]}',
        f'Set --config.peft.ia3.targets="{_regexes_for(scaled_out, candidates)}" and '
        f'--config.peft.ia3.feedforward="{_regexes_for(scaled_in, candidates)}" '
        '(regexes over our module paths) to scale the same modules.')
  new.update(_head_from(path, model, flat, others))
  return _replaced(adapted, flat, new)


def _replaced(adapted, flat: dict, new: dict):
  """`adapted` with the leaves `new` names replaced, each in its old dtype."""
  out = dict(flat)
  for p, v in new.items():
    out[p] = np.asarray(v, np.asarray(flat[p]).dtype)
  return dataclasses.replace(adapted, params=paths.unflatten(out))


def _load_peft_virtual(adapted, model, path, cfg):
  """An HF PEFT prompt/prefix dir: base model (widths, layers, heads), method,
  number of virtual tokens, then the tensor and the head."""
  method = VIRTUAL_TYPES[cfg['peft_type']]
  tensors = dict(_read_weights(path, PEFT_WEIGHTS))
  if PROMPT_KEY not in tensors:
    raise ValueError(f'{path}: its {PEFT_WEIGHTS} holds no {PROMPT_KEY} tensor, which '
                     f'{cfg["peft_type"]} adapters keep their values in.')
  rows = np.asarray(tensors.pop(PROMPT_KEY))
  _check_virtual_base(path, cfg, model, method, rows)
  module = _virtual(adapted)
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
    raise _differs(path, f'has num_virtual_tokens={n}',
                   f'uses {module.num_virtual_tokens} (peft.{method}.num_virtual_tokens)',
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
    keys, values = prefix_from_rows(rows, module.spec)
    new = {f'{prefix_tuning.KEY}/keys': keys, f'{prefix_tuning.KEY}/values': values}
  others = {_strip_peft_prefix(k): np.asarray(v) for k, v in tensors.items()}
  new.update(_head_from(path, model, flat, others))
  return _replaced(adapted, flat, new)


def _strip_peft_prefix(key: str) -> str:
  for prefix in (PEFT_PREFIX, PROMPT_HEAD_PREFIX):
    if key.startswith(prefix):
      return key[len(prefix):]
  return key


def _check_virtual_base(path, cfg, model, method: str, rows) -> None:
  """The adapter's token_dim, num_layers and num_attention_heads (and its
  tensor's width) must be this model's, as PEFT would set them for it."""
  family = model.config.get('model')
  fix = ('Load the adapter onto the base model it was trained on (--config.pretrained; '
         f'it names base_model_name_or_path={cfg.get("base_model_name_or_path")!r}).')
  if family not in virtual_tokens.EMBEDDINGS:
    raise _mismatch(path, f'token embeddings take its {cfg["peft_type"]} values',
                    f'({family}) has no token embeddings: prompt and prefix tuning apply to '
                    f'{"/".join(sorted(virtual_tokens.EMBEDDINGS))}', fix)
  submodules = cfg.get('num_transformer_submodules') or 1
  if submodules != 1:
    raise _mismatch(path, f'num_transformer_submodules={submodules} (an encoder-decoder)',
                    f'({family}) is one stack of layers', fix)
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
    raise _mismatch(path, f'{show(theirs)} ({PROMPT_KEY} {rows.shape})',
                    f'({family}) has {show(mine)} (a {PROMPT_KEY} width of {width})', fix)


def _peft_feedforward(cfg, name: str, vector) -> bool:
  """Whether PEFT scales module `name`'s input, as its IA3Model decides."""
  ff = cfg.get('feedforward_modules')
  if ff is None:  # not written by PEFT, which saves its defaults: the shape tells
    return vector.ndim == 2 and vector.shape[0] == 1 and vector.shape[1] > 1
  if isinstance(ff, str):
    return bool(re.fullmatch(ff, name))
  return any(name.endswith(k) for k in ff)


def _map_ia3(path, cfg, model, flat, hook, vectors) -> tuple[dict, set, set]:
  """Our {param path: vector} and the modules scaled on output and on input; a
  module or shape that is not this base model's is a mismatch error.

  GPT-2's c_attn vector covers q|k|v; with q's third all ones it becomes ours
  (k|v), otherwise it stays whole and the hook scales q by it too.
  """
  family = model.config['model']
  inverse = _inverse_names(model, flat)
  fix = ('Load the adapter onto the base model it was trained on (--config.pretrained; '
         f'it names base_model_name_or_path={cfg.get("base_model_name_or_path")!r}).')
  unknown = sorted(n for n in vectors if n not in inverse)
  if unknown:
    own = module_names(model, flat, _model_modules(flat)).values()
    raise _mismatch(path, f'scaled modules are {_fold(vectors)}',
                    f'({family}) has no module {unknown[0]!r}; its modules are {_fold(own)}',
                    fix)
  new, scaled_out, scaled_in = {}, set(), set()
  for name, vector in vectors.items():
    ours = inverse[name]
    kernel = tuple(np.shape(flat[f'{ours}/kernel']))
    on_input = _peft_feedforward(cfg, name, vector)
    size = kernel[-2] if on_input else kernel[-1]
    shape = (1, size, 1, 1) if len(kernel) == 4 else (1, size) if on_input else (size, 1)
    if vector.shape != shape:
      raise _mismatch(path, f'{name} has an ia3_l of shape {vector.shape} (scaling its '
                      f'{"input" if on_input else "output"})',
                      f'has {ours!r} with a {kernel} kernel', fix)
    vector = vector.reshape(-1)
    fused = family in ia3.FUSED_QKV and re.search(ia3.FUSED_QKV[family], ours)
    if fused and not on_input and np.all(vector[:size // 3] == 1):
      vector = vector[size // 3:]
    (scaled_in if on_input else scaled_out).add(ours)
    new[f'{ours}/{ia3.SCALE}'] = vector
  return new, scaled_out, scaled_in


def _regexes_for(wanted: set, candidates) -> str:
  """A config-ready tuple of regexes that select exactly `wanted`: leaf names,
  else paths with layer numbers folded, else each path anchored."""
  def selects(patterns):
    return {c for c in candidates if any(re.search(p, c) for p in patterns)} == wanted
  leaves = sorted({f'{m.rsplit("/", 1)[-1]}$' for m in wanted})
  folded = sorted({re.sub(r'\d+', r'\\d+', re.escape(m)) + '$' for m in wanted})
  exact = sorted(f'^{re.escape(m)}$' for m in wanted)
  patterns = next(p for p in (leaves, folded, exact) if selects(p))
  return '(' + ', '.join(repr(p) for p in patterns) + (',)' if len(patterns) == 1 else ')')


def _ia3_whole(adapted, flat: dict, p: str, shape: tuple) -> bool:
  """Whether `p` is a fused q|k|v vector covering the whole output (from HF PEFT)."""
  hook = _ia3_hook(adapted)
  m = p[:-len('/' + ia3.SCALE)]
  return (hook is not None and p.endswith('/' + ia3.SCALE) and m in hook.fused_qkv
          and shape == tuple(np.shape(flat[f'{m}/kernel']))[-1:])


def _load_ours(adapted, model, path):
  meta = _read_json(os.path.join(path, OUR_CONFIG))
  if meta.get('format') != OUR_FORMAT:
    raise ValueError(f'{path}/{OUR_CONFIG} is not a {OUR_FORMAT} file.')
  tensors = _read_weights(path, OUR_WEIGHTS)
  flat = paths.flatten(adapted.params)
  trains = adapted.trainable
  missing, extra = sorted(trains - set(tensors)), sorted(set(tensors) - trains)
  shapes = [(p, tuple(tensors[p].shape), tuple(np.shape(flat[p])))
            for p in sorted(set(tensors) & trains)
            if tuple(tensors[p].shape) != tuple(np.shape(flat[p]))
            and not _ia3_whole(adapted, flat, p, tuple(tensors[p].shape))]
  if missing or extra or shapes:
    details = '; '.join(x for x in (
        missing and f'this run trains {missing[:3]}, which the adapter lacks',
        extra and f'the adapter holds {extra[:3]}, which this run does not train',
        shapes and f'(path, adapter shape, our shape) differ: {shapes[:3]}') if x)
    raise _mismatch(path, f'trainable params ({meta.get("model")}, '
                    f'pretrained={meta.get("pretrained")!r}, method={meta.get("method")!r}) '
                    f'are {len(tensors)} tensors', f'differs: {details}',
                    'Use the pretrained model, num_classes and peft options the adapter '
                    'was trained with.')
  hook = _lora_hook(adapted)
  theirs = meta.get('lora')
  mine = None if hook is None else {
      'alpha': hook.alpha, 'rslora': hook.rslora, 'dora': hook.dora}
  if theirs != mine:
    raise ValueError(
        f'adapter dir {path} was trained with peft.method={meta.get("method")!r} '
        f'(LoRA options {theirs}); this run uses LoRA options {mine}. Set peft.method '
        'and peft.lora.alpha / rslora as the adapter was trained.')
  out = dict(flat)
  for p, v in tensors.items():
    out[p] = np.asarray(v, np.asarray(flat[p]).dtype)
  return dataclasses.replace(adapted, params=paths.unflatten(out))

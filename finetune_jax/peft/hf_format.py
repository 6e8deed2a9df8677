"""Adapters and merged models in Hugging Face layouts, written and read back.

  save_peft(...)      adapter_config.json + adapter_model.safetensors (HF PEFT LoRA/DoRA/IA3,
                      prompt and prefix tuning)
  save_merged(...)    config.json + model.safetensors (transformers), updates folded in
  save_adapter(...)   adapter.json + adapter.safetensors: the trainable params, our paths
  load_adapter(adapted, model, dir)   either kind of adapter dir, onto an adapted model

This module picks the method and holds what is no one method's: the PEFT
config fields every method writes, the merged model and our own format. Each
method's tensors and checks live beside it; imports run down this list only:
  hf_lora.py      LoRA and DoRA
  hf_ia3.py       IA3
  hf_virtual.py   prompt and prefix tuning
  hf_common.py    the PEFT dir's files, the classifier head, errors naming both sides
  hf_names.py     our module paths <-> transformers module names, per family
"""
import logging
import os

import numpy as np

from finetune_jax.convert import vit as convert_vit
from finetune_jax.peft import hf_common
from finetune_jax.peft import hf_ia3
from finetune_jax.peft import hf_lora
from finetune_jax.peft import hf_names
from finetune_jax.peft import hf_virtual
from finetune_jax.peft import ia3
from finetune_jax.peft import lora
from finetune_jax.peft import paths

# Names callers and tests have always taken from here.
PEFT_CONFIG, PEFT_WEIGHTS = hf_common.PEFT_CONFIG, hf_common.PEFT_WEIGHTS
PEFT_PREFIX = hf_common.PEFT_PREFIX
PROMPT_KEY, PROMPT_HEAD_PREFIX = hf_virtual.PROMPT_KEY, hf_virtual.PROMPT_HEAD_PREFIX
VIRTUAL_TYPES = hf_virtual.VIRTUAL_TYPES
module_names = hf_names.module_names

OUR_CONFIG, OUR_WEIGHTS = 'adapter.json', 'adapter.safetensors'
OUR_FORMAT = 'finetune_jax.adapter'
FOLDING_METHODS = ('lora', 'dora', 'ia3')  # updates that fold into the weights
VIRTUAL_METHODS = ('prompt_tuning', 'prefix_tuning')  # positions before the input: no folding
PEFT_METHODS = FOLDING_METHODS + VIRTUAL_METHODS
# Methods whose params are the plain model: a merged export is the params as they are.
PLAIN_METHODS = ('full', 'linear_probe', 'bitfit', 'partial')


def _warn_head(model):
  config = model.config
  if config['model'] == 'bert' and hf_names.has_head(model) and config.get('pooling') != 'pooler':
    logging.warning(
        "This BERT's head reads pooling=%r features, but transformers' "
        'BertForSequenceClassification feeds its classifier the pooler output: its '
        'logits will differ from ours (hidden states match). Train with '
        "--config.text.pooling=pooler for identical logits.", config.get('pooling'))


def _host(params) -> dict:
  """Host numpy copies of a param tree."""
  return paths.unflatten({p: np.asarray(v) for p, v in paths.flatten(params).items()})


def _unsupported(method: str, fmt: str, supported) -> ValueError:
  return ValueError(f'--format {fmt} is not supported yet for peft.method={method!r}; it '
                    f'covers {", ".join(supported)}. --format adapter saves any method.')


# ------------------------------------------------------------------ save


def save_peft(model, adapted, params, out_dir: str, *, method: str,
              base_model: str | None = None) -> None:
  """Writes the HF PEFT layout of a LoRA/DoRA/IA3/prompt/prefix run (params: adapted, trained)."""
  hook = hf_lora.lora_hook(adapted)
  hook = hf_ia3.ia3_hook(adapted) if hook is None else hook
  virtual = hf_virtual.virtual_module(adapted)
  if method not in PEFT_METHODS or (hook is None and virtual is None):
    if method in PLAIN_METHODS:
      raise ValueError(f'peft.method={method!r} trains no adapter, so there is nothing for '
                       'the PEFT format to hold. Export it with --format merged.')
    raise _unsupported(method, 'peft', PEFT_METHODS)
  fam = hf_names.family(model)
  fam.hf_config(model.config)  # refuses a model transformers cannot express
  _warn_head(model)
  flat = paths.flatten(params)  # device arrays: only the adapter leaves are copied out
  head = hf_common.head_tensors(model, flat)
  common = {'task_type': fam.task_type[0 if hf_names.has_head(model) else 1],
            'base_model_name_or_path': base_model, 'revision': None,
            'modules_to_save': sorted({k.rsplit('.', 1)[0] for k in head}) or None,
            'inference_mode': True}
  if virtual is not None:
    tensors, config = hf_virtual.peft_tensors(model, virtual, params)
    head_prefix = PROMPT_HEAD_PREFIX
  else:
    make = hf_ia3.peft_tensors if isinstance(hook, ia3.Hook) else hf_lora.peft_tensors
    tensors, config = make(model, hook, flat)
    config['fan_in_fan_out'] = fam.fan_in_fan_out
    head_prefix = PEFT_PREFIX
  tensors.update({head_prefix + k: v for k, v in head.items()})
  os.makedirs(out_dir, exist_ok=True)
  hf_common.write_json({**config, **common}, os.path.join(out_dir, PEFT_CONFIG))
  hf_common.write_safetensors(tensors, os.path.join(out_dir, PEFT_WEIGHTS),
                              hf_common.TORCH_METADATA)


def merged_params(adapted, params, *, method: str) -> dict:
  """Plain model params: LoRA/DoRA updates or IA3 vectors folded in, other plain
  methods as they are."""
  if hf_lora.lora_hook(adapted) is not None:
    return lora.merge(adapted.module, params)
  if hf_ia3.ia3_hook(adapted) is not None:
    return ia3.merge(adapted.module, params)
  if method in PLAIN_METHODS:
    return params
  if method in VIRTUAL_METHODS or hf_virtual.virtual_module(adapted) is not None:
    raise ValueError(
        f'peft.method={method!r} learns positions ahead of the input, which no weight of the '
        'model can hold: there is no merged model to write. Export it with --format peft '
        '(HF PEFT, for peft.PeftModel.from_pretrained) or --format adapter.')
  raise _unsupported(method, 'merged', FOLDING_METHODS + PLAIN_METHODS)


def save_merged(model, adapted, params, out_dir: str, *, method: str) -> None:
  """Writes a transformers model dir (config.json, model.safetensors, tokenizer, ...)."""
  fam = hf_names.family(model)
  merged = merged_params(adapted, params, method=method)
  hf_config = fam.hf_config(model.config)  # refuses what transformers cannot express
  _warn_head(model)
  tensors = fam.to_hf(_host(merged), model.config, hf_names.prefix(model))
  os.makedirs(out_dir, exist_ok=True)
  hf_common.write_json(hf_config, os.path.join(out_dir, 'config.json'))
  hf_common.write_safetensors(tensors, os.path.join(out_dir, 'model.safetensors'),
                              hf_common.TORCH_METADATA)
  if model.tokenizer is not None:
    model.tokenizer.save(os.path.join(out_dir, 'tokenizer.json'))
  if model.config['model'] == 'vit':
    hf_common.write_json(convert_vit.hf_preprocessor_config(model.config),
                         os.path.join(out_dir, 'preprocessor_config.json'))


def save_adapter(model, adapted, params, out_dir: str, *, method: str,
                 base_model: str | None = None) -> None:
  """Writes the trainable params alone, under our param paths (any method)."""
  flat = paths.flatten(params)
  tensors = {p: np.asarray(flat[p]) for p in sorted(adapted.trainable)}
  hook = hf_lora.lora_hook(adapted)
  meta = {'format': OUR_FORMAT, 'version': 1, 'method': method, 'pretrained': base_model,
          'model': model.config.get('model'), 'num_classes': model.config.get('num_classes'),
          'lora': None if hook is None else {
              'alpha': hook.alpha, 'rslora': hook.rslora, 'dora': hook.dora}}
  os.makedirs(out_dir, exist_ok=True)
  hf_common.write_json(meta, os.path.join(out_dir, OUR_CONFIG))
  hf_common.write_safetensors(tensors, os.path.join(out_dir, OUR_WEIGHTS))


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


def _load_peft(adapted, model, path):
  """The method's reader, by the config's peft_type."""
  cfg = hf_common.read_json(os.path.join(path, PEFT_CONFIG))
  if cfg.get('peft_type') == 'IA3':
    return hf_ia3.load(adapted, model, path, cfg)
  if cfg.get('peft_type') in VIRTUAL_TYPES:
    return hf_virtual.load(adapted, model, path, cfg)
  if cfg.get('peft_type') != 'LORA':
    raise ValueError(f'{path}: peft_type={cfg.get("peft_type")!r} adapters cannot be '
                     'imported yet; LORA (LoRA and DoRA), IA3, PROMPT_TUNING and '
                     'PREFIX_TUNING can.')
  return hf_lora.load(adapted, model, path, cfg)


def _load_ours(adapted, model, path):
  meta = hf_common.read_json(os.path.join(path, OUR_CONFIG))
  if meta.get('format') != OUR_FORMAT:
    raise ValueError(f'{path}/{OUR_CONFIG} is not a {OUR_FORMAT} file.')
  tensors = hf_common.read_weights(path, OUR_WEIGHTS)
  flat = paths.flatten(adapted.params)
  trains = adapted.trainable
  missing, extra = sorted(trains - set(tensors)), sorted(set(tensors) - trains)
  shapes = [(p, tuple(tensors[p].shape), tuple(np.shape(flat[p])))
            for p in sorted(set(tensors) & trains)
            if tuple(tensors[p].shape) != tuple(np.shape(flat[p]))
            and not hf_ia3.whole_vector(adapted, flat, p, tuple(tensors[p].shape))]
  if missing or extra or shapes:
    details = '; '.join(x for x in (
        missing and f'this run trains {missing[:3]}, which the adapter lacks',
        extra and f'the adapter holds {extra[:3]}, which this run does not train',
        shapes and f'(path, adapter shape, our shape) differ: {shapes[:3]}') if x)
    raise hf_common.mismatch(
        path, f'trainable params ({meta.get("model")}, pretrained={meta.get("pretrained")!r}, '
        f'method={meta.get("method")!r}) are {len(tensors)} tensors', f'differs: {details}',
        'Use the pretrained model, num_classes and peft options the adapter '
        'was trained with.')
  hook = hf_lora.lora_hook(adapted)
  theirs = meta.get('lora')
  mine = None if hook is None else {
      'alpha': hook.alpha, 'rslora': hook.rslora, 'dora': hook.dora}
  if theirs != mine:
    raise ValueError(
        f'adapter dir {path} was trained with peft.method={meta.get("method")!r} '
        f'(LoRA options {theirs}); this run uses LoRA options {mine}. Set peft.method '
        'and peft.lora.alpha / rslora as the adapter was trained.')
  return hf_common.replaced(adapted, flat, tensors)

"""Adapters and merged models in Hugging Face layouts, written and read back.

  save_peft(...)      adapter_config.json + adapter_model.safetensors (HF PEFT), for the
                      methods HF PEFT has (LoRA, DoRA, IA3, prompt and prefix tuning)
  save_merged(...)    config.json + model.safetensors (transformers), updates folded in
  save_adapter(...)   adapter.json + adapter.safetensors: the trainable params, our paths
  load_adapter(adapted, model, dir)   either kind of adapter dir, onto an adapted model

A driver: each method's tensors, checks and folding live in its own file
(`method.Method.to_peft`, `from_peft`, `merged`). What is no one method's is
here (the PEFT config fields every method writes, the merged model, our own
format) and in hf_common.py (the dir's files, the head) and hf_names.py
(module names, per architecture).
"""
import logging
import os

import numpy as np

from finetune_jax import quantized
from finetune_jax.formats import hf_dir
from finetune_jax.peft import hf_common
from finetune_jax.peft import hf_names
from finetune_jax.peft import method as method_lib
from finetune_jax.peft import paths

PEFT_CONFIG, PEFT_WEIGHTS = hf_common.PEFT_CONFIG, hf_common.PEFT_WEIGHTS
OUR_CONFIG, OUR_WEIGHTS = 'adapter.json', 'adapter.safetensors'
OUR_FORMAT = 'finetune_jax.adapter'


def _warn_head(model):
  warning = hf_names.family(model).export_warning(model.config, hf_names.has_head(model))
  if warning:
    logging.warning(warning)


def _host(params) -> dict:
  """Host numpy copies of a param tree."""
  return paths.unflatten({p: np.asarray(v) for p, v in paths.flatten(params).items()})


# ------------------------------------------------------------------ save


def save_peft(model, adapted, params, out_dir: str, *, method: str,
              base_model: str | None = None) -> None:
  """Writes the HF PEFT layout of a run whose method has one (params: adapted, trained)."""
  chosen = method_lib.get(method)
  if not chosen.peft_types:
    chosen.to_peft(model, adapted, params)  # raises: why this method has no PEFT layout
  fam = hf_names.family(model)
  fam.hf_config(model.config)  # refuses a model transformers cannot express
  _warn_head(model)
  head = hf_common.head_tensors(model, paths.flatten(params))
  tensors, config, head_prefix = chosen.to_peft(model, adapted, params)
  tensors.update({head_prefix + k: v for k, v in head.items()})
  common = {'task_type': fam.task_type[0 if hf_names.has_head(model) else 1],
            'base_model_name_or_path': base_model, 'revision': None,
            'modules_to_save': sorted({k.rsplit('.', 1)[0] for k in head}) or None,
            'inference_mode': True}
  os.makedirs(out_dir, exist_ok=True)
  hf_common.write_json({**config, **common}, os.path.join(out_dir, PEFT_CONFIG))
  hf_common.write_safetensors(tensors, os.path.join(out_dir, PEFT_WEIGHTS),
                              hf_common.TORCH_METADATA)


def merged_params(adapted, params, *, method: str) -> dict:
  """Plain model params: what the method learned folded into the weights, on the base it
  trained on (a quantized base dequantized, as QLoRA merges)."""
  return method_lib.get(method).merged(adapted, quantized.dequantize_tree(params))


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
  for name, contents in fam.extra_files.items():
    hf_common.write_json(contents(model.config), os.path.join(out_dir, name))


def save_adapter(model, adapted, params, out_dir: str, *, method: str,
                 base_model: str | None = None) -> None:
  """Writes the trainable params alone, under our param paths (any method)."""
  flat = paths.flatten(params)
  tensors = {p: np.asarray(flat[p]) for p in sorted(adapted.trainable)}
  # 'lora': the options an adapter must agree on to load, named for the methods that
  # have any (LoRA and DoRA); None for the others.
  meta = {'format': OUR_FORMAT, 'version': 1, 'method': method, 'pretrained': base_model,
          'model': model.config.get('model'), 'num_classes': model.config.get('num_classes'),
          'lora': method_lib.get(method).saved_options(adapted)}
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
  """The reader of the method that the config's peft_type names."""
  cfg = hf_dir.read_json(os.path.join(path, PEFT_CONFIG))
  reader = method_lib.reading(cfg.get('peft_type'))
  if reader is None:
    readable = sorted(t for n in method_lib.names() for t in method_lib.get(n).peft_types)
    raise ValueError(f'{path}: peft_type={cfg.get("peft_type")!r} adapters cannot be '
                     f'imported yet; {", ".join(readable)} can.')
  return reader.from_peft(adapted, model, path, cfg)


def _load_ours(adapted, model, path):
  meta = hf_dir.read_json(os.path.join(path, OUR_CONFIG))
  if meta.get('format') != OUR_FORMAT:
    raise ValueError(f'{path}/{OUR_CONFIG} is not a {OUR_FORMAT} file.')
  tensors = hf_common.read_weights(path, OUR_WEIGHTS)
  flat = paths.flatten(adapted.params)
  trains = adapted.trainable
  missing, extra = sorted(trains - set(tensors)), sorted(set(tensors) - trains)
  shapes = [(p, tuple(tensors[p].shape), tuple(np.shape(flat[p])))
            for p in sorted(set(tensors) & trains)
            if tuple(tensors[p].shape) != tuple(np.shape(flat[p]))
            and not _loads_shape(adapted, flat, p, tuple(tensors[p].shape))]
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
  theirs = meta.get('lora')
  mine = adapted.method.saved_options(adapted) if adapted.method else None
  if theirs != mine:
    raise ValueError(
        f'adapter dir {path} was trained with peft.method={meta.get("method")!r} '
        f'(LoRA options {theirs}); this run uses LoRA options {mine}. Set peft.method '
        'and peft.lora.alpha / rslora as the adapter was trained.')
  return hf_common.replaced(adapted, flat, tensors)


def _loads_shape(adapted, flat, path, shape) -> bool:
  return bool(adapted.method) and adapted.method.loads_shape(adapted, flat, path, shape)

"""What the HF PEFT readers and writers of every method share: the dir's file
names, reading and writing its files, the classifier head both ways, and the
errors that name the adapter's side and this run's.

A trained classifier head is a `modules_to_save` module, stored as its plain
weights under its transformers names.
"""
import dataclasses
import json
import logging
import os
import re

import numpy as np
import safetensors.numpy

from finetune_jax.formats import hf_dir
from finetune_jax.peft import hf_names
from finetune_jax.peft import paths

PEFT_CONFIG, PEFT_WEIGHTS = 'adapter_config.json', 'adapter_model.safetensors'
PEFT_PREFIX = 'base_model.model.'
TORCH_METADATA = {'format': 'pt'}  # what transformers and PEFT expect in the header


# ------------------------------------------------------------------ files


def write_safetensors(tensors: dict, path: str, metadata=None) -> None:
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                              path, metadata=metadata)


def write_json(obj, path: str) -> None:
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)


def read_weights(path: str, name: str) -> dict:
  file = os.path.join(path, name)
  if not os.path.exists(file):
    others = [f for f in os.listdir(path) if f.startswith('adapter_model')]
    raise ValueError(f'{path} has no {name}{f" (it has {others})" if others else ""}; '
                     'only safetensors adapters are read: save it with '
                     'save_pretrained(dir, safe_serialization=True).')
  return hf_dir.read_safetensors(file)


# ------------------------------------------------------------------ errors


def mismatch(path: str, theirs: str, ours: str, fix: str) -> ValueError:
  return ValueError(f'adapter dir {path} was made for a base model whose {theirs}; this '
                    f"run's model {ours}. {fix}")


def differs(path: str, theirs: str, ours: str, fix: str) -> ValueError:
  return ValueError(f'adapter dir {path} {theirs}; this run {ours}. {fix}')


def collapse_digits(names) -> list:
  """Module names with layer numbers folded ('layer.*.attention'), for messages."""
  return sorted({re.sub(r'(?<=[._])\d+(?=[./]|$)', '*', n) for n in names})


def base_model_fix(cfg) -> str:
  """The fix for an adapter made for another base model: the one it names."""
  return ('Load the adapter onto the base model it was trained on (--config.pretrained; '
          f'it names base_model_name_or_path={cfg.get("base_model_name_or_path")!r}).')


def our_modules(path, cfg, model, flat: dict, names, what: str) -> dict:
  """{HF module name: our module} for the adapter's `names` (its `what` modules,
  'adapted' or 'scaled'); a name this base model lacks is a mismatch error."""
  inverse = hf_names.inverse_names(model)
  unknown = sorted(n for n in names if n not in inverse)
  if unknown:
    own = hf_names.module_names(model, hf_names.model_modules(model)).values()
    raise mismatch(path, f'{what} modules are {collapse_digits(names)}',
                   f'({model.config["model"]}) has no module {unknown[0]!r}; its modules are '
                   f'{collapse_digits(own)}', base_model_fix(cfg))
  return {n: inverse[n] for n in names}


# ------------------------------------------------------------------ the head


def head_tensors(model, flat: dict) -> dict:
  """The head's HF tensors ('classifier.weight', ...), or {} without a head."""
  if not hf_names.has_head(model):
    return {}
  head = {p: np.asarray(v) for p, v in flat.items() if p.startswith(model.head + '/')}
  return hf_names.family(model).to_hf(paths.unflatten(head), model.config,
                                      hf_names.prefix(model))


def head_from(path, model, flat, others: dict) -> dict:
  """Our head params from the adapter's modules_to_save tensors ({} when it has none)."""
  if not others:
    if hf_names.has_head(model):
      logging.warning('%s saves no classifier head; the head starts from its init.', path)
    return {}
  head_names = hf_names.head_names(model, flat)  # HF name: our path
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


def replaced(adapted, flat: dict, new: dict):
  """`adapted` with the leaves `new` names replaced, each in its old dtype."""
  out = dict(flat)
  for p, v in new.items():
    out[p] = np.asarray(v, np.asarray(flat[p]).dtype)
  return dataclasses.replace(adapted, params=paths.unflatten(out))

"""Which transformers module each of our modules is, per model family, both ways.

Module names come from the converters' `params_to_hf`, so there is one name
table per family. The exception is ViT under transformers >= 5: its modules
were renamed (q_proj, mlp.fc1, ...) while its checkpoints kept the old names,
and PEFT keys follow the modules. Exports use the installed transformers'
naming (v5 without one); imports read both.
"""
import dataclasses
import importlib.metadata
import re
from typing import Callable

import numpy as np

from finetune_jax.convert import bert as convert_bert
from finetune_jax.convert import gpt2 as convert_gpt2
from finetune_jax.convert import llama as convert_llama
from finetune_jax.convert import vit as convert_vit
from finetune_jax.peft import lora
from finetune_jax.peft import paths
from finetune_jax.peft import prefix_tuning


@dataclasses.dataclass(frozen=True)
class Family:
  """How one model family maps onto transformers; pairs are (with head, without)."""
  to_hf: Callable  # (nested params, our config, prefix) -> {HF state-dict name: array}
  hf_config: Callable  # our config -> config.json
  prefix: tuple  # of the body's module names
  task_type: tuple  # PEFT's task_type
  fan_in_fan_out: bool = False  # GPT-2's Conv1D keeps weights (in, out)


FAMILIES = {
    'bert': Family(lambda p, c, prefix: convert_bert.params_to_hf(p, prefix=prefix),
                   convert_bert.hf_config, ('bert.', ''), ('SEQ_CLS', 'FEATURE_EXTRACTION')),
    'gpt2': Family(lambda p, c, prefix: convert_gpt2.params_to_hf(p, prefix=prefix),
                   convert_gpt2.hf_config, ('transformer.',) * 2, ('CAUSAL_LM',) * 2,
                   fan_in_fan_out=True),
    'llama': Family(lambda p, c, prefix: convert_llama.params_to_hf(p, c),
                    convert_llama.hf_config, ('model.',) * 2, ('CAUSAL_LM',) * 2),
    'vit': Family(lambda p, c, prefix: convert_vit.params_to_hf(p, prefix=prefix),
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


def family(model) -> Family:
  name = model.config.get('model')
  if name not in FAMILIES:
    raise ValueError(f'Model family {name!r} has no Hugging Face layout here; the HF '
                     f'formats cover {sorted(FAMILIES)}. Use --format adapter (our '
                     'own layout) for this model.')
  return FAMILIES[name]


def has_head(model) -> bool:
  return bool(model.config.get('num_classes'))


def prefix(model) -> str:
  return family(model).prefix[0 if has_head(model) else 1]


def _checkpoint_names(model, flat: dict, modules) -> dict:
  """{our module: transformers checkpoint module name}, from the family's converter."""
  fam, body = family(model), prefix(model)
  out = {}
  for m in modules:
    probe = {f'{m}/kernel': np.zeros((1,) * np.ndim(flat[f'{m}/kernel']), np.float32)}
    (name,) = fam.to_hf(paths.unflatten(probe), model.config, body)
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


def inverse_names(model, flat: dict) -> dict:
  """{HF module name, in every naming we read: our module}, the head included."""
  fam = family(model)
  modules = model_modules(flat)
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


def model_modules(flat: dict) -> list:
  """The model's modules with a kernel; a prefix MLP's (a run's own) are not the model's."""
  return [m for m in lora.candidate_modules(flat) if not m.startswith(prefix_tuning.KEY + '/')]


def extra_hf_modules(model) -> set:
  """Linear modules transformers builds that our params lack (randomly initialised there)."""
  config, body = model.config, prefix(model)
  if config['model'] == 'bert' and not config.get('add_pooler', True):
    return {f'{body}pooler.dense'}
  if config['model'] == 'vit' and not has_head(model) and not config.get('representation_size'):
    return {'pooler.dense'}
  return set()


def head_names(model, flat: dict) -> dict:
  """{HF name of a head tensor ('classifier.weight', ...): our path}; {} without a head."""
  out = {}
  if has_head(model):
    for p in flat:
      if p.startswith(model.head + '/'):
        probe = paths.unflatten({p: np.zeros((1,) * np.ndim(flat[p]), np.float32)})
        (name,) = family(model).to_hf(probe, model.config, prefix(model))
        out[name] = p
  return out

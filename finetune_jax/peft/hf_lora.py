"""LoRA and DoRA adapters in the HF PEFT layout, written and read back.

HF PEFT names each LoRA tensor after the transformers *module* it adapts,
prefixed 'base_model.model.', in torch layouts:
  lora_A.weight          (r, in)  | (r, in, kh, kw)    ours lora_a (in, r) | (kh, kw, in, r)
  lora_B.weight          (out, r) | (out, r, 1, 1)     ours lora_b (r, out)
  lora_magnitude_vector  (out,)   | (1, out, 1, 1)     ours lora_magnitude (out,)
(Linear and GPT-2's Conv1D | Conv2d.)
"""
import collections
import math
import re

import numpy as np

from finetune_jax.peft import hf_common
from finetune_jax.peft import hf_names
from finetune_jax.peft import lora
from finetune_jax.peft import paths
from finetune_jax.peft.hf_common import PEFT_PREFIX
from finetune_jax.peft.hf_common import PEFT_WEIGHTS


def lora_hook(adapted):
  """The run's LoRA/DoRA hook, or None for other methods."""
  hook = getattr(adapted.module, 'hook', None)
  return hook if isinstance(hook, lora.Hook) else None


def _number(x: float):
  return int(x) if float(x).is_integer() else float(x)


# ------------------------------------------------------------------ save


def peft_tensors(model, hook, flat: dict) -> tuple[dict, dict]:
  """PEFT's LoRA/DoRA tensors and the config fields of their own."""
  modules = lora.adapted_modules(flat)
  names = hf_names.module_names(model, flat, modules)
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


def _target_modules(model, flat: dict, chosen: set):
  """PEFT's target_modules: short names ('query', 'value') when they select
  exactly `chosen`, else the full module names (exact in PEFT too)."""
  candidates = lora.candidate_modules(flat, model.head + '/' if hf_names.has_head(model) else None)
  everything = (set(hf_names.module_names(model, flat, candidates).values())
                | hf_names.extra_hf_modules(model))
  leaves = sorted({n.rsplit('.', 1)[-1] for n in chosen})
  if {n for n in everything if n.rsplit('.', 1)[-1] in leaves} == chosen:
    return leaves
  return sorted(chosen)


# ------------------------------------------------------------------ load


def load(adapted, model, path, cfg):
  """An HF PEFT LoRA/DoRA dir: the base model first (names, shapes), then method,
  targets, ranks, alpha, head."""
  flat = paths.flatten(adapted.params)
  loras, others = _split_peft_tensors(path, hf_common.read_weights(path, PEFT_WEIGHTS))
  new, ranks = _map_loras(path, cfg, model, flat, loras)
  _check_options(path, cfg, adapted)
  hook = lora_hook(adapted)
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
    raise hf_common.differs(path, f'has LoRA ranks {dict(sorted(ranks.items())[:4])}',
                            f'uses ranks {dict(sorted(mine.items())[:4])}', fix)
  _check_alpha(path, cfg, hook, list(loras))
  new.update(hf_common.head_from(path, model, flat, others))
  return hf_common.replaced(adapted, flat, new)


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
  ours_of = hf_common.our_modules(path, cfg, model, flat, loras, 'adapted')
  new, ranks = {}, {}
  for name, leaves in loras.items():
    ours = ours_of[name]
    kernel_shape = tuple(np.shape(flat[f'{ours}/kernel']))
    a_hf, b_hf = leaves['lora_A'], leaves['lora_B']
    a = a_hf.transpose(2, 3, 1, 0) if a_hf.ndim == 4 else a_hf.T
    b = b_hf.reshape(b_hf.shape[0], -1).T
    if (a.shape[:-1] != kernel_shape[:-1] or b.shape[-1] != kernel_shape[-1]
        or a.shape[-1] != b.shape[0]):
      raise hf_common.mismatch(path, f'{name} maps {a.shape[:-1]} -> {b.shape[-1]} features '
                               f'(lora_A {a_hf.shape}, lora_B {b_hf.shape})',
                               f'has {ours!r} with a {kernel_shape} kernel',
                               hf_common.base_model_fix(cfg))
    ranks[ours] = a.shape[-1]
    new[f'{ours}/{lora.A}'], new[f'{ours}/{lora.B}'] = a, b
    if 'lora_magnitude_vector' in leaves:
      new[f'{ours}/{lora.MAGNITUDE}'] = leaves['lora_magnitude_vector'].reshape(-1)
  return new, ranks


def _check_options(path, cfg, adapted) -> None:
  """The run's method and LoRA options must be the adapter's."""
  hook = lora_hook(adapted)
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


def _targets_hint(wanted: set) -> str:
  leaves = sorted({m.rsplit('/', 1)[-1] for m in wanted})
  return '(' + ', '.join(repr(f'{n}$') for n in leaves) + (',)' if len(leaves) == 1 else ')')


def _check_targets(path, theirs: dict, mine: list) -> None:
  missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
  if missing or extra:
    raise hf_common.differs(
        path, f'adapts {hf_common.fold(theirs)}',
        f'adapts {hf_common.fold(mine)} (peft.lora.targets)'
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

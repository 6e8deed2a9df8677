"""IA3 adapters in the HF PEFT layout, written and read back.

IA3's vector is '<module>.ia3_l', prefixed 'base_model.model.': (out, 1), or
(1, in) for a feedforward module, (1, n, 1, 1) on a Conv2d; ours ia3_scale
(n,). GPT-2's c_attn vector covers q|k|v there (ours k|v: ones go before it).
"""
import re

import numpy as np

from finetune_jax.peft import hf_common
from finetune_jax.peft import hf_names
from finetune_jax.peft import ia3
from finetune_jax.peft import paths
from finetune_jax.peft.hf_common import PEFT_PREFIX
from finetune_jax.peft.hf_common import PEFT_WEIGHTS


def ia3_hook(adapted):
  """The run's IA3 hook, or None for other methods."""
  hook = getattr(adapted.module, 'hook', None)
  return hook if isinstance(hook, ia3.Hook) else None


def _ia3_modules(flat: dict) -> list:
  """Our module paths that own an IA3 vector."""
  tail = '/' + ia3.SCALE
  return sorted(p[:-len(tail)] for p in flat if p.endswith(tail))


def whole_vector(adapted, flat: dict, p: str, shape: tuple) -> bool:
  """Whether `p` is a fused q|k|v vector covering the whole output (from HF PEFT)."""
  hook = ia3_hook(adapted)
  m = p[:-len('/' + ia3.SCALE)]
  return (hook is not None and p.endswith('/' + ia3.SCALE) and m in hook.fused_qkv
          and shape == tuple(np.shape(flat[f'{m}/kernel']))[-1:])


# ------------------------------------------------------------------ save


def peft_tensors(model, hook, flat: dict) -> tuple[dict, dict]:
  """PEFT's IA3 vectors and config fields. Module lists are full names: PEFT
  matches feedforward_modules by bare suffix, so 'output.dense' would also
  catch BERT's attention.output.dense."""
  modules = _ia3_modules(flat)
  names = hf_names.module_names(model, flat, modules)
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


# ------------------------------------------------------------------ load


def load(adapted, model, path, cfg):
  """An HF PEFT IA3 dir: base model (names, shapes), then the scaled modules, head."""
  hook = ia3_hook(adapted)
  if hook is None:
    raise ValueError(f'{path} holds an IA3 adapter; set --config.peft.method=ia3 to load '
                     'it with peft.init_from.')
  flat = paths.flatten(adapted.params)
  vectors, others = {}, {}
  for key, value in hf_common.read_weights(path, PEFT_WEIGHTS).items():
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
    head = model.head + '/' if hf_names.has_head(model) else None
    candidates = paths.candidate_modules(flat, head)
    differ = sorted((scaled_out ^ mine_out) | (scaled_in ^ mine_in))
    raise hf_common.differs(
        path, f'scales the outputs of {hf_common.fold(scaled_out)} and the inputs of '
        f'{hf_common.fold(scaled_in)}', f'scales the outputs of {hf_common.fold(mine_out)} '
        f'(peft.ia3.targets) and the inputs of {hf_common.fold(mine_in)} '
        f'(peft.ia3.feedforward), unlike the adapter at {differ[:3]}',
        f'Set --config.peft.ia3.targets="{_regexes_for(scaled_out, candidates)}" and '
        f'--config.peft.ia3.feedforward="{_regexes_for(scaled_in, candidates)}" '
        '(regexes over our module paths) to scale the same modules.')
  new.update(hf_common.head_from(path, model, flat, others))
  return hf_common.replaced(adapted, flat, new)


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
  ours_of = hf_common.our_modules(path, cfg, model, flat, vectors, 'scaled')
  new, scaled_out, scaled_in = {}, set(), set()
  for name, vector in vectors.items():
    ours = ours_of[name]
    kernel = tuple(np.shape(flat[f'{ours}/kernel']))
    on_input = _peft_feedforward(cfg, name, vector)
    size = kernel[-2] if on_input else kernel[-1]
    shape = (1, size, 1, 1) if len(kernel) == 4 else (1, size) if on_input else (size, 1)
    if vector.shape != shape:
      raise hf_common.mismatch(path, f'{name} has an ia3_l of shape {vector.shape} (scaling '
                               f'its {"input" if on_input else "output"})',
                               f'has {ours!r} with a {kernel} kernel',
                               hf_common.base_model_fix(cfg))
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

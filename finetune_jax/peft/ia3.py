"""IA3 (Liu et al., 2022): learned vectors that rescale keys, values and the MLP.

As HF PEFT's IA3, on any zoo transformer through `intercept` (the model files
are not edited). Two regex lists over module paths choose the layers:

  peft.ia3.targets      y = (x W + b) * l   l: (out,)  the key and value projections
  peft.ia3.feedforward  y = (x * l) W + b   l: (in,)   the MLP's down projection,
                                                       i.e. its intermediate activation

Each vector is '<module>/ia3_scale' and starts at ones: training starts at the
base model. A layer with the role `qkv` fuses q, k and v (GPT-2's c_attn, out
3D, q|k|v): there the
vector has 2D entries, the k and v scales, and q is multiplied by a fixed 1, as
the paper scales keys and values only. (HF PEFT's c_attn vector has 3D entries
and scales q too; exporting ours means prepending D ones. An imported one whose
q entries are not all 1 stays 3D, and a vector covering the whole output is
used as it is.)

Targets are roles, HF-style bare names or regexes (see lora.py). Both lists
empty means the roles k, v (targets) and mlp_out (feedforward): HF PEFT's
TRANSFORMERS_MODELS_TO_IA3_*_MODULES_MAPPING, plus ViT. Setting either one
chooses by hand, and the other, left empty, then selects nothing. One
difference from HF PEFT's BERT default: its 'output.dense' suffix also catches
attention/output/dense; ours scales the MLP's output/dense only, as the paper.

Only the vectors train, plus a classifier head (a task head is new and must
train; a language model's own head stays frozen, as in HF PEFT).
"""
import dataclasses
import re

import jax.numpy as jnp
import numpy as np

from finetune_jax.models import architecture
from finetune_jax.peft import base
from finetune_jax.peft import hf_common
from finetune_jax.peft import hf_names
from finetune_jax.peft import intercept
from finetune_jax.peft import method
from finetune_jax.peft import paths
from finetune_jax.peft.hf_common import PEFT_PREFIX
from finetune_jax.peft.hf_common import PEFT_WEIGHTS

SCALE = 'ia3_scale'
LEAVES = (SCALE,)

# Both options () means these roles: (targets, feedforward).
DEFAULT_ROLES = (('k', 'v'), ('mlp_out',))


@dataclasses.dataclass(frozen=True)
class Hook:
  """Rescales the output (or, for `inputs`, the input) of each layer owning a vector."""
  inputs: frozenset = frozenset()  # module paths scaled on their input
  fused_qkv: frozenset = frozenset()  # module paths whose vector covers k|v of q|k|v

  def __call__(self, call: intercept.Call):
    m = call.module
    if not m.has_variable('params', SCALE):
      return call.run()
    on_input = call.path in self.inputs
    intercept.check_layer(call, 'peft.ia3.feedforward' if on_input else 'peft.ia3.targets',
                          'IA3')
    scale = m.get_variable('params', SCALE)
    if on_input:
      x = call.inputs
      return call.run_on((x * scale).astype(x.dtype))
    y = call.run()
    if call.path in self.fused_qkv and scale.shape[-1] != y.shape[-1]:
      scale = full_scale(scale)
    return (y * scale).astype(y.dtype)


def full_scale(kv):
  """A fused q|k|v layer's per-output vector: ones for q, then the k and v scales."""
  return jnp.concatenate([jnp.ones(kv.shape[-1] // 2, kv.dtype), kv], axis=-1)


# ------------------------------------------------------------------ adapt


def adapt(model, cfg) -> base.Adapted:
  """IA3 on the modules `cfg.ia3.targets` and `cfg.ia3.feedforward` select."""
  targets, feedforward = _options(cfg)
  flat = paths.flatten(model.params)
  if any(p.rsplit('/', 1)[-1] in LEAVES for p in flat):
    raise ValueError('These params already hold IA3 vectors; merge() them first, or '
                     'adapt the plain pretrained model.')
  arch = architecture.of(model)
  head = model.head if base.trains_head(model) else None
  candidates = paths.candidate_modules(flat, head and head + '/')
  what = 'peft.ia3.targets', 'peft.ia3.feedforward'
  if not targets and not feedforward:
    if not applies(model):
      raise base.not_applicable(
          model, 'ia3', "a transformer's attention key/value projections and MLP "
          f'({"/".join(architecture.with_roles(*DEFAULT_ROLES[0], *DEFAULT_ROLES[1]))})',
          'Choose another peft.method (lora, bitfit, ...), or name Dense/Conv layers to '
          'scale in peft.ia3.targets (outputs) or peft.ia3.feedforward (inputs), e.g. '
          f'{paths.example_patterns(candidates)}.')
    targets, feedforward = DEFAULT_ROLES
    what = tuple(f'the default {w} {t} of {arch.name}' for w, t in zip(what, DEFAULT_ROLES))
  scaled_out = _select(targets, candidates, what[0], 'peft.ia3.targets', head, arch)
  scaled_in = _select(feedforward, candidates, what[1], 'peft.ia3.feedforward', head, arch)
  both = scaled_out & scaled_in
  if both:
    raise ValueError(
        f'IA3: {sorted(both)[:5]} are selected by both peft.ia3.targets (scale the output) '
        'and peft.ia3.feedforward (scale the input); narrow one so each layer gets one vector.')
  fused = {m for m in scaled_out if arch.matches('qkv', m)}

  new = {}
  for module in sorted(scaled_out | scaled_in):
    kernel = flat[f'{module}/kernel']
    size = kernel.shape[-2] if module in scaled_in else kernel.shape[-1]
    if module in fused:
      size = 2 * size // 3
    new[f'{module}/{SCALE}'] = jnp.ones((size,), kernel.dtype)
  hook = Hook(inputs=frozenset(scaled_in), fused_qkv=frozenset(fused))
  return base.Adapted(intercept.Intercepted(model.module, hook),
                      paths.unflatten({**flat, **new}),
                      frozenset(new) | base.head_leaves(model))


def applies(model) -> bool:
  """Whether the model has the default roles (k, v and mlp_out)."""
  return architecture.of(model).has(*DEFAULT_ROLES[0], *DEFAULT_ROLES[1])


def _options(cfg) -> tuple[tuple, tuple]:
  if 'ia3' not in cfg:
    raise ValueError('The peft config has no `ia3` section; start the config from '
                     'base_config.get_config().')
  as_tuple = lambda v: (v,) if isinstance(v, str) else tuple(v)
  return as_tuple(cfg.ia3.targets), as_tuple(cfg.ia3.feedforward)


def _select(targets, candidates, what, option, head, arch) -> set:
  if not targets:
    return set()
  return paths.select_modules(targets, candidates, what, option, 'IA3', head, arch)


# ------------------------------------------------------------------ merge


def _hook(module) -> Hook:
  hook = getattr(module, 'hook', None)
  if not isinstance(hook, Hook):
    raise ValueError('Expected the module of an IA3 `Adapted` (peft.method ia3), got '
                     f'{type(module).__name__}.')
  return hook


def vectors(params) -> dict:
  """Only the IA3 vectors: what an adapter file holds."""
  return paths.unflatten({p: v for p, v in paths.flatten(params).items()
                          if p.rsplit('/', 1)[-1] in LEAVES})


def merge(module, params) -> dict:
  """Plain params for `module.base` with each vector folded into its layer.

  Output scaling multiplies the kernel's output columns and the bias; input
  scaling the kernel's input rows (HF PEFT's IA3 merge).
  """
  hook = _hook(module)
  flat = paths.flatten(params)
  out = {p: v for p, v in flat.items() if p.rsplit('/', 1)[-1] not in LEAVES}
  for p, scale in flat.items():
    if not p.endswith('/' + SCALE):
      continue
    m = p[:-len('/' + SCALE)]
    kernel = flat[f'{m}/kernel']
    scale = jnp.asarray(scale, jnp.float32)
    if m in hook.inputs:
      out[f'{m}/kernel'] = (kernel * scale[:, None]).astype(kernel.dtype)
      continue
    if m in hook.fused_qkv and scale.shape[-1] != kernel.shape[-1]:
      scale = full_scale(scale)
    out[f'{m}/kernel'] = (kernel * scale).astype(kernel.dtype)
    if f'{m}/bias' in flat:
      out[f'{m}/bias'] = (flat[f'{m}/bias'] * scale).astype(flat[f'{m}/bias'].dtype)
  return paths.unflatten(out)


# ------------------------------------------------------------------ HF PEFT layout
# IA3's vector is '<module>.ia3_l', prefixed 'base_model.model.': (out, 1), or
# (1, in) for a feedforward module, (1, n, 1, 1) on a Conv2d; ours ia3_scale
# (n,). A fused q|k|v vector covers q|k|v there (ours k|v: ones go before it).


def ia3_hook(adapted):
  """The run's IA3 hook, or None for other methods."""
  hook = getattr(adapted.module, 'hook', None)
  return hook if isinstance(hook, Hook) else None


def _ia3_modules(flat: dict) -> list:
  """Our module paths that own an IA3 vector."""
  tail = '/' + SCALE
  return sorted(p[:-len(tail)] for p in flat if p.endswith(tail))


def whole_vector(adapted, flat: dict, p: str, shape: tuple) -> bool:
  """Whether `p` is a fused q|k|v vector covering the whole output (from HF PEFT)."""
  hook = ia3_hook(adapted)
  m = p[:-len('/' + SCALE)]
  return (hook is not None and p.endswith('/' + SCALE) and m in hook.fused_qkv
          and shape == tuple(np.shape(flat[f'{m}/kernel']))[-1:])


# ------------------------------------------------------------------ save


def peft_tensors(model, hook, flat: dict) -> tuple[dict, dict]:
  """PEFT's IA3 vectors and config fields. Module lists are full names: PEFT
  matches feedforward_modules by bare suffix, so 'output.dense' would also
  catch BERT's attention.output.dense."""
  modules = _ia3_modules(flat)
  names = hf_names.module_names(model, modules)
  tensors = {}
  for m in modules:
    scale, kernel = np.asarray(flat[f'{m}/{SCALE}']), np.shape(flat[f'{m}/kernel'])
    if m in hook.fused_qkv and scale.shape[-1] != kernel[-1]:
      scale = np.asarray(full_scale(scale))  # HF scales q too: by 1
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
        path, f'scales the outputs of {hf_common.collapse_digits(scaled_out)} and the inputs of '
        f'{hf_common.collapse_digits(scaled_in)}', f'scales the outputs of {hf_common.collapse_digits(mine_out)} '
        f'(peft.ia3.targets) and the inputs of {hf_common.collapse_digits(mine_in)} '
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
  arch = architecture.of(model)
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
    fused = arch.matches('qkv', ours)
    if fused and not on_input and np.all(vector[:size // 3] == 1):
      vector = vector[size // 3:]
    (scaled_in if on_input else scaled_out).add(ours)
    new[f'{ours}/{SCALE}'] = vector
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


# ------------------------------------------------------------------ the method


class IA3(method.Folding):
  name = 'ia3'
  section = 'ia3'
  peft_types = ('IA3',)
  hook, merge = staticmethod(_hook), staticmethod(merge)
  peft_tensors, load = staticmethod(peft_tensors), staticmethod(load)

  def adapt(self, model, cfg) -> base.Adapted:
    return adapt(model, cfg)

  def applies(self, model) -> bool:
    return applies(model)

  def check(self, cfg) -> None:
    _options(cfg)

  def loads_shape(self, adapted, flat, path, shape) -> bool:
    return whole_vector(adapted, flat, path, shape)


method.register(IA3())

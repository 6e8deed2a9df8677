"""LoRA (Hu et al., 2021) and DoRA (Liu et al., 2024) on any zoo model.

`peft.lora.targets` are roles ('q', 'v', 'conv': see models/architecture.py),
HF-style bare module names ('q_proj') or regexes re.search'ed over *module
paths*: a param path without its leaf, such as 'layer_0/attention/self/query'.
Empty means roles q and v on a transformer, conv on a CNN. Every matched
nn.Dense or nn.Conv gets, next to its kernel W (in, out) or (kh, kw, in, out):

  lora_a          (in, r) or (kh, kw, in, r)  kaiming-uniform or gaussian
  lora_b          (r, out)                    zeros, so training starts at the base model
  lora_magnitude  (out,)                      DoRA only: the column norms of W

and computes, through `intercept` (the model files are not edited),

  LoRA: y = x W + b + s (x A) B
  DoRA: y = m / ||W + s A B|| * (x W + s (x A) B) + b   (the norm is a constant)

with s = alpha / r (alpha / sqrt(r) with rsLoRA). For a conv, x A is a conv
with A's kernel size, stride and padding and B a 1x1 conv, as HF PEFT does.
The update is never formed as a full-size matrix while training: x A and
(x A) B are all the gradients see, and DoRA's norm is expanded in A and B.
`merge` folds the updates into the kernels for inference and export;
`unmerge` takes them out again.

Only the LoRA params train, plus a classifier head (a task head is new and
must train; a language model's own head stays frozen, as in HF PEFT).
"""
import collections
import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from finetune_jax import errors
from finetune_jax import quantized
from finetune_jax.models import architecture
from finetune_jax.models import host_init
from finetune_jax.peft import base
from finetune_jax.peft import hf_common
from finetune_jax.peft import hf_names
from finetune_jax.peft import intercept
from finetune_jax.peft import method
from finetune_jax.peft import paths
from finetune_jax.peft.hf_common import PEFT_PREFIX
from finetune_jax.peft.hf_common import PEFT_WEIGHTS

A, B, MAGNITUDE = 'lora_a', 'lora_b', 'lora_magnitude'
LEAVES = (A, B, MAGNITUDE)
INITS = ('kaiming', 'gaussian')
SEED = 0  # lora_a's draw; per leaf, so adding a target leaves the others as they were

# `peft.lora.targets=()` means the first of these the architecture has: the
# attention query and value projections of the transformers (HF PEFT's
# defaults) and the convolutions inside the CNNs' blocks.
DEFAULT_ROLES = (('q', 'v'), ('conv',))

_HIGHEST = jax.lax.Precision.HIGHEST


def scaling(alpha: float, rank: int, rslora: bool) -> float:
  """s in x W + s (x A) B: alpha / r, or rsLoRA's alpha / sqrt(r)."""
  return alpha / math.sqrt(rank) if rslora else alpha / rank


def delta(a, b):
  """A B in the kernel's layout: (..., in, r) x (r, out) -> (..., in, out)."""
  return jnp.einsum('...r,ro->...o', jnp.asarray(a, jnp.float32),
                    jnp.asarray(b, jnp.float32), precision=_HIGHEST)


def column_norm(kernel):
  """||W|| per output feature: over every axis but the last (PEFT's dim=1 of (out, in))."""
  w = jnp.asarray(quantized.dequantize(kernel), jnp.float32)
  return jnp.sqrt(jnp.sum(w * w, axis=tuple(range(w.ndim - 1))))


def factored_norm(kernel, a, b, s):
  """column_norm(W + s A B) without forming A B or any (in, out) array but W.

  ||w + s A b||^2 = ||w||^2 + 2 s b.(A^T w) + s^2 b.(A^T A) b, per column.
  """
  w = jnp.asarray(kernel, jnp.float32).reshape(-1, kernel.shape[-1])
  a = jnp.asarray(a, jnp.float32).reshape(-1, a.shape[-1])
  b = jnp.asarray(b, jnp.float32)
  at_w = jnp.dot(a.T, w, precision=_HIGHEST)  # (r, out)
  gram = jnp.dot(a.T, a, precision=_HIGHEST)  # (r, r)
  squared = (jnp.einsum('io,io->o', w, w, precision=_HIGHEST) + 2 * s * jnp.sum(b * at_w, axis=0)
             + s * s * jnp.sum(b * jnp.dot(gram, b, precision=_HIGHEST), axis=0))
  return jnp.sqrt(jnp.maximum(squared, 0.0))


@dataclasses.dataclass(frozen=True)
class Hook:
  """Adds the low-rank update to each nn.Dense / nn.Conv call that owns one."""
  alpha: float
  rslora: bool
  dropout: float
  dora: bool

  def __call__(self, call: intercept.Call):
    m = call.module
    if not m.has_variable('params', A):
      return call.run()
    intercept.check_layer(call, 'peft.lora.targets', 'LoRA')
    x = call.inputs
    y = call.run()
    a, b = m.get_variable('params', A), m.get_variable('params', B)
    s = scaling(self.alpha, a.shape[-1], self.rslora)
    dropped = self._dropout(call, x)
    update = intercept.matmul(m, _apply_kernel(m, dropped, a), b)
    if not self.dora:
      return (y + s * update).astype(y.dtype)
    kernel = intercept.float_kernel(m)
    if dropped is x:
      base_out = y - m.get_variable('params', 'bias') if m.use_bias else y
    else:  # as HF PEFT: with dropout on, the base term is recomputed on the dropped x
      base_out = _apply_kernel(m, dropped, kernel)
    norm = jax.lax.stop_gradient(factored_norm(kernel, a, b, s))
    g = m.get_variable('params', MAGNITUDE) / norm  # DoRA paper §4.3: the norm is a constant
    return (y + (g - 1) * base_out + g * s * update).astype(y.dtype)

  def _dropout(self, call, x):
    if not call.train or self.dropout == 0:
      return x
    keep = jax.random.bernoulli(call.module.make_rng('dropout'), 1 - self.dropout, x.shape)
    return jnp.where(keep, x / (1 - self.dropout), 0).astype(x.dtype)


def _apply_kernel(m, x, kernel):
  """The layer `m` without bias on another kernel, e.g. x A: a conv with A's
  kernel and the layer's geometry, or a matmul. (The layer's own compact call
  cannot run twice inside one interception.)"""
  if isinstance(m, nn.Conv):
    conv = m.clone(parent=None, features=kernel.shape[-1], use_bias=False)
    return conv.apply({'params': {'kernel': kernel}}, x)
  return intercept.matmul(m, x, kernel)


# ------------------------------------------------------------------ adapt


def adapt(model, cfg, dora: bool = False) -> base.Adapted:
  """LoRA (or DoRA) on the modules `cfg.lora.targets` selects."""
  opts = _options(cfg)
  flat = paths.flatten(model.params)
  if any(p.rsplit('/', 1)[-1] in LEAVES for p in flat):
    raise ValueError('These params already hold LoRA leaves; merge() them first, or '
                     'adapt the plain pretrained model.')
  head_trains = base.trains_head(model)
  skip = model.head + '/' if head_trains else None
  candidates = paths.candidate_modules(flat, skip)
  arch = architecture.of(model)
  what, targets = 'peft.lora.targets', opts['targets']
  if not targets:
    targets = next((roles for roles in DEFAULT_ROLES if arch.has(*roles)), None)
    if targets is None:
      raise ValueError(
          f'peft.lora.targets is empty and {arch.name} has none of the default roles '
          f'{DEFAULT_ROLES}. Set --config.peft.lora.targets, e.g. '
          f'{paths.example_patterns(candidates)}; the Dense/Conv modules are '
          f'{paths.collapse_digits(candidates)}.')
    what = f'the default peft.lora.targets {targets} of {arch.name}'
  targets = select(targets, candidates, what, head=model.head if head_trains else None,
                   arch=arch)
  ranks = _ranks(sorted(targets), opts['rank'], opts['rank_overrides'])
  _check_ranks(ranks, flat)

  new = {}
  for module, r in ranks.items():
    kernel = flat[f'{module}/kernel']  # its shape and dtype: abstract params work too
    # On the host, as the models' own init (host_init.py): no XLA program at load time.
    new[f'{module}/{A}'] = _init_a(f'{module}/{A}', kernel, r, opts['init'])
    new[f'{module}/{B}'] = np.zeros((r, kernel.shape[-1]), kernel.dtype)
    if dora:
      new[f'{module}/{MAGNITUDE}'] = column_norm(kernel).astype(kernel.dtype)
  head = base.head_leaves(model)
  hook = Hook(alpha=float(opts['alpha']), rslora=bool(opts['rslora']),
              dropout=float(opts['dropout']), dora=dora)
  return base.Adapted(intercept.Intercepted(model.module, hook),
                      paths.unflatten({**flat, **new}), frozenset(new) | frozenset(head))


def _options(cfg) -> dict:
  if 'lora' not in cfg:
    raise ValueError('The peft config has no `lora` section; start the config from '
                     'base_config.get_config().')
  c = cfg.lora
  targets = (c.targets,) if isinstance(c.targets, str) else tuple(c.targets)
  overrides = c.rank_overrides
  overrides = list(overrides.items()) if hasattr(overrides, 'items') else list(overrides)
  problems = []
  if not all(isinstance(t, str) for t in targets):
    problems.append(f'peft.lora.targets={c.targets!r} must be role names or regexes (strings), '
                    "e.g. ('q', 'v')")
  if not isinstance(c.rank, int) or c.rank < 1:
    problems.append(f'peft.lora.rank={c.rank!r} must be a positive integer')
  if not c.alpha > 0:
    problems.append(f'peft.lora.alpha={c.alpha!r} must be positive')
  if not 0 <= c.dropout < 1:
    problems.append(f'peft.lora.dropout={c.dropout!r} must be in [0, 1)')
  if c.init not in INITS:
    problems.append(f'peft.lora.init={c.init!r} must be one of {INITS}')
  for entry in overrides:
    if (len(entry) != 2 or not isinstance(entry[0], str) or not isinstance(entry[1], int)
        or entry[1] < 1):
      problems.append(f'peft.lora.rank_overrides entry {entry!r} must be a '
                      '(regex, positive rank) pair, e.g. ("query$", 4)')
  if problems:
    raise ValueError('Bad LoRA options: ' + '; '.join(problems) + '.')
  return {'targets': targets, 'rank': c.rank, 'alpha': c.alpha, 'dropout': c.dropout,
          'rslora': c.rslora, 'init': c.init, 'rank_overrides': overrides}


def select(targets, candidates, what: str, head: str | None = None, arch=None) -> set:
  """The candidates the targets select; a target selecting none is an error."""
  return paths.select_modules(targets, candidates, what, 'peft.lora.targets', 'LoRA', head,
                              arch)


def _ranks(targets, rank, overrides) -> dict:
  """{module: rank}: the first override pattern that matches a module sets its rank."""
  option = 'peft.lora.rank_overrides'
  compiled = []
  for pattern, r in overrides:
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise errors.ConfigError(option, f'{option}: {pattern!r} is not a valid regex ({e}).'
                               ) from None
    if not any(regex.search(t) for t in targets):
      close = errors.nearest(pattern, targets, n=5)
      raise errors.NoMatch(option, pattern, close,
                           f'{option}: {pattern!r} matches none of the LoRA targets; '
                           f'nearest: {close}. Fix or drop the pattern.')
    compiled.append((regex, r))
  return {t: next((r for regex, r in compiled if regex.search(t)), rank) for t in targets}


def _check_ranks(ranks, flat):
  too_big = []
  for module, r in ranks.items():
    shape = tuple(np.shape(flat[f'{module}/kernel']))
    limit = min(math.prod(shape[:-1]), shape[-1])
    if r > limit:
      too_big.append((module, r, shape, limit))
  if too_big:
    listed = '; '.join(f'{m!r} kernel {s} allows {lim}, rank {r} asked'
                       for m, r, s, lim in too_big[:8])
    m, _, _, lim = too_big[0]
    raise ValueError(
        f'The LoRA rank exceeds {len(too_big)} layer(s), at most min(fan_in, out) each: '
        f'{listed}. Lower peft.lora.rank, or cap those layers with '
        f'peft.lora.rank_overrides, e.g. (("{re.escape(m)}$", {lim}),).')


def _init_a(path, kernel, rank, init):
  """As HF PEFT: kaiming-uniform (a=sqrt 5, i.e. U(+-1/sqrt(fan_in))) or N(0, 1/r)."""
  rng = host_init.leaf_rng(SEED, path)
  shape = kernel.shape[:-1] + (rank,)
  if init == 'gaussian':
    return rng.normal(0.0, 1.0 / rank, shape).astype(kernel.dtype)
  bound = 1.0 / math.sqrt(math.prod(kernel.shape[:-1]))
  return rng.uniform(-bound, bound, shape).astype(kernel.dtype)


# ------------------------------------------------------------------ merge


def _hook(module) -> Hook:
  hook = getattr(module, 'hook', None)
  if not isinstance(hook, Hook):
    raise ValueError('Expected the module of a LoRA/DoRA `Adapted` (peft.method lora or '
                     f'dora), got {type(module).__name__}.')
  return hook


def adapted_modules(flat: dict) -> list[str]:
  """Module paths that carry LoRA params in a flat param dict."""
  return sorted(p[:-len('/' + A)] for p in flat if p.endswith('/' + A))


def lora_params(params) -> dict:
  """Only the LoRA/DoRA leaves: what an adapter file holds."""
  return paths.unflatten({p: v for p, v in paths.flatten(params).items()
                          if p.rsplit('/', 1)[-1] in LEAVES})


def merge(module, params, *, return_norms: bool = False):
  """Plain params with each update folded into its kernel, for `module.base`.

  LoRA: W + s A B; DoRA: m (W + s A B) / ||W + s A B||. DoRA's fold cannot
  be inverted from the merged kernel alone, so `return_norms=True` also
  returns {module: ||W + s A B||} for `unmerge` (PEFT caches the same).
  """
  hook = _hook(module)
  flat = paths.flatten(params)
  out = {p: v for p, v in flat.items() if p.rsplit('/', 1)[-1] not in LEAVES}
  norms = {}
  for m in adapted_modules(flat):
    kernel, a = flat[f'{m}/kernel'], flat[f'{m}/{A}']
    v = (jnp.asarray(kernel, jnp.float32)
         + scaling(hook.alpha, a.shape[-1], hook.rslora) * delta(a, flat[f'{m}/{B}']))
    if hook.dora:
      norms[m] = column_norm(v)
      v = v * (flat[f'{m}/{MAGNITUDE}'] / norms[m])
    out[f'{m}/kernel'] = v.astype(kernel.dtype)
  merged = paths.unflatten(out)
  return (merged, norms) if return_norms else merged


def unmerge(module, merged, factors, norms: dict | None = None) -> dict:
  """The adapted params again: kernels from `merge` minus the updates, plus `factors`.

  factors: any tree holding the LoRA leaves (e.g. `lora_params(params)`).
  norms: DoRA only, the second result of `merge(..., return_norms=True)`.
  """
  hook = _hook(module)
  flat = paths.flatten(merged)
  lora = {p: v for p, v in paths.flatten(factors).items() if p.rsplit('/', 1)[-1] in LEAVES}
  out = {**flat, **lora}
  for m in adapted_modules(lora):
    if f'{m}/kernel' not in flat:
      raise ValueError(f'The LoRA factors adapt {m!r}, which the merged params lack: '
                       'are they for another model?')
    kernel, a = flat[f'{m}/kernel'], lora[f'{m}/{A}']
    update = scaling(hook.alpha, a.shape[-1], hook.rslora) * delta(a, lora[f'{m}/{B}'])
    w = jnp.asarray(kernel, jnp.float32)
    if hook.dora:
      if norms is None or m not in norms:
        raise ValueError('DoRA unmerge needs the norms from merge(..., return_norms=True): '
                         'the merged kernel alone does not determine the original.')
      w = w * (norms[m] / lora[f'{m}/{MAGNITUDE}'])
    out[f'{m}/kernel'] = (w - update).astype(kernel.dtype)
  return paths.unflatten(out)


# ------------------------------------------------------------------ HF PEFT layout
# HF PEFT names each LoRA tensor after the transformers *module* it adapts,
# prefixed 'base_model.model.', in torch layouts:
#   lora_A.weight          (r, in)  | (r, in, kh, kw)    ours lora_a (in, r) | (kh, kw, in, r)
#   lora_B.weight          (out, r) | (out, r, 1, 1)     ours lora_b (r, out)
#   lora_magnitude_vector  (out,)   | (1, out, 1, 1)     ours lora_magnitude (out,)
# (Linear and GPT-2's Conv1D | Conv2d.)


def lora_hook(adapted):
  """The run's LoRA/DoRA hook, or None for other methods."""
  hook = getattr(adapted.module, 'hook', None)
  return hook if isinstance(hook, Hook) else None


def _number(x: float):
  return int(x) if float(x).is_integer() else float(x)


# ------------------------------------------------------------------ save


def peft_tensors(model, hook, flat: dict) -> tuple[dict, dict]:
  """PEFT's LoRA/DoRA tensors and the config fields of their own."""
  modules = adapted_modules(flat)
  names = hf_names.module_names(model, modules)
  tensors, ranks = {}, {}
  for m in modules:
    a, b = np.asarray(flat[f'{m}/{A}']), np.asarray(flat[f'{m}/{B}'])
    conv = a.ndim == 4
    key = PEFT_PREFIX + names[m]
    ranks[names[m]] = a.shape[-1]
    tensors[f'{key}.lora_A.weight'] = a.transpose(3, 2, 0, 1) if conv else a.T
    tensors[f'{key}.lora_B.weight'] = b.T[:, :, None, None] if conv else b.T
    if hook.dora:
      magnitude = np.asarray(flat[f'{m}/{MAGNITUDE}'])
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
  candidates = paths.candidate_modules(flat, model.head + '/' if hf_names.has_head(model) else None)
  everything = (set(hf_names.module_names(model, candidates).values())
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
  _check_targets(path, ranks, adapted_modules(flat))
  mine = {m: int(np.shape(flat[f'{m}/{A}'])[-1]) for m in adapted_modules(flat)}
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
    new[f'{ours}/{A}'], new[f'{ours}/{B}'] = a, b
    if 'lora_magnitude_vector' in leaves:
      new[f'{ours}/{MAGNITUDE}'] = leaves['lora_magnitude_vector'].reshape(-1)
  return new, ranks


def _check_options(path, cfg, adapted) -> None:
  """The run's method and LoRA options must be the adapter's."""
  hook = lora_hook(adapted)
  kind = 'dora' if cfg.get('use_dora') else 'lora'
  if hook is None or hook.dora != bool(cfg.get('use_dora')):
    raise ValueError(f'{path} holds a {"DoRA" if kind == "dora" else "LoRA"} adapter; set '
                     f'--config.peft.method={kind} to load it with peft.init_from.')
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
        path, f'adapts {hf_common.collapse_digits(theirs)}',
        f'adapts {hf_common.collapse_digits(mine)} (peft.lora.targets)'
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


# ------------------------------------------------------------------ the method


class LoRA(method.Folding):
  """LoRA, or DoRA with `dora`; both read the `peft.lora` section."""
  section = 'lora'
  peft_types = ('LORA',)
  hook, merge = staticmethod(_hook), staticmethod(merge)
  peft_tensors, load = staticmethod(peft_tensors), staticmethod(load)

  def __init__(self, name: str, dora: bool):
    self.name, self.dora = name, dora

  def adapt(self, model, cfg) -> base.Adapted:
    return adapt(model, cfg, dora=self.dora)

  def applies(self, model) -> bool:
    return any(architecture.of(model).has(*roles) for roles in DEFAULT_ROLES)

  def check(self, cfg) -> None:
    _options(cfg)

  def saved_options(self, adapted) -> dict:
    hook = _hook(adapted.module)
    return {'alpha': hook.alpha, 'rslora': hook.rslora, 'dora': hook.dora}


method.register(LoRA('lora', dora=False))
method.register(LoRA('dora', dora=True))

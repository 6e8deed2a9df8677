"""IA3 (Liu et al., 2022): learned vectors that rescale keys, values and the MLP.

As HF PEFT's IA3, on any zoo transformer through `intercept` (the model files
are not edited). Two regex lists over module paths choose the layers:

  peft.ia3.targets      y = (x W + b) * l   l: (out,)  the key and value projections
  peft.ia3.feedforward  y = (x * l) W + b   l: (in,)   the MLP's down projection,
                                                       i.e. its intermediate activation

Each vector is '<module>/ia3_scale' and starts at ones: training starts at the
base model. GPT-2 fuses q, k and v into one c_attn (out 3D, q|k|v): there the
vector has 2D entries, the k and v scales, and q is multiplied by a fixed 1, as
the paper scales keys and values only. (HF PEFT's c_attn vector has 3D entries
and scales q too; exporting ours means prepending D ones. An imported one whose
q entries are not all 1 stays 3D, and a vector covering the whole output is
used as it is.)

Both lists empty means the family's defaults (HF PEFT's
TRANSFORMERS_MODELS_TO_IA3_*_MODULES_MAPPING, plus ViT); setting either one
chooses by hand, and the other, left empty, then selects nothing. One
difference from HF PEFT's BERT default: its 'output.dense' suffix also catches
attention/output/dense; ours scales the MLP's output/dense only, as the paper.

Only the vectors train, plus a classifier head (a task head is new and must
train; a language model's own head stays frozen, as in HF PEFT).
"""
import dataclasses
import re

import jax.numpy as jnp

from finetune_jax.peft import base
from finetune_jax.peft import intercept
from finetune_jax.peft import paths

SCALE = 'ia3_scale'
LEAVES = (SCALE,)

# Both options () means these, by `model.config['model']`: (targets, feedforward).
DEFAULT_TARGETS = {
    'bert': ((r'attention/self/(key|value)$',), (r'layer_\d+/output/dense$',)),
    'gpt2': ((r'attn/c_attn$',), (r'mlp/c_proj$',)),
    'llama': ((r'self_attn/(k|v)_proj$',), (r'mlp/down_proj$',)),
    'vit': ((r'attention/(key|value)$',), (r'mlp/fc2$',)),
}

# Fused q|k|v projections, by family: their vector covers the k and v thirds.
FUSED_QKV = {'gpt2': r'attn/c_attn$'}


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
  family = model.config.get('model')
  head = model.head if base.trains_head(model) else None
  candidates = paths.candidate_modules(flat, head and head + '/')
  what = 'peft.ia3.targets', 'peft.ia3.feedforward'
  if not targets and not feedforward:
    if family not in DEFAULT_TARGETS:
      raise base.not_applicable(
          model, 'ia3', f'a transformer\'s attention key/value projections and MLP '
          f'({"/".join(sorted(DEFAULT_TARGETS))})',
          'Choose another peft.method (lora, bitfit, ...), or name Dense/Conv layers to '
          'scale in peft.ia3.targets (outputs) or peft.ia3.feedforward (inputs), e.g. '
          f'{paths.example_patterns(candidates)}.')
    targets, feedforward = DEFAULT_TARGETS[family]
    what = tuple(f'the {family} default {w}' for w in what)
  scaled_out = _select(targets, candidates, what[0], 'peft.ia3.targets', head)
  scaled_in = _select(feedforward, candidates, what[1], 'peft.ia3.feedforward', head)
  both = scaled_out & scaled_in
  if both:
    raise ValueError(
        f'IA3: {sorted(both)[:5]} are selected by both peft.ia3.targets (scale the output) '
        'and peft.ia3.feedforward (scale the input); narrow one so each layer gets one vector.')
  fused = {m for m in scaled_out if family in FUSED_QKV and re.search(FUSED_QKV[family], m)}

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


def _options(cfg) -> tuple[tuple, tuple]:
  if 'ia3' not in cfg:
    raise ValueError('The peft config has no `ia3` section; start the config from '
                     'base_config.get_config().')
  as_tuple = lambda v: (v,) if isinstance(v, str) else tuple(v)
  return as_tuple(cfg.ia3.targets), as_tuple(cfg.ia3.feedforward)


def _select(patterns, candidates, what, option, head) -> set:
  if not patterns:
    return set()
  return paths.select_modules(patterns, candidates, what, option, 'IA3', head)


# ------------------------------------------------------------------ merge


def _hook(module) -> Hook:
  hook = getattr(module, 'hook', None)
  if not isinstance(hook, Hook):
    raise ValueError('Expected the module of an IA3 `Adapted` (peft.method ia3), got '
                     f'{type(module).__name__}.')
  return hook


def adapter_params(params) -> dict:
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

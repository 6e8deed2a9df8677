"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021) on any zoo transformer.

Each selected nn.Dense (or nn.Conv, over channels) gets a residual bottleneck
on its output, through `intercept` (the model files are not edited):

  y' = y + up(gelu(down(y)))     down: (d, size), up: (size, d), each with a bias

with the params next to the layer's kernel: '<module>/adapter_down/{kernel,bias}'
and '<module>/adapter_up/{kernel,bias}'. `down` is drawn N(0, 0.01^2) (Houlsby's
near-identity init) and `up` starts at zero, so training starts at the base
model exactly.

`peft.adapter.kind` places them: 'houlsby' after the attention block's output
projection and after the MLP's; 'pfeiffer' after the MLP's only. Both sit on
the projection's output, before the block's dropout, residual and norm
(the roles attn_out and mlp_out: BERT's attention/output/dense and
output/dense, GPT-2's attn/c_proj and mlp/c_proj, ...). `peft.adapter.targets`
(roles, bare names or regexes, as LoRA's), when set, replaces that placement.

Only the adapters train, plus a classifier head (a task head is new and must
train; a language model's own head stays frozen, as in HF PEFT).
"""
import dataclasses

import jax
import jax.numpy as jnp

from finetune_jax.models import architecture
from finetune_jax.models import host_init
from finetune_jax.peft import base
from finetune_jax.peft import intercept
from finetune_jax.peft import method
from finetune_jax.peft import paths

DOWN, UP = 'adapter_down', 'adapter_up'
LEAVES = (DOWN, UP)  # subtrees of the adapted module, each {kernel, bias}
SEED = 0  # the down projections' draw; per leaf, so adding a target leaves the others
DOWN_STD = 0.01

# The roles `peft.adapter.kind` places adapters on, when no targets are given.
KIND_ROLES = {'houlsby': ('attn_out', 'mlp_out'), 'pfeiffer': ('mlp_out',)}
KINDS = tuple(KIND_ROLES)


@dataclasses.dataclass(frozen=True)
class Hook:
  """Adds the bottleneck to the output of each layer that owns one."""

  def __call__(self, call: intercept.Call):
    m = call.module
    if not m.has_variable('params', DOWN):
      return call.run()
    intercept.check_layer(call, 'peft.adapter.targets', 'A bottleneck adapter')
    y = call.run()
    down, up = m.get_variable('params', DOWN), m.get_variable('params', UP)
    h = intercept.matmul(m, y, down['kernel']) + down['bias']
    h = jax.nn.gelu(h, approximate=False)
    h = intercept.matmul(m, h, up['kernel']) + up['bias']
    return (y + h).astype(y.dtype)


def adapt(model, cfg) -> base.Adapted:
  """Bottleneck adapters of `cfg.adapter.size` on the modules `kind` or `targets` pick."""
  kind, size, targets = _options(cfg)
  flat = paths.flatten(model.params)
  if any(leaf in LEAVES for p in flat for leaf in p.split('/')):
    raise ValueError('These params already hold bottleneck adapters; adapt the plain '
                     'pretrained model.')
  arch = architecture.of(model)
  head = model.head if base.trains_head(model) else None
  candidates = paths.candidate_modules(flat, head and head + '/')
  what = 'peft.adapter.targets'
  if not targets:
    if not applies(model):
      raise base.not_applicable(
          model, 'adapter', 'transformer blocks with attention and MLP output projections '
          f'({"/".join(architecture.with_roles(*KIND_ROLES["houlsby"]))})',
          'Choose another peft.method (lora, bitfit, ...), or name the Dense/Conv layers '
          f'to adapt in peft.adapter.targets, e.g. {paths.example_patterns(candidates)}.')
    targets = KIND_ROLES[kind]
    what = f'the {kind} peft.adapter.targets {targets} of {arch.name}'
  modules = paths.select_modules(targets, candidates, what, 'peft.adapter.targets',
                                 'adapter', head, arch)
  new = {}
  for module in sorted(modules):
    kernel = flat[f'{module}/kernel']
    d, dtype = kernel.shape[-1], kernel.dtype
    rng = host_init.leaf_rng(SEED, f'{module}/{DOWN}/kernel')
    new[f'{module}/{DOWN}/kernel'] = jnp.asarray(rng.normal(0.0, DOWN_STD, (d, size)), dtype)
    new[f'{module}/{DOWN}/bias'] = jnp.zeros((size,), dtype)
    new[f'{module}/{UP}/kernel'] = jnp.zeros((size, d), dtype)
    new[f'{module}/{UP}/bias'] = jnp.zeros((d,), dtype)
  return base.Adapted(intercept.Intercepted(model.module, Hook()),
                      paths.unflatten({**flat, **new}),
                      frozenset(new) | base.head_leaves(model))


def applies(model) -> bool:
  """Whether the model has attention and MLP output projections (roles)."""
  return architecture.of(model).has(*KIND_ROLES['houlsby'])


def _options(cfg) -> tuple[str, int, tuple]:
  if 'adapter' not in cfg:
    raise ValueError('The peft config has no `adapter` section; start the config from '
                     'base_config.get_config().')
  c = cfg.adapter
  problems = []
  if c.kind not in KINDS:
    problems.append(f'peft.adapter.kind={c.kind!r} must be one of {KINDS}')
  if not isinstance(c.size, int) or isinstance(c.size, bool) or c.size < 1:
    problems.append(f'peft.adapter.size={c.size!r} must be a positive integer')
  if problems:
    raise ValueError('Bad adapter options: ' + '; '.join(problems) + '.')
  targets = (c.targets,) if isinstance(c.targets, str) else tuple(c.targets)
  return c.kind, c.size, targets


def adapted_modules(flat: dict) -> list[str]:
  """Module paths that carry an adapter in a flat param dict."""
  suffix = f'/{DOWN}/kernel'
  return sorted(p[:-len(suffix)] for p in flat if p.endswith(suffix))


def adapter_params(params) -> dict:
  """Only the adapter subtrees: what an adapter file holds."""
  return paths.unflatten({p: v for p, v in paths.flatten(params).items()
                          if any(leaf in LEAVES for leaf in p.split('/'))})


class Adapter(method.Method):
  """Bottleneck adapters: HF PEFT has no such tuner, and they do not fold."""
  name = 'adapter'
  section = 'adapter'

  def adapt(self, model, cfg) -> base.Adapted:
    return adapt(model, cfg)

  def applies(self, model) -> bool:
    return applies(model)

  def check(self, cfg) -> None:
    _options(cfg)


method.register(Adapter())

"""What loaders, methods and exporters ask of a model family, registered once per family.

An `Architecture` names its layers by **role** (`q`, `k`, `v`, `attn_out`,
`mlp_in`, `mlp_out`, `embed`, `conv`, ...), each a regex over module paths,
so that a method says "LoRA on q and v" once instead of keeping a table of
families. It builds and initialises its module (for the loading skeleton in
`registry`), names the checkpoint formats it reads (`Reader`), and says whether
the model decodes (per-token outputs and a key/value cache) and how it maps
onto transformers (`HFLayout`), if it does.

Targets in a method's config are resolved by `Architecture.pattern`: a role
name, an HF-style bare module name (`q_proj` matches a module whose last name
is q_proj, as HF PEFT's target_modules), or else a regex re.search-ed over
module paths.
"""
import dataclasses
import importlib.metadata
import re
from typing import Callable, Mapping

from finetune_jax import formats

ROLES = {
    'q': 'attention query projection',
    'k': 'attention key projection',
    'v': 'attention value projection',
    'qkv': 'a fused query|key|value projection (its output is q, k, v side by side)',
    'attn_out': "attention output projection",
    'mlp_in': "the MLP's input projections",
    'mlp_out': "the MLP's output (down) projection",
    'embed': 'the token embedding table',
    'conv': "the convolutions inside the CNN's blocks",
}
_BARE_NAME = re.compile(r'[A-Za-z_][A-Za-z0-9_]*')


@dataclasses.dataclass(frozen=True)
class HFLayout:
  """How a family maps onto transformers; pairs are (with a head, without)."""
  to_hf: Callable  # (nested params, our config, prefix) -> {HF state-dict name: array}
  # (our param path, our config, prefix) -> its HF state-dict name: the table `to_hf` uses.
  name: Callable
  hf_config: Callable  # our config -> config.json; raises for what transformers lacks
  prefix: tuple  # of the body's module names
  task_type: tuple  # HF PEFT's task_type
  fan_in_fan_out: bool = False  # GPT-2's Conv1D keeps weights (in, out)
  # Linear modules transformers builds that our params lack: (config, has_head) -> names.
  extra_modules: Callable = lambda config, has_head: set()
  # (config, has_head) -> a warning for exports whose logits transformers computes otherwise.
  export_warning: Callable = lambda config, has_head: None
  # Extra JSON files of a transformers dir: {file name: (our config) -> dict}.
  extra_files: Mapping = dataclasses.field(default_factory=dict)
  # Why HF PEFT cannot run prefix tuning on it (None: it can).
  no_prefix_why: str | None = None
  # transformers >= 5 module renames (re.sub pairs) of checkpoint names, e.g. ViT's.
  v5_renames: tuple = ()

  def runtime_name(self, name: str) -> str:
    """A checkpoint module name as the installed transformers names the module."""
    return self.v5_name(name) if transformers_major() >= 5 else name

  def v5_name(self, name: str) -> str:
    for pattern, repl in self.v5_renames:
      name = re.sub(pattern, repl, name)
    return name


@dataclasses.dataclass(frozen=True)
class Reader:
  """A checkpoint format an architecture reads."""
  formats: tuple  # of `formats.FORMATS` keys
  claims: Callable[[str], bool]  # does this file hold this architecture?
  # (path, *, num_classes, dont_load, seed, image_size, **options) -> registry.Pretrained
  load: Callable

  def __post_init__(self):
    unknown = set(self.formats) - set(formats.FORMATS)
    if unknown:
      raise ValueError(f'Unknown checkpoint formats {sorted(unknown)}; known: '
                       f'{list(formats.FORMATS)}.')


@dataclasses.dataclass(frozen=True)
class Architecture:
  name: str  # `Pretrained.config['model']`
  roles: Mapping[str, str]  # role -> regex over module paths
  # The flax module class; its fields are the config's architecture keys (`build`).
  module: type
  # (module, seed, draw) -> params; draw(path) says which leaves to draw (None: all).
  init: Callable
  # Our config -> top-level param keys from input to output, the head excluded.
  blocks: Callable
  # Top-level param key of the classifier (or LM head).
  head: str = 'head'
  # Our config -> (uint8 NHWC, image_size=None) -> model input; None for text models.
  preprocess: Callable | None = None
  decoder: bool = False  # per-token logits and cached generation
  hf: HFLayout | None = None  # None: no transformers layout
  readers: tuple[Reader, ...] = ()  # the checkpoint files it loads, tried in order
  title: str = ''  # its name in prose ('GPT-2'); `name` when empty

  def __post_init__(self):
    if not self.title:
      object.__setattr__(self, 'title', self.name)

  def build(self, config: Mapping):
    return build_module(self.module, config)

  def has(self, *roles: str) -> bool:
    return all(r in self.roles for r in roles)

  def pattern(self, target: str) -> str:
    """The regex a config target stands for: a role's, a bare name's, or itself."""
    if target in self.roles:
      return self.roles[target]
    if _BARE_NAME.fullmatch(target) and target not in ROLES:
      return rf'(^|/){target}$'
    if target in ROLES:
      raise ValueError(
          f'{target!r} names a role ({ROLES[target]}) that {self.name} lacks; its roles are '
          f'{sorted(self.roles)}. Use one of those, or a regex over module paths.')
    return target

  def matches(self, role: str, module: str) -> bool:
    return role in self.roles and re.search(self.roles[role], module) is not None


def build_module(module_cls: type, config: Mapping):
  """`module_cls(**config)`, as vit_jax passes `**config.model`.

  A config's keys that are not the module's fields (`model`, `variant`,
  preprocessing statistics) say what the module is and are left out; JSON's
  lists come back as the tuples the (hashable) module fields hold.
  """
  fields = {f.name for f in dataclasses.fields(module_cls) if f.init} - {'parent', 'name'}
  return module_cls(**{k: _as_tuples(v) for k, v in config.items() if k in fields})


def _as_tuples(value):
  return tuple(map(_as_tuples, value)) if isinstance(value, list) else value


_ARCHITECTURES: dict[str, Architecture] = {}


def register(architecture: Architecture) -> Architecture:
  unknown = set(architecture.roles) - set(ROLES)
  if unknown:
    raise ValueError(f'{architecture.name}: unknown roles {sorted(unknown)}; the roles are '
                     f'{sorted(ROLES)} (add a new one to architecture.ROLES).')
  if architecture.name in _ARCHITECTURES:
    raise ValueError(f'Architecture {architecture.name!r} is registered twice.')
  _ARCHITECTURES[architecture.name] = architecture
  return architecture


def of(model) -> Architecture:
  """The architecture of a `Pretrained` model."""
  name = model.config.get('model')
  if name not in _ARCHITECTURES:
    raise ValueError(f'Model family {name!r} is not a registered architecture; known: '
                     f'{sorted(_ARCHITECTURES)}.')
  return _ARCHITECTURES[name]


def with_roles(*roles: str) -> list[str]:
  """The names of the architectures that have every one of `roles`."""
  return sorted(n for n, a in _ARCHITECTURES.items() if a.has(*roles))


def all_architectures() -> list[Architecture]:
  return [_ARCHITECTURES[n] for n in sorted(_ARCHITECTURES)]


def transformers_major() -> int:
  """The installed transformers' major version; 5 (today's) when it is absent."""
  try:
    return int(importlib.metadata.version('transformers').split('.')[0])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return 5

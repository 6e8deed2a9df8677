"""A fine-tuning method is one object, registered by its `peft.method` name.

As HF PEFT registers a (config, tuner) pair, each method's file defines a
`Method` subclass and registers an instance; drivers (train, export,
sampling, hf_format) ask the method and never test which one it is:

  adapt(model, cfg)           the `Adapted` model (cfg: the `peft` section)
  applies(model)              whether its defaults fit the model (its roles, its head)
  check(cfg)                  its own config section, validated on its own
  merged(adapted, params)     plain model params with what it learned folded in
  to_peft / from_peft         its Hugging Face PEFT tensors and config, both ways
  reserved_positions(adapted) positions of the context it takes before the input
  probe_steps                 steps at the start in which only the new head trains
  saved_options(adapted)      options an adapter file must agree on to load
"""
from finetune_jax.peft import base
from finetune_jax.peft import hf_common
from finetune_jax.peft import hf_names
from finetune_jax.peft import paths


class Method:
  """The defaults: a method with no merged form and no HF PEFT layout."""
  name: str = ''
  section: str | None = None  # its config section under `peft`; None: it has none
  peft_types: tuple = ()  # HF PEFT `peft_type` values it writes (the first) and reads
  mergeable: bool = False  # `merged` gives the plain model's params
  probe_steps: int = 0  # steps at the start in which only the head trains (lp_ft)

  @property
  def fields(self) -> tuple:
    """The `peft` config fields that are this method's own (a run's identity)."""
    return (self.section,) if self.section else ()

  def adapt(self, model, cfg) -> base.Adapted:
    raise NotImplementedError

  def applies(self, model) -> bool:
    """Whether the method, with its defaults, applies to `model` (else `adapt` raises
    errors.NotApplicable)."""
    return True

  def check(self, cfg) -> None:
    """Raises for a bad option in the method's own section (default: none to check)."""

  def merged(self, adapted, params) -> dict:
    raise unsupported(self.name, 'merged', with_('merged'))

  def to_peft(self, model, adapted, params) -> tuple[dict, dict, str]:
    """(tensors, adapter_config.json fields of its own, the head tensors' key prefix)."""
    raise unsupported(self.name, 'peft', with_('peft'))

  def from_peft(self, adapted, model, path: str, cfg: dict) -> base.Adapted:
    raise NotImplementedError

  def reserved_positions(self, adapted) -> int:
    return base.reserved_positions(adapted.module)

  def saved_options(self, adapted) -> dict | None:
    return None

  def loads_shape(self, adapted, flat: dict, path: str, shape: tuple) -> bool:
    """Whether an adapter tensor of another shape than ours may load at `path`."""
    return False


class Folding(Method):
  """A method whose params sit beside the layers it changes, read by a hook
  (peft.intercept), and fold into their weights: LoRA, DoRA, IA3.

  A subclass gives, as static functions of its file: `hook(module)`,
  `merge(module, params)`, `peft_tensors(model, hook, flat)` -> (tensors, config)
  and `load(adapted, model, path, cfg)` (an HF PEFT dir).
  """
  mergeable = True

  def merged(self, adapted, params) -> dict:
    return self.merge(adapted.module, params)

  def to_peft(self, model, adapted, params):
    tensors, config = self.peft_tensors(model, self.hook(adapted.module),
                                        paths.flatten(params))
    config['fan_in_fan_out'] = hf_names.family(model).fan_in_fan_out
    return tensors, config, hf_common.PEFT_PREFIX

  def from_peft(self, adapted, model, path, cfg):
    return self.load(adapted, model, path, cfg)


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
  if method.name in _METHODS:
    raise ValueError(f'peft.method {method.name!r} is registered twice.')
  _METHODS[method.name] = method
  return method


def get(name: str) -> Method:
  if name not in _METHODS:
    raise ValueError(f'Unknown peft.method {name!r}; known methods: {names()}.')
  return _METHODS[name]


def names() -> list[str]:
  return sorted(_METHODS)


def reading(peft_type) -> Method | None:
  """The method that reads HF PEFT dirs of `peft_type`, or None."""
  return next((m for m in _METHODS.values() if peft_type in m.peft_types), None)


def with_(fmt: str) -> list[str]:
  """The methods that export `--format fmt` ('merged' or 'peft'), for messages."""
  has = {'merged': lambda m: m.mergeable, 'peft': lambda m: bool(m.peft_types)}[fmt]
  return [n for n, m in sorted(_METHODS.items()) if has(m)]


def unsupported(method: str, fmt: str, supported) -> ValueError:
  return ValueError(f'--format {fmt} is not supported yet for peft.method={method!r}; it '
                    f'covers {", ".join(supported)}. --format adapter saves any method.')

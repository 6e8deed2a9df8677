"""ResNet: random-init aliases and loaders for torchvision/timm, HF and Keras checkpoints.

No pretrained ResNet weights ship offline, so every alias is random init;
point `pretrained` at a checkpoint instead:
  *.pth/.pt/.bin, *.safetensors   torchvision or timm state dict (resnet18..152)
  dir with config.json            transformers ResNet (model_type 'resnet'), or a
                                  timm hub dir ('architecture': 'resnet50', ...)
  *.h5 / *.weights.h5             keras.applications ResNet50/101/152 (v1)
The depth is read from the checkpoint's keys; a name that says otherwise
('resnet50.pth' holding a ResNet-18) is an error.
"""
import functools
import re

from finetune_jax.formats import hf_dir
from finetune_jax.formats import keras_h5
from finetune_jax.formats.torch_state_dict import load_torch_state_dict
from finetune_jax.models import architecture
from finetune_jax.models import registry
from finetune_jax.models.resnet import convert as convert_resnet
from finetune_jax.models.resnet import model as resnet

# keras.applications ResNet v1: stride in the first 1x1 conv, conv biases,
# eps 1.001e-5, Caffe input (BGR, mean subtracted, not scaled).
KERAS_OVERRIDES = dict(
    stride_in_1x1=True, conv_bias=True, bn_epsilon=1.001e-5, channel_order='bgr',
    pixel_mean=resnet.CAFFE_MEAN_BGR, pixel_std=(1.0, 1.0, 1.0))


def load_random(path, *, variant, num_classes, dont_load, seed, image_size=None):
  del path, image_size  # Convolutional: any resolution runs with the same params.
  return registry.random_init(ARCHITECTURE, resnet.make_config(variant, num_classes),
                              dont_load=dont_load, seed=seed)


def _check_variant_arg(variant: str | None) -> None:
  if variant is not None and variant not in resnet.DEPTHS:
    raise ValueError(f'variant={variant!r} is not one of {list(resnet.DEPTHS)}.')


def _check_depth(found: str, expected: str | None, source: str, why: str) -> None:
  if expected and expected in resnet.DEPTHS and expected != found:
    raise ValueError(
        f'{source}: {why} {expected}, but the checkpoint holds a {found} '
        f'({resnet.DEPTHS[found][0]} blocks, {list(resnet.DEPTHS[found][1])} per '
        f'stage). Use the right file, or rename it.')


def _checked_depth(tensors, layout: str, variant: str | None, path: str) -> str:
  """The depth the keys say, checked against `variant` and the file's name."""
  found = convert_resnet.infer_variant(tensors, layout, source=path)
  _check_depth(found, variant, path, 'expected a')
  _check_depth(found, resnet.variant_in_name(path), path, 'its name says')
  return found


def _load(tensors, layout, config, *, num_classes, dont_load, seed, source):
  """Loads converted `tensors` into a fresh `config` model; head per num_classes."""
  ckpt_classes = convert_resnet.num_classes_in(tensors, layout)
  loaded = convert_resnet.to_params(tensors, layout, source)  # unmapped keys fail fast
  return registry.from_checkpoint(
      ARCHITECTURE, {**config, 'num_classes': ckpt_classes}, loaded, source=source,
      dont_load=dont_load, seed=seed, num_classes=num_classes, checkpoint_classes=ckpt_classes)


# ------------------------------------------------------------------ torch / timm


def _read_state_dict(path: str) -> dict:
  if path.endswith('.safetensors'):
    tensors = hf_dir.read_safetensors(path)
  else:
    tensors = load_torch_state_dict(path)
  return convert_resnet.strip_module_prefix(tensors)


def load_state_dict(path, *, num_classes, dont_load, seed, image_size=None,
                    variant=None, stride_in_1x1=False):
  """A torchvision/timm ResNet state dict (.pth/.pt/.bin, read without pickle
  code, or .safetensors). `variant` ('resnet50') asserts the depth;
  `stride_in_1x1` for v1 weights in torchvision layout (e.g. from Caffe)."""
  del image_size  # Convolutional: any resolution runs with the same params.
  _check_variant_arg(variant)  # before reading the file
  tensors = _read_state_dict(path)
  found = _checked_depth(tensors, 'torch', variant, path)
  config = resnet.make_config(found, stride_in_1x1=stride_in_1x1)
  return _load(tensors, 'torch', config, num_classes=num_classes,
               dont_load=dont_load, seed=seed, source=path)


def _claims_state_dict(path: str) -> bool:
  keys = _read_state_dict(path)
  return 'layer1.0.conv1.weight' in keys and any(k.startswith('conv1.') for k in keys)


# ------------------------------------------------------------------ HF dirs

_TIMM_ARCH = re.compile(r'^resnet\d+[a-z]*$')


def _hf_to_config(hf: dict, source: str) -> dict:
  """Our config from a transformers ResNetConfig dict."""
  unsupported = []
  if hf.get('hidden_act', 'relu') != 'relu':
    unsupported.append(f"hidden_act={hf['hidden_act']!r} (only 'relu')")
  if hf.get('num_channels', 3) != 3:
    unsupported.append(f"num_channels={hf['num_channels']} (only 3)")
  if unsupported:
    raise ValueError(f'{source}: unsupported ResNet config: {", ".join(unsupported)}.')
  try:
    block = hf.get('layer_type', 'bottleneck')
    depths = list(hf.get('depths', [3, 4, 6, 3]))
    sizes = list(hf.get('hidden_sizes', [256, 512, 1024, 2048]))
    overrides = dict(
        block=block, stage_sizes=depths, stage_features=sizes,
        stem_features=hf.get('embedding_size', 64),
        first_stage_stride=2 if hf.get('downsample_in_first_stage', False) else 1,
        stride_in_1x1=bool(hf.get('downsample_in_bottleneck', False)))
    standard = resnet.variant_of(block, depths)
    if standard and sizes == list(resnet.STAGE_FEATURES[block]):
      return resnet.make_config(standard, **overrides)
    return resnet.make_config('custom', **overrides)
  except (ValueError, TypeError) as e:
    raise ValueError(f'{source}/config.json: not a ResNet config this model '
                     f'builds ({e}).') from None


def load_hf_dir(path, *, num_classes, dont_load, seed, image_size=None):
  """A transformers ResNet(ForImageClassification|Model) dir, or a timm hub dir."""
  del image_size  # Convolutional: any resolution runs with the same params.
  config_json, tensors = hf_dir.read_hf_dir(path)
  if config_json.get('model_type') == 'resnet':
    tensors = convert_resnet.strip_hf_prefix(tensors)
    config = _hf_to_config(config_json, path)
    layout = 'hf'
    found = resnet.variant_of(config['block'], config['stage_sizes'])
    if found and config['variant'] != 'custom':
      _check_depth(found, resnet.variant_in_name(path), path, 'its name says')
  else:  # timm: torchvision names, preprocessing in pretrained_cfg
    tensors = convert_resnet.strip_module_prefix(tensors)
    layout = 'torch'
    found = convert_resnet.infer_variant(tensors, layout, source=path)
    _check_depth(found, config_json.get('architecture'), path, 'config.json says')
    _check_depth(found, resnet.variant_in_name(path), path, 'its name says')
    cfg = config_json.get('pretrained_cfg', {})
    overrides = {}
    if 'mean' in cfg and 'std' in cfg:
      overrides.update(pixel_mean=[255 * m for m in cfg['mean']],
                       pixel_std=[255 * s for s in cfg['std']])
    if 'input_size' in cfg:
      overrides['image_size'] = int(cfg['input_size'][-1])
    config = resnet.make_config(found, **overrides)
  return _load(tensors, layout, config, num_classes=num_classes,
               dont_load=dont_load, seed=seed, source=path)


def _claims_hf_dir(path: str) -> bool:
  config = hf_dir.read_config(path)
  return config.get('model_type') == 'resnet' or (
      'model_type' not in config and bool(_TIMM_ARCH.match(str(config.get('architecture', '')))))


# ------------------------------------------------------------------ Keras


def _read_keras(path: str, shapes_only: bool = False) -> dict:
  if shapes_only:
    return keras_h5.keras_weight_shapes(path)
  return keras_h5.read_keras_weights(path)


def load_keras(path, *, num_classes, dont_load, seed, image_size=None, variant=None):
  """keras.applications ResNet50/101/152 weights (.weights.h5 or legacy .h5)."""
  del image_size  # Convolutional: any resolution runs with the same params.
  _check_variant_arg(variant)  # before reading the file
  tensors = _read_keras(path)
  found = _checked_depth(tensors, 'keras', variant, path)
  config = resnet.make_config(found, **KERAS_OVERRIDES)
  return _load(tensors, 'keras', config, num_classes=num_classes,
               dont_load=dont_load, seed=seed, source=path)


def _claims_keras(path: str) -> bool:
  return any(k.startswith('conv2_block1_1_conv/') for k in _read_keras(path, shapes_only=True))


# ------------------------------------------------------------------ aliases and architecture

for _name in ('resnet18', 'resnet34', 'resnet50', 'resnet101'):
  _block, _sizes = resnet.DEPTHS[_name]
  registry.register_alias(
      f'{_name}-random', functools.partial(load_random, variant=_name),
      f'ResNet-{_name[6:]} v1.5 ({_block} blocks {list(_sizes)}), random init '
      f'(torchvision\'s), ImageNet normalisation')
registry.register_alias(
    'resnet-tiny', functools.partial(load_random, variant='tiny'),
    'ResNet, tiny random init (4 one-block bottleneck stages, 32 px; tests)')


ARCHITECTURE = architecture.register(architecture.Architecture(
    'resnet', title='ResNet', roles={'conv': r'_block\d+/conv\d$'}, module=resnet.ResNet,
    init=resnet.init_params,
    blocks=resnet.block_names, preprocess=resnet.make_preprocess,
    readers=(architecture.Reader(('torch', 'safetensors'), _claims_state_dict, load_state_dict),
             architecture.Reader(('hf_dir',), _claims_hf_dir, load_hf_dir),
             architecture.Reader(('keras_h5',), _claims_keras, load_keras))))

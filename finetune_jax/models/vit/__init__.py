"""ViT: random-init aliases, and loaders for HF dirs and vit_jax/big_vision npz.

Every loader also takes `image_size=None`: the resolution to fine-tune at.
When it differs from the checkpoint's, the patch grid of the position
embeddings is resampled bilinearly (the class token's slot is kept), as
vit_jax and big_vision do; `None` keeps the checkpoint's resolution.
"""
import functools
import json
import os
import zipfile


from finetune_jax.formats import hf_dir
from finetune_jax.models import architecture
from finetune_jax.models import registry
from finetune_jax.models.vit import convert as convert_vit
from finetune_jax.models.vit import model as vit


def _size(image_size) -> dict:
  return {} if image_size is None else {'image_size': image_size}


def load_random(path, *, variant, num_classes, dont_load, seed, image_size=None):
  del path
  config = vit.make_config(variant, num_classes, **_size(image_size))
  return registry.random_init(ARCHITECTURE, config, dont_load=dont_load, seed=seed)


def _from_checkpoint(flat: dict, arch: dict, *, source, num_classes, dont_load,
                     seed, image_size) -> registry.Pretrained:
  """Builds the model `arch` describes at `image_size` and loads `flat` into it."""
  ckpt_classes = convert_vit.num_classes_in(flat)
  config = vit.make_config(None, num_classes=ckpt_classes, **{**arch, **_size(image_size)})
  config['variant'] = vit.variant_of(config)
  if config['image_size'] != arch['image_size']:
    flat = {**flat, 'pos_embedding': vit.resize_pos_embedding(
        flat['pos_embedding'], vit.grid_size(config), config['classifier'] == 'token')}
  return registry.from_checkpoint(
      ARCHITECTURE, config, flat, source=source, dont_load=dont_load, seed=seed,
      num_classes=num_classes, checkpoint_classes=ckpt_classes)


def _hf_normalisation(model_dir: str) -> dict:
  """mean_rgb/stddev_rgb (0..255) from preprocessor_config.json; [-1, 1] without one."""
  path = os.path.join(model_dir, 'preprocessor_config.json')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    processor = json.load(f)
  if not processor.get('do_normalize', True):
    return dict(mean_rgb=[0.0] * 3, stddev_rgb=[255.0] * 3)
  mean, std = processor.get('image_mean'), processor.get('image_std')
  if mean is None or std is None:
    return {}
  return dict(mean_rgb=[255.0 * m for m in mean], stddev_rgb=[255.0 * s for s in std])


def load_hf_dir(path, *, num_classes, dont_load, seed, image_size=None):
  """A transformers ViTForImageClassification / ViTModel dir (config.json + safetensors).

  A ViTModel's pooler (Dense + tanh on the class token) becomes `pre_logits`,
  so `features` is its pooler_output; otherwise the class token after the
  final LayerNorm, as ViTForImageClassification feeds its classifier.
  """
  hf_config, tensors = hf_dir.read_hf_dir(path)
  arch = convert_vit.hf_architecture(hf_config, source=path)
  flat = convert_vit.hf_to_params(tensors, source=path)
  if 'pre_logits/kernel' in flat:
    arch['representation_size'] = int(flat['pre_logits/kernel'].shape[-1])
  arch.update(_hf_normalisation(path))
  return _from_checkpoint(flat, arch, source=path, num_classes=num_classes,
                          dont_load=dont_load, seed=seed, image_size=image_size)


def load_npz(path, *, num_classes, dont_load, seed, image_size=None, num_heads=None):
  """A vit_jax or big_vision ViT .npz (learned position embeddings, token or gap pooling).

  num_heads: None takes it from a standard width (Ti/S/M/B/L/...); give it
    for non-standard models.
  """
  flat = convert_vit.npz_to_params(convert_vit.read_npz(path), source=path)
  arch = convert_vit.architecture_from_shapes(flat, num_heads=num_heads, source=path)
  return _from_checkpoint(flat, arch, source=path, num_classes=num_classes,
                          dont_load=dont_load, seed=seed, image_size=image_size)


def _claims_hf_dir(path: str) -> bool:
  return hf_dir.read_config(path).get('model_type') == 'vit'


def _claims_npz(path: str) -> bool:
  try:
    with convert_vit.open_npz(path) as npz:
      keys = npz.files
  except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
    raise convert_vit.unreadable_npz(path, e) from None
  keys = [k[len('params/'):] if k.startswith('params/') else k for k in keys]
  return 'embedding/kernel' in keys and any(k.startswith('Transformer/encoderblock') for k in keys)


_RANDOM = {
    'ti16': 'ViT-Ti/16 (5.7M params, 224 px), random init',
    's16': 'ViT-S/16 (22.1M params, 224 px), random init',
    'b16': 'ViT-B/16 (86.6M params, 224 px), random init',
    'b32': 'ViT-B/32 (88.2M params, 224 px), random init',
}
for _variant, _description in _RANDOM.items():
  registry.register_alias(f'vit-{_variant}-random',
                          functools.partial(load_random, variant=_variant), _description)
registry.register_alias('vit-tiny', functools.partial(load_random, variant='tiny'),
                        'ViT, tiny random init (2 blocks, width 32, patch 8, 32 px; tests)')


ARCHITECTURE = architecture.register(architecture.Architecture(
    'vit', title='ViT', module=vit.VisionTransformer,
    init=vit.init_params,
    blocks=vit.block_names, preprocess=vit.make_preprocess,
    roles={'q': r'attention/query$', 'k': r'attention/key$', 'v': r'attention/value$',
           'attn_out': r'attention/out$', 'mlp_in': r'mlp/fc1$', 'mlp_out': r'mlp/fc2$'},
    hf=architecture.HFLayout(
        lambda p, c, prefix: convert_vit.params_to_hf(p, prefix=prefix),
        lambda path, c, prefix: convert_vit.hf_name(path, prefix),
        convert_vit.hf_config, ('vit.', ''), (None, None),
        extra_modules=lambda c, has_head: (
            set() if has_head or c.get('representation_size') else {'pooler.dense'}),
        extra_files={'preprocessor_config.json': convert_vit.hf_preprocessor_config},
        v5_renames=convert_vit.V5_MODULE_RENAMES),
    readers=(architecture.Reader(('hf_dir',), _claims_hf_dir, load_hf_dir),
             architecture.Reader(('npz',), _claims_npz, load_npz))))

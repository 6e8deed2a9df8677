"""ResNet checkpoints -> our ResNet param tree: torchvision/timm, HF, Keras.

Three layouts, each mapped key by key (our tree: see models/resnet/model.py):

  ours                       torchvision / timm        HF transformers                                   Keras
  stem/conv                  conv1                     embedder.embedder.convolution                     conv1_conv
  stem/bn                    bn1                       embedder.embedder.normalization                   conv1_bn
  stage{s}_block{b}/conv{n}  layer{s}.{b-1}.conv{n}    encoder.stages.{s-1}.layers.{b-1}.layer.{n-1}.convolution    conv{s+1}_block{b}_{n}_conv
  stage{s}_block{b}/bn{n}    layer{s}.{b-1}.bn{n}      encoder.stages.{s-1}.layers.{b-1}.layer.{n-1}.normalization  conv{s+1}_block{b}_{n}_bn
  .../shortcut_conv          ....downsample.0          ....shortcut.convolution                          conv{s+1}_block{b}_0_conv
  .../shortcut_bn            ....downsample.1          ....shortcut.normalization                        conv{s+1}_block{b}_0_bn
  head                       fc                        classifier.1                                      predictions

(HF keys carry a `resnet.` prefix in ResNetForImageClassification.) Torch
convs (O, I, kh, kw) become (kh, kw, I, O), linear (O, I) becomes (I, O);
Keras is already HWIO / (in, out). BN leaves: weight/gamma -> scale,
bias/beta -> bias, running_mean/moving_mean -> mean, running_var/
moving_variance -> var. `num_batches_tracked` is dropped; any other key that
maps to nothing is an error, so nothing is ignored silently.

timm's plain ResNets (resnet18 ... resnet152, any pretrained tag) use the
torchvision names. Its other variants do not fit this model and are refused:
deep stems ('c'/'d'/'s'/'t' variants: conv1.0, conv1.1, ...), average-pool
shortcuts (downsample.2), squeeze-excite or attention (se.*), ResNeXt /
wide widths (shape mismatch when merging).
"""
import re

import numpy as np
from flax import traverse_util

from finetune_jax.formats import mapping
from finetune_jax.models.resnet import model as resnet

_BN = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}
_KERAS_BN = {'gamma': 'scale', 'beta': 'bias', 'moving_mean': 'mean',
             'moving_variance': 'var'}
_CONV = {'weight': 'kernel'}
_CONV_BIAS = {'kernel': 'kernel', 'bias': 'bias'}
_LINEAR = {'weight': 'kernel', 'bias': 'bias'}
# Axis permutations from the checkpoint's layout to ours (None: unchanged).
_TORCH_CONV = (2, 3, 1, 0)
_TORCH_LINEAR = (1, 0)

_BLOCK = r'(?P<s>\d+)\.(?P<b>\d+)'
# (key regex with a `leaf` group, our module template, leaf names, permutation)
# Templates take s, b (1-based, ours) and n (conv index) from the match.
TORCHVISION = (
    (r'conv1', 'stem/conv', _CONV, _TORCH_CONV),
    (r'bn1', 'stem/bn', _BN, None),
    (rf'layer{_BLOCK}\.conv(?P<n>[123])', 'stage{s}_block{b}/conv{n}', _CONV, _TORCH_CONV),
    (rf'layer{_BLOCK}\.bn(?P<n>[123])', 'stage{s}_block{b}/bn{n}', _BN, None),
    (rf'layer{_BLOCK}\.downsample\.0', 'stage{s}_block{b}/shortcut_conv', _CONV, _TORCH_CONV),
    (rf'layer{_BLOCK}\.downsample\.1', 'stage{s}_block{b}/shortcut_bn', _BN, None),
    (r'fc', 'head', _LINEAR, _TORCH_LINEAR),
)
_HF_BLOCK = r'encoder\.stages\.(?P<s>\d+)\.layers\.(?P<b>\d+)'
HF = (
    (r'embedder\.embedder\.convolution', 'stem/conv', _CONV, _TORCH_CONV),
    (r'embedder\.embedder\.normalization', 'stem/bn', _BN, None),
    (rf'{_HF_BLOCK}\.layer\.(?P<n>[012])\.convolution', 'stage{s}_block{b}/conv{n}',
     _CONV, _TORCH_CONV),
    (rf'{_HF_BLOCK}\.layer\.(?P<n>[012])\.normalization', 'stage{s}_block{b}/bn{n}',
     _BN, None),
    (rf'{_HF_BLOCK}\.shortcut\.convolution', 'stage{s}_block{b}/shortcut_conv', _CONV,
     _TORCH_CONV),
    (rf'{_HF_BLOCK}\.shortcut\.normalization', 'stage{s}_block{b}/shortcut_bn', _BN, None),
    (r'classifier\.1', 'head', _LINEAR, _TORCH_LINEAR),
)
_KERAS_BLOCK = r'conv(?P<s>\d+)_block(?P<b>\d+)'
KERAS = (
    (r'conv1_conv', 'stem/conv', _CONV_BIAS, None),
    (r'conv1_bn', 'stem/bn', _KERAS_BN, None),
    (rf'{_KERAS_BLOCK}_(?P<n>[123])_conv', 'stage{s}_block{b}/conv{n}', _CONV_BIAS, None),
    (rf'{_KERAS_BLOCK}_(?P<n>[123])_bn', 'stage{s}_block{b}/bn{n}', _KERAS_BN, None),
    (rf'{_KERAS_BLOCK}_0_conv', 'stage{s}_block{b}/shortcut_conv', _CONV_BIAS, None),
    (rf'{_KERAS_BLOCK}_0_bn', 'stage{s}_block{b}/shortcut_bn', _KERAS_BN, None),
    (r'predictions', 'head', _CONV_BIAS, None),
)
# How each layout numbers stages, blocks and convs, relative to ours.
_OFFSETS = {'torch': dict(s=0, b=1, n=0), 'hf': dict(s=1, b=1, n=1),
            'keras': dict(s=-1, b=0, n=0)}
_RULES = {'torch': TORCHVISION, 'hf': HF, 'keras': KERAS}
_SEPARATOR = {'torch': '.', 'hf': '.', 'keras': '/'}
_IGNORED = re.compile(r'(^|\.)num_batches_tracked$')
_NAMES = {'torch': 'a torchvision/timm ResNet', 'hf': 'a transformers ResNet',
          'keras': 'a keras.applications ResNet (v1)'}


def _compiled(layout):
  sep = re.escape(_SEPARATOR[layout])
  return [(re.compile(rf'^{pattern}{sep}(?P<leaf>\w+)$'), ours, leaves, perm)
          for pattern, ours, leaves, perm in _RULES[layout]]


_COMPILED = {layout: _compiled(layout) for layout in _RULES}


def rename(key: str, layout: str) -> tuple[str, tuple | None] | None:
  """(our param path, axis permutation) of a checkpoint key; None if unmapped."""
  for regex, ours, leaves, perm in _COMPILED[layout]:
    m = regex.match(key)
    if m and m['leaf'] in leaves:
      groups = {k: int(v) + _OFFSETS[layout][k] for k, v in m.groupdict().items()
                if k in ('s', 'b', 'n')}
      leaf = leaves[m['leaf']]
      return f'{ours.format(**groups)}/{leaf}', (perm if leaf == 'kernel' else None)
  return None


def to_params(tensors: dict[str, np.ndarray], layout: str,
              source: str = '<checkpoint>') -> dict:
  """Our nested param tree (numpy) from a checkpoint's flat {key: array}.

  layout: 'torch' (torchvision/timm), 'hf' (prefix already stripped: see
  `strip_hf_prefix`) or 'keras' ('<layer>/<weight>' keys).
  """
  _refuse_unsupported_variants(tensors, layout, source)
  params = mapping.ParamCollector(source, 'ResNet', f'Is this {_NAMES[layout]} checkpoint?',
                                  noun='keys')
  for key, value in tensors.items():
    if _IGNORED.search(key):
      continue
    mapped = rename(key, layout)
    if mapped is None:
      params.unmapped(key)
      continue
    path, perm = mapped
    if perm is not None:
      value = params.transposed(key, value, perm, f'{len(perm)}-d weight')
    params.add(path, key, value)
  return traverse_util.unflatten_dict(params.result(), sep='/')


_UNSUPPORTED = {
    'torch': (
        (r'^conv1\.\d+\.', 'a deep 3x3 stem (timm ResNet-C/D/S/T variants)'),
        (r'\.downsample\.2\.', 'average-pool shortcuts (timm ResNet-D variants)'),
        (r'\.(se|attn)\.', 'squeeze-excite / attention modules (SE-ResNet, ECA, ...)'),
    ),
    'keras': (
        (r'_preact_bn/|^post_bn/', 'pre-activation blocks (keras ResNet50V2 etc.)'),
    ),
}


def _refuse_unsupported_variants(tensors, layout, source):
  checks = _UNSUPPORTED.get(layout, ())
  for pattern, what in checks:
    hit = next((k for k in tensors if re.search(pattern, k)), None)
    if hit:
      raise ValueError(
          f'{source} holds a ResNet variant with {what} (e.g. {hit!r}); only '
          f'plain ResNets load: torchvision/timm resnet18..152, keras.applications '
          f'ResNet50/101/152.')


def strip_hf_prefix(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """ResNetForImageClassification keys without `resnet.` (ResNetModel has none)."""
  return {k[len('resnet.'):] if k.startswith('resnet.') else k: v
          for k, v in tensors.items()}


def strip_module_prefix(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops the `module.` of a DataParallel-saved state dict (all keys or none)."""
  if tensors and all(k.startswith('module.') for k in tensors):
    return {k[len('module.'):]: v for k, v in tensors.items()}
  return tensors


# ------------------------------------------------------------------ inference


def _stage_blocks(keys, layout: str) -> tuple[str | None, tuple[int, ...]]:
  """(block type, blocks per stage) from the conv keys present."""
  blocks, convs = {}, set()
  for key in keys:
    mapped = rename(key, layout)
    if mapped is None:
      continue
    m = re.match(r'stage(\d+)_block(\d+)/conv(\d)/kernel$', mapped[0])
    if m:
      s, b, n = map(int, m.groups())
      blocks[s] = max(blocks.get(s, 0), b)
      convs.add(n)
  sizes = tuple(blocks.get(s, 0) for s in range(1, max(blocks, default=0) + 1))
  block = 'bottleneck' if 3 in convs else 'basic' if convs else None
  return block, sizes


def infer_variant(tensors: dict, layout: str, source: str = '<checkpoint>') -> str:
  """'resnet18' ... 'resnet152' from the blocks a checkpoint holds."""
  _refuse_unsupported_variants(tensors, layout, source)
  block, sizes = _stage_blocks(tensors, layout)
  variant = resnet.variant_of(block, sizes) if block else None
  if variant is None:
    known = ', '.join(f'{n}: {b} {list(s)}' for n, (b, s) in resnet.DEPTHS.items())
    raise ValueError(
        f'Cannot tell which ResNet {source} holds: its blocks per stage are '
        f'{list(sizes)} ({block or "no"} blocks), which is no standard depth '
        f'({known}). A block or stage is missing, or it is another architecture.')
  return variant


def num_classes_in(tensors: dict, layout: str) -> int:
  """Classifier size of the checkpoint; 0 when it has no classifier."""
  for key, value in tensors.items():
    mapped = rename(key, layout)
    if mapped and mapped[0] == 'head/kernel':
      return int(np.shape(value)[0 if layout in ('torch', 'hf') else 1])
  return 0


def stem_features_in(tensors: dict, layout: str) -> int | None:
  for key, value in tensors.items():
    mapped = rename(key, layout)
    if mapped and mapped[0] == 'stem/conv/kernel':
      return int(np.shape(value)[0 if layout in ('torch', 'hf') else -1])
  return None

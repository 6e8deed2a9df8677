"""efficientnet-lite-pytorch state dict <-> our EfficientNet-Lite param tree.

Every torch module maps to one of ours with a fixed layout change:
  conv       (O, I, kh, kw)  -> (kh, kw, I, O)   stem; depthwise (C, 1, k, k) -> (k, k, 1, C)
  pointwise  (O, I, 1, 1)    -> (I, O)           1x1 convs are Dense layers here
  linear     (O, I)          -> (I, O)           the classifier
  bn         weight, bias, running_mean, running_var -> scale, bias, mean, var
`num_batches_tracked` is training bookkeeping and is dropped; any other key
that maps to nothing is an error, so a silently ignored weight cannot happen.
"""
import re

import numpy as np
from flax import traverse_util

from finetune_jax.formats import mapping
from finetune_jax.models.efficientnet_lite import model as efficientnet_lite

# (torch module, our module, layout); '{i}' is the block index.
_MODULES = (
    ('_conv_stem', 'stem/conv', 'conv'),
    ('_bn0', 'stem/bn', 'bn'),
    ('_blocks.{i}._expand_conv', 'blocks_{i}/expand_conv', 'pointwise'),
    ('_blocks.{i}._bn0', 'blocks_{i}/expand_bn', 'bn'),
    ('_blocks.{i}._depthwise_conv', 'blocks_{i}/depthwise_conv', 'conv'),
    ('_blocks.{i}._bn1', 'blocks_{i}/depthwise_bn', 'bn'),
    ('_blocks.{i}._project_conv', 'blocks_{i}/project_conv', 'pointwise'),
    ('_blocks.{i}._bn2', 'blocks_{i}/project_bn', 'bn'),
    ('_conv_head', 'top/conv', 'pointwise'),
    ('_bn1', 'top/bn', 'bn'),
    ('_fc', 'head', 'linear'),
)
# torch leaf -> our leaf, per layout.
_LEAVES = {
    'conv': {'weight': 'kernel'},
    'pointwise': {'weight': 'kernel'},
    'linear': {'weight': 'kernel', 'bias': 'bias'},
    'bn': {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean',
           'running_var': 'var'},
}
_IGNORED = re.compile(r'(^|\.)num_batches_tracked$')
_TEMPLATES = mapping.Templates(_MODULES, _LEAVES)
_OURS_RE = [(mapping.template_regex(o, '/'), t, layout) for t, o, layout in _MODULES]


def _to_ours(value: np.ndarray, layout: str, leaf: str, key: str) -> np.ndarray:
  if leaf != 'weight' or layout == 'bn':
    return value
  expected_ndim = 2 if layout == 'linear' else 4
  if value.ndim != expected_ndim or (
      layout == 'pointwise' and value.shape[2:] != (1, 1)):
    raise ValueError(f'{key}: shape {value.shape} is not a {layout} weight.')
  if layout == 'conv':
    return value.transpose(2, 3, 1, 0)
  if layout == 'pointwise':
    return value[:, :, 0, 0].T
  return value.T


def _to_torch(value: np.ndarray, layout: str, leaf: str) -> np.ndarray:
  if leaf != 'kernel':
    return value
  if layout == 'conv':
    return value.transpose(3, 2, 0, 1)
  if layout == 'pointwise':
    return value.T[:, :, None, None]
  return value.T


def torch_to_params(state_dict: dict[str, np.ndarray]) -> dict:
  """Our nested param tree (numpy arrays) from a torch state dict."""
  params = mapping.ParamCollector(
      '<state dict>', 'EfficientNet-Lite',
      'Is this an efficientnet-lite-pytorch checkpoint?', noun='keys')
  for key, value in state_dict.items():
    if _IGNORED.search(key):
      continue
    mapped = _TEMPLATES.match(key)
    if mapped is None:
      params.unmapped(key)
      continue
    ours, layout, leaf = mapped
    params.add(ours, key, _to_ours(np.asarray(value), layout, leaf, key))
  return traverse_util.unflatten_dict(params.result(), sep='/')


def params_to_torch(params: dict) -> dict[str, np.ndarray]:
  """The efficientnet-lite-pytorch state dict of our params (no counters)."""
  out = {}
  for path, value in traverse_util.flatten_dict(params, sep='/').items():
    for regex, torch_module, layout in _OURS_RE:
      m = regex.match(path)
      if m:
        inverse = {v: k for k, v in _LEAVES[layout].items()}
        module = (torch_module.format(i=m['i']) if '{i}' in torch_module
                  else torch_module)
        out[f'{module}.{inverse[m["leaf"]]}'] = np.ascontiguousarray(
            _to_torch(np.asarray(value), layout, m['leaf']))
        break
    else:
      raise ValueError(f'Parameter {path!r} has no efficientnet-lite-pytorch name.')
  return out


def num_classes_in(state_dict: dict[str, np.ndarray]) -> int:
  """Classifier size of the checkpoint; 0 when it has no classifier."""
  weight = state_dict.get('_fc.weight')
  return 0 if weight is None else int(weight.shape[0])


def _signature(state_dict) -> list[tuple[int, int, int]]:
  """(kernel, depthwise channels, out channels) of each block in order."""
  sig, i = [], 0
  while f'_blocks.{i}._depthwise_conv.weight' in state_dict:
    dw = state_dict[f'_blocks.{i}._depthwise_conv.weight'].shape
    project = state_dict.get(f'_blocks.{i}._project_conv.weight')
    sig.append((dw[-1], dw[0], None if project is None else project.shape[0]))
    i += 1
  return sig


def _variant_signature(variant: str) -> list[tuple[int, int, int]]:
  config = efficientnet_lite.make_config(variant)
  specs = efficientnet_lite.block_specs(
      config['stages'], config['width_coefficient'],
      config['depth_coefficient'], config['stem_features'])
  return [(s.kernel_size, s.in_features * s.expand_ratio, s.out_features)
          for s in specs]


def infer_variant(state_dict: dict[str, np.ndarray], source: str = '<state dict>') -> str:
  """'lite0'..'lite4', from the block count and channel widths."""
  sig = _signature(state_dict)
  for variant in efficientnet_lite.VARIANTS:
    if _variant_signature(variant) == sig:
      return variant
  raise ValueError(
      f'Cannot tell which EfficientNet-Lite variant {source} holds: its '
      f'{len(sig)} blocks (kernel, channels, out) {sig[:3]}... match none of '
      f'{list(efficientnet_lite.VARIANTS)}. Put the variant in the file name '
      f'(e.g. "efficientnet-lite2.pth").')


def variant_in_name(path: str) -> str | None:
  m = re.search(r'lite([0-4])(?![0-9])', path.rsplit('/', 1)[-1].lower())
  return f'lite{m[1]}' if m else None

"""ViT checkpoints <-> our ViT param tree (see models/vit/model.py for its layout).

Two sources, each mapped key by key; a key that maps to nothing is an error:

Hugging Face `ViTForImageClassification` / `ViTModel` (safetensors; keys with
or without the 'vit.' prefix):
  embeddings.patch_embeddings.projection  conv (O, I, kh, kw) -> embedding (kh, kw, I, O)
  embeddings.cls_token / position_embeddings                  -> cls / pos_embedding
  encoder.layer.{i}.attention.attention.{query,key,value}, attention.output.dense,
    intermediate.dense, output.dense: Linear (O, I) -> Dense (I, O)
  layernorm_before/after, layernorm: weight, bias -> scale, bias
  pooler.dense -> pre_logits (Dense + tanh), classifier -> head

vit_jax / big_vision `.npz` (flax names, '/'-joined): the same modules, with
3-D attention kernels: query/key/value (D, H, d) -> (D, H*d), out (H, d, D)
-> (H*d, D). vit_jax names blocks {LayerNorm_0, MultiHeadDotProductAttention_1,
LayerNorm_2, MlpBlock_3} and keeps the position embeddings in
Transformer/posembed_input; big_vision names them {LayerNorm_0,
MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0}, keeps
`pos_embedding` at the top and adds it before prepending the class token, so
its class token has no position slot: a zero one is prepended (exact).
big_vision's scanned layout (`Transformer/encoderblock/...`, a leading layer
axis) is unstacked.
"""
import math
import re
import zipfile
import zlib

import numpy as np
from flax import traverse_util

from finetune_jax import errors
from finetune_jax.formats import mapping
from finetune_jax.models.vit import model as vit

# ------------------------------------------------------------------ HF

# (HF module, our module, layout); '{i}' is the block index.
_HF_MODULES = (
    ('embeddings.patch_embeddings.projection', 'embedding', 'conv'),
    ('encoder.layer.{i}.layernorm_before', 'encoderblock_{i}/norm1', 'norm'),
    ('encoder.layer.{i}.attention.attention.query', 'encoderblock_{i}/attention/query', 'linear'),
    ('encoder.layer.{i}.attention.attention.key', 'encoderblock_{i}/attention/key', 'linear'),
    ('encoder.layer.{i}.attention.attention.value', 'encoderblock_{i}/attention/value', 'linear'),
    ('encoder.layer.{i}.attention.output.dense', 'encoderblock_{i}/attention/out', 'linear'),
    ('encoder.layer.{i}.layernorm_after', 'encoderblock_{i}/norm2', 'norm'),
    ('encoder.layer.{i}.intermediate.dense', 'encoderblock_{i}/mlp/fc1', 'linear'),
    ('encoder.layer.{i}.output.dense', 'encoderblock_{i}/mlp/fc2', 'linear'),
    ('layernorm', 'encoder_norm', 'norm'),
    ('pooler.dense', 'pre_logits', 'linear'),
    ('classifier', 'head', 'linear'),
)
_HF_PARAMS = {'embeddings.cls_token': 'cls', 'embeddings.position_embeddings': 'pos_embedding'}
_HF_LEAVES = {
    'conv': {'weight': 'kernel', 'bias': 'bias'},
    'linear': {'weight': 'kernel', 'bias': 'bias'},
    'norm': {'weight': 'scale', 'bias': 'bias'},
}
_HF_TEMPLATES = mapping.Templates(_HF_MODULES, _HF_LEAVES)
# Weight layouts that differ from ours: (axes to ours, what a wrong rank is called).
_HF_WEIGHTS = {'conv': ((2, 3, 1, 0), 'conv weight'), 'linear': ((1, 0), 'linear weight')}


def hf_to_params(tensors: dict[str, np.ndarray], source: str = '<HF checkpoint>') -> dict:
  """Our flat {path: array} from the tensors of a transformers ViT checkpoint."""
  params = mapping.ParamCollector(
      source, 'ViT', 'Is this a transformers ViTModel / ViTForImageClassification checkpoint?',
      mixed='keys with and without the "vit." prefix are mixed')
  for key, value in tensors.items():
    name = key[len('vit.'):] if key.startswith('vit.') else key
    if name in _HF_PARAMS:
      params.add(_HF_PARAMS[name], key, value)
      continue
    mapped = _HF_TEMPLATES.match(name)
    if mapped is None:
      params.unmapped(key)
      continue
    ours, layout, leaf = mapped
    if leaf == 'weight' and layout in _HF_WEIGHTS:
      value = params.transposed(key, value, *_HF_WEIGHTS[layout])
    params.add(ours, key, value)
  return params.result()


_HF_NAMES = {ours: theirs for theirs, ours in _HF_PARAMS.items()}


def hf_name(path: str, prefix: str = 'vit.') -> str:
  """The transformers name of our param `path` ('head' -> the unprefixed 'classifier').

  prefix: 'vit.' as in ViTForImageClassification; '' for a ViTModel.
  """
  if path in _HF_NAMES:
    return prefix + _HF_NAMES[path]
  found = _HF_TEMPLATES.theirs(path)
  if found is None:
    raise ValueError(f'Parameter {path!r} has no transformers ViT name.')
  name = found[0]
  return name if name.startswith('classifier.') else prefix + name


def params_to_hf(params: dict, prefix: str = 'vit.') -> dict[str, np.ndarray]:
  """transformers ViT tensors from our params (names: `hf_name`)."""
  out = {}
  for path, value in traverse_util.flatten_dict(dict(params), sep='/').items():
    value = np.asarray(value)
    found = _HF_TEMPLATES.theirs(path)
    if found and found[0].endswith('.weight') and found[1] in _HF_WEIGHTS:
      value = value.transpose(np.argsort(_HF_WEIGHTS[found[1]][0]))  # the inverse permutation
    out[hf_name(path, prefix)] = np.ascontiguousarray(value)
  return out


def hf_config(config: dict) -> dict:
  """A transformers config.json for our ViT config (the inverse of hf_architecture).

  With a head it describes a ViTForImageClassification, else a ViTModel
  (whose pooler is our pre_logits). Mean pooling and a pre-logits layer
  under a head have no transformers counterpart and are refused.
  """
  classes = config['num_classes']
  if config['classifier'] != 'token':
    raise ValueError(f"classifier={config['classifier']!r}: transformers' ViT pools the "
                     "class token only, so this model has no HF layout.")
  if classes and config['representation_size']:
    raise ValueError('A ViT with both pre_logits (representation_size) and a head has no '
                     'HF layout: ViTForImageClassification has no pre-logits layer.')
  out = {
      'architectures': ['ViTForImageClassification' if classes else 'ViTModel'],
      'model_type': 'vit', 'hidden_size': config['hidden_size'],
      'num_hidden_layers': config['num_layers'], 'num_attention_heads': config['num_heads'],
      'intermediate_size': config['mlp_dim'],
      'hidden_act': 'gelu_pytorch_tanh' if config['gelu_approximate'] else 'gelu',
      'hidden_dropout_prob': config['dropout_rate'],
      'attention_probs_dropout_prob': config['attention_dropout_rate'],
      'image_size': config['image_size'], 'patch_size': config['patch_size'],
      'num_channels': 3, 'qkv_bias': config['qkv_bias'],
      'layer_norm_eps': config['layer_norm_eps'], 'initializer_range': 0.02}
  if config['representation_size']:
    out.update(pooler_output_size=config['representation_size'], pooler_act='tanh')
  if classes:
    out.update(mapping.hf_labels(classes))
  return out


def hf_preprocessor_config(config: dict) -> dict:
  """A ViTImageProcessor preprocessor_config.json with our resolution and normalisation."""
  return {
      'image_processor_type': 'ViTImageProcessor', 'do_resize': True,
      'size': {'height': config['image_size'], 'width': config['image_size']},
      'resample': 2, 'do_rescale': True, 'rescale_factor': 1 / 255, 'do_normalize': True,
      'image_mean': [m / 255 for m in config['mean_rgb']],
      'image_std': [s / 255 for s in config['stddev_rgb']]}


def hf_architecture(hf_config: dict, source: str = '<config.json>') -> dict:
  """make_config fields from a transformers ViTConfig dict."""
  def get(key):
    if key not in hf_config:
      raise ValueError(f'{source}: config.json lacks {key!r}; is this a ViT config?')
    return hf_config[key]

  size, patch = get('image_size'), get('patch_size')
  size = _square(size, 'image_size', source)
  patch = _square(patch, 'patch_size', source)
  if hf_config.get('num_channels', 3) != 3:
    raise ValueError(f'{source}: num_channels={hf_config["num_channels"]}; only RGB '
                     '(3) inputs are supported.')
  act = hf_config.get('hidden_act', 'gelu')
  if act not in ('gelu', 'gelu_new', 'gelu_pytorch_tanh'):
    raise ValueError(f'{source}: hidden_act={act!r} is not supported; use gelu '
                     '(exact) or gelu_new / gelu_pytorch_tanh (tanh approximation).')
  pooler_act = hf_config.get('pooler_act', 'tanh')
  if pooler_act != 'tanh':
    raise ValueError(f'{source}: pooler_act={pooler_act!r}; only tanh is supported.')
  return dict(
      hidden_size=get('hidden_size'), num_layers=get('num_hidden_layers'),
      num_heads=get('num_attention_heads'), mlp_dim=get('intermediate_size'),
      patch_size=patch, image_size=size, classifier='token',
      layer_norm_eps=hf_config.get('layer_norm_eps', 1e-12),
      gelu_approximate=act != 'gelu', qkv_bias=hf_config.get('qkv_bias', True))


def _square(value, name: str, source: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f'{source}: {name}={value}; only square sizes are supported.')
    value = value[0]
  return int(value)


# ------------------------------------------------------------------ npz

# (our block module, vit_jax name, big_vision name, layout), under encoderblock_{i}.
_NPZ_BLOCK = (
    ('norm1', 'LayerNorm_0', 'LayerNorm_0', 'same'),
    ('attention/query', 'MultiHeadDotProductAttention_1/query',
     'MultiHeadDotProductAttention_0/query', 'heads_in'),
    ('attention/key', 'MultiHeadDotProductAttention_1/key',
     'MultiHeadDotProductAttention_0/key', 'heads_in'),
    ('attention/value', 'MultiHeadDotProductAttention_1/value',
     'MultiHeadDotProductAttention_0/value', 'heads_in'),
    ('attention/out', 'MultiHeadDotProductAttention_1/out',
     'MultiHeadDotProductAttention_0/out', 'heads_out'),
    ('norm2', 'LayerNorm_2', 'LayerNorm_1', 'same'),
    ('mlp/fc1', 'MlpBlock_3/Dense_0', 'MlpBlock_0/Dense_0', 'same'),
    ('mlp/fc2', 'MlpBlock_3/Dense_1', 'MlpBlock_0/Dense_1', 'same'),
)
_NPZ_TOP = (  # (ours, vit_jax, big_vision)
    ('embedding', 'embedding', 'embedding'),
    ('encoder_norm', 'Transformer/encoder_norm', 'Transformer/encoder_norm'),
    ('pre_logits', 'pre_logits', 'pre_logits'),
    ('head', 'head', 'head'),
)
_NPZ_POSEMB = ('Transformer/posembed_input/pos_embedding',  # vit_jax
               'pos_embedding',  # big_vision
               'Transformer/pos_embedding')  # big_vision before 2022
NPZ_LAYOUTS = ('vit_jax', 'big_vision')
_FLAX_LEAVES = {leaf: leaf for leaf in ('kernel', 'bias', 'scale')}


def _npz_module_map() -> dict[str, tuple[str, str]]:
  """npz module name (with '{i}') -> (our module, layout), both namings."""
  table = {}
  for ours, *names, layout in _NPZ_BLOCK:
    for name in names:
      table[f'Transformer/encoderblock_{{i}}/{name}'] = (f'encoderblock_{{i}}/{ours}', layout)
  for ours, *names in _NPZ_TOP:
    for name in names:
      table[name] = (ours, 'same')
  return table


_NPZ_TEMPLATES = mapping.Templates(
    [(t, *row) for t, row in _npz_module_map().items()],
    dict.fromkeys(('same', 'heads_in', 'heads_out'), _FLAX_LEAVES), sep='/')


def read_npz(path: str) -> dict[str, np.ndarray]:
  """Every array of an .npz, read now (no pickles): a bad file fails here, by name."""
  arrays, key = {}, None
  try:
    with open_npz(path) as npz:
      for key in npz.files:
        arrays[key] = npz[key]
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
    raise unreadable_npz(path, e, key) from None
  return arrays


def unreadable_npz(path: str, e: Exception, key: str | None = None) -> errors.CheckpointError:
  return errors.CheckpointError(
      path, f'not a readable .npz file: {e}. It may be truncated or corrupt: download or '
      'export it again.', key=key)


def open_npz(path: str):
  """np.load of an .npz archive, refusing pickles and plain .npy files."""
  npz = np.load(path, allow_pickle=False)
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise ValueError('it holds a single array (.npy), not an .npz archive of named arrays')
  return npz


def _unstack_scanned(arrays: dict, source: str) -> dict:
  """big_vision's scanned blocks (leading layer axis) -> encoderblock_{i}."""
  prefix = 'Transformer/encoderblock/'
  scanned = {k: v for k, v in arrays.items() if k.startswith(prefix)}
  if not scanned:
    return arrays
  depths = {v.shape[0] for v in scanned.values()}
  if len(depths) != 1:
    raise ValueError(f'{source}: scanned encoder blocks disagree on the number of '
                     f'layers: {sorted(depths)}.')
  out = {k: v for k, v in arrays.items() if not k.startswith(prefix)}
  for key, value in scanned.items():
    for i in range(value.shape[0]):
      out[f'Transformer/encoderblock_{i}/{key[len(prefix):]}'] = value[i]
  return out


def _npz_value(value: np.ndarray, layout: str, leaf: str, key: str) -> np.ndarray:
  if layout == 'same':
    return value
  if layout == 'heads_in':  # kernel (D, H, d), bias (H, d)
    ndim = 3 if leaf == 'kernel' else 2
    if value.ndim != ndim:
      raise ValueError(f'{key}: shape {value.shape}, expected a {ndim}-D attention {leaf}.')
    return value.reshape(*value.shape[:-2], -1)
  if leaf == 'kernel':  # heads_out: kernel (H, d, D), bias (D,)
    if value.ndim != 3:
      raise ValueError(f'{key}: shape {value.shape}, expected a 3-D attention out kernel.')
    return value.reshape(-1, value.shape[-1])
  return value


def npz_to_params(arrays: dict[str, np.ndarray], source: str = '<npz>') -> dict:
  """Our flat {path: array} from vit_jax or big_vision arrays."""
  if arrays and all(k.startswith('params/') for k in arrays):  # big_vision train ckpts
    arrays = {k[len('params/'):]: v for k, v in arrays.items()}
  if any(k.startswith('MAPHead_0/') for k in arrays):
    raise ValueError(f'{source} pools with a MAP head (big_vision pool_type="map"); '
                     'only the class token ("tok") and "gap" pooling are supported.')
  arrays = _unstack_scanned(arrays, source)
  params = mapping.ParamCollector(
      source, 'ViT', 'Is this a vit_jax / big_vision ViT checkpoint?', noun='arrays',
      mixed='the file mixes vit_jax and big_vision names')
  for key, value in arrays.items():
    if key == 'cls' or key in _NPZ_POSEMB:
      params.add('cls' if key == 'cls' else 'pos_embedding', key, value)
      continue
    mapped = _NPZ_TEMPLATES.match(key)
    if mapped is None:
      params.unmapped(key)
      continue
    ours, layout, leaf = mapped
    params.add(ours, key, _npz_value(np.asarray(value), layout, leaf, key))
  flat = params.result()
  if 'pos_embedding' not in flat:
    raise ValueError(f'{source} has no position embeddings (big_vision '
                     'posemb="sincos2d"?); only learned ones are supported.')
  flat['pos_embedding'] = _with_cls_slot(flat['pos_embedding'], 'cls' in flat, source)
  return flat


def _is_square(n: int) -> bool:
  return n >= 1 and math.isqrt(n) ** 2 == n


def _with_cls_slot(posemb: np.ndarray, has_cls: bool, source: str) -> np.ndarray:
  """Our layout: the class token's position slot first, iff there is a class token."""
  n = posemb.shape[1] if posemb.ndim == 3 else -1
  if posemb.ndim == 3 and posemb.shape[0] == 1:
    if has_cls and _is_square(n):  # big_vision adds posemb before the class token
      return np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
    if (has_cls and _is_square(n - 1)) or (not has_cls and _is_square(n)):
      return posemb
  raise ValueError(
      f'{source}: pos_embedding of shape {posemb.shape} is not (1, [1 +] grid**2, D) '
      f'for a model {"with" if has_cls else "without"} a class token.')


def architecture_from_shapes(flat: dict, *, num_heads: int | None = None,
                             source: str = '<checkpoint>') -> dict:
  """make_config fields read off the converted params' shapes.

  Shapes give everything but the head count: with `num_heads=None` it comes
  from a standard width (Ti 192, S 384, B 768, ...), whose depth and MLP size
  must then match too (a missing block is an error, not a smaller model).
  """
  def need(path):
    if path not in flat:
      raise ValueError(f'{source} lacks {path!r} (in our naming): not a complete ViT.')
    return flat[path].shape

  kernel = need('embedding/kernel')
  if len(kernel) != 4 or kernel[0] != kernel[1] or kernel[2] != 3:
    raise ValueError(f'{source}: patch embedding kernel {kernel} is not (p, p, 3, D).')
  width, patch = kernel[3], kernel[0]
  blocks = {int(m[1]) for p in flat if (m := re.match(r'encoderblock_(\d+)/', p))}
  depth = max(blocks) + 1 if blocks else 0
  mlp_dim = need('encoderblock_0/mlp/fc1/kernel')[1]
  has_cls = 'cls' in flat
  patches = need('pos_embedding')[1] - has_cls
  pre_logits = flat.get('pre_logits/kernel')
  arch = dict(hidden_size=width, num_layers=depth, mlp_dim=mlp_dim, patch_size=patch,
              image_size=math.isqrt(patches) * patch,
              classifier='token' if has_cls else 'gap',
              qkv_bias='encoderblock_0/attention/query/bias' in flat,
              representation_size=None if pre_logits is None else pre_logits.shape[1])
  if num_heads is None:
    if width not in vit.STANDARD_WIDTHS:
      raise ValueError(
          f'{source}: width {width} is not a standard ViT width '
          f'{sorted(vit.STANDARD_WIDTHS)}, so its number of attention heads is '
          'unknown; pass num_heads= to the loader (models.vit.load_npz).')
    std_depth, std_mlp, num_heads = vit.STANDARD_WIDTHS[width]
    if (depth, mlp_dim) != (std_depth, std_mlp):
      raise ValueError(
          f'{source}: width {width} has {std_depth} blocks of MLP size {std_mlp} in '
          f'the standard ViTs, but this file has {depth} blocks of MLP size {mlp_dim} '
          f'(blocks found: {sorted(blocks)}). A block may be missing; for a '
          'non-standard model pass num_heads= to the loader (models.vit.load_npz).')
  arch['num_heads'] = num_heads
  return arch


def num_classes_in(flat: dict) -> int:
  """Classifier size of the checkpoint; 0 when it has no classifier."""
  kernel = flat.get('head/kernel')
  return 0 if kernel is None else int(kernel.shape[-1])


def params_to_npz(params: dict, path: str, *, num_heads: int,
                  layout: str = 'vit_jax') -> None:
  """Writes our params as a vit_jax (or big_vision) .npz, 3-D attention kernels."""
  if layout not in NPZ_LAYOUTS:
    raise ValueError(f'layout={layout!r}; use one of {NPZ_LAYOUTS}.')
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(params), sep='/').items()}
  column = 1 if layout == 'vit_jax' else 2
  names = {row[0]: row[column] for row in _NPZ_TOP}
  block = {row[0]: (row[column], row[3]) for row in _NPZ_BLOCK}
  out = {}
  for ours, value in flat.items():
    if ours in ('cls', 'pos_embedding'):
      continue
    module, leaf = ours.rsplit('/', 1)
    m = re.match(r'encoderblock_(\d+)/(.+)$', module)
    if m:
      name, layout_ = block[m[2]]
      key = f'Transformer/encoderblock_{m[1]}/{name}/{leaf}'
      if layout_ == 'heads_in':
        value = value.reshape(*value.shape[:-1], num_heads, -1)
      elif layout_ == 'heads_out' and leaf == 'kernel':
        value = value.reshape(num_heads, -1, value.shape[-1])
    elif module in names:
      key = f'{names[module]}/{leaf}'
    else:
      raise ValueError(f'Parameter {ours!r} has no {layout} name.')
    out[key] = value
  posemb = flat['pos_embedding']
  if 'cls' in flat:
    if layout == 'big_vision':  # fold the class slot into the class token (exact)
      out['cls'], posemb = flat['cls'] + posemb[:, :1], posemb[:, 1:]
    else:
      out['cls'] = flat['cls']
  out[_NPZ_POSEMB[0] if layout == 'vit_jax' else _NPZ_POSEMB[1]] = posemb
  np.savez(path, **out)


# transformers >= 5 renamed ViT's modules (q_proj, mlp.fc1, ...) while its
# checkpoints kept the old names; HF PEFT keys follow the modules. re.sub pairs
# over checkpoint module names (from transformers' conversion_mapping).
V5_MODULE_RENAMES = (
    (r'encoder\.layer\.(\d+)\.', r'layers.\1.'),
    (r'\.attention\.attention\.query$', '.attention.q_proj'),
    (r'\.attention\.attention\.key$', '.attention.k_proj'),
    (r'\.attention\.attention\.value$', '.attention.v_proj'),
    (r'\.attention\.output\.dense$', '.attention.o_proj'),
    (r'\.intermediate\.dense$', '.mlp.fc1'),
    (r'(layers\.\d+)\.output\.dense$', r'\1.mlp.fc2'),
)

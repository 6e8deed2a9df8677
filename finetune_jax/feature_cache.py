"""Frozen-prefix feature caching: a frozen, deterministic bottom runs once per example.

With `partial` or `linear_probe` the bottom of the network is frozen, and
every step recomputes the same function of the same examples.
`cache_frozen_features` ('auto', 'on', 'off') computes it once instead:

- The boundary is the input of the first block that trains (the model's
  `blocks` in order, then the head). Its values are computed once per
  example of the train and eval splits and stored under
  `<data_dir>/feature_cache/<key>/`, where the key hashes everything they
  depend on: the model's config, the frozen params below the boundary, the
  dataset's files and split, the preprocessing, the boundary and the compute
  dtype. A later run over the same frozen bottom (another learning rate,
  seed or head) starts warm, and a cache that does not match is never read.
- Training and evaluation then run the model with those values put in at the
  boundary (flax method interception, as `peft.intercept` does); the blocks
  below it become dead code that XLA drops. The train stream draws the same
  example indices per step as without the cache, so resume stays exact.

`auto` caches only where the result is the uncached run's: no augmentation,
and a bottom that draws no random numbers in training (no dropout or
drop-connect there; BatchNorm statistics never train in this project). It
also stays off when this run would see fewer examples than building the
cache costs, unless the cache is already built. `on` caches wherever a
boundary exists, computing a random bottom in inference mode (logged). The
log says what was decided and why.
"""
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from finetune_jax import data
from finetune_jax import errors
from finetune_jax import precision
from finetune_jax.peft import paths

MODES = ('auto', 'on', 'off')
_VERSION = 1
# A cache larger than this stays off under `auto` (on disk, read through mmap).
MAX_BYTES = 8 * 2**30


@dataclasses.dataclass(frozen=True)
class FromFeatures:
  """`base` with the input of its `block` call replaced by `apply`'s first argument.

  Duck-types linen's `apply`, like `peft.intercept.Intercepted`, which it may wrap.
  """
  base: object
  block: str

  def apply(self, variables, features, *args, **kwargs):
    def interceptor(next_fun, call_args, call_kwargs, context):
      if context.method_name == '__call__' and _path(context) == self.block:
        return next_fun(features, *call_args[1:], **call_kwargs)
      return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(interceptor):
      return self.base.apply(variables, *args, **kwargs)

  def __getattr__(self, name):
    if name.startswith('__') or name in ('base', 'block'):
      raise AttributeError(name)
    return getattr(self.base, name)


@dataclasses.dataclass
class Decision:
  """What a run does about caching, for the log and results.json."""
  used: bool
  why: str
  block: str | None = None
  warm: bool = False
  build_s: float = 0.0

  def report(self) -> dict:
    return dataclasses.asdict(self)


class _Reached(Exception):
  """Raised at the boundary to stop the forward pass there."""

  def __init__(self, value):
    super().__init__('boundary reached')
    self.value = value


def _path(context) -> str:
  return '/'.join(context.module.path)


def bottom_output(module, block: str, params, args, *, train: bool, rngs=None):
  """The first positional input of `block`'s call: the frozen bottom's output.

  None if the block is never called as a module, or takes no positional input.
  """
  def interceptor(next_fun, call_args, call_kwargs, context):
    if context.method_name == '__call__' and _path(context) == block:
      raise _Reached(call_args[0] if call_args else None)
    return next_fun(*call_args, **call_kwargs)

  try:
    with nn.intercept_methods(interceptor):
      module.apply({'params': params}, *args, train=train, rngs=rngs or {})
  except _Reached as reached:
    return reached.value
  return None


def boundary(model, adapted) -> tuple[str | None, str]:
  """(the first block that trains, '') or (None, why there is no frozen bottom)."""
  order = [*model.blocks, *([model.head] if model.head else [])]
  top = lambda p: p.split('/', 1)[0]
  outside = sorted({top(p) for p in adapted.trainable} - set(order))
  if outside:
    return None, f'params outside the model\'s blocks train ({outside[0]})'
  training = {top(p) for p in adapted.trainable}
  first = next((i for i, b in enumerate(order) if b in training), None)
  if first is None:
    return None, 'nothing trains'
  if first == 0:
    return None, f'its first block ({order[0]}) trains: nothing is frozen at the bottom'
  return order[first], ''


def _sha256_arrays(flat: dict) -> str:
  h = hashlib.sha256()
  for p, v in sorted(flat.items()):
    v = np.ascontiguousarray(np.asarray(v))
    h.update(f'{p}:{v.dtype}:{v.shape};'.encode())
    h.update(v.tobytes())
  return h.hexdigest()


def _data_fingerprint(split) -> dict:
  """The files a split is read from (names, sizes, modification times)."""
  info = getattr(split.source, 'dataset_info', None)
  where = getattr(info, 'data_dir', None)
  if not where or not os.path.isdir(where):
    raise ValueError('no files to key the cache by')
  stats = {f: os.stat(os.path.join(where, f)) for f in os.listdir(where)}
  files = sorted((f, st.st_size, st.st_mtime_ns) for f, st in stats.items())
  out = {'dir': os.path.abspath(where), 'files': files, 'examples': split.num_examples,
         'split': str(getattr(split.source, 'split', ''))}
  if isinstance(split.source, data.Subset):  # validation, or a train_examples subset
    out['indices'] = hashlib.sha256(split.source.indices.tobytes()).hexdigest()
  return out


def cache_root(config) -> str:
  return os.path.join(data.resolve_data_dir(config.data_dir), 'feature_cache')


class _Cached:
  """A split as cached features and labels: the random-access source grain reads."""

  def __init__(self, features: np.ndarray, labels: np.ndarray):
    self.features, self.labels = features, labels

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {'features': self.features[i], 'label': self.labels[i]}

  def __getitems__(self, indices):
    return [self[i] for i in indices]


def _build(directory: str, compute, batches, key: dict) -> None:
  """Writes features.npy, label.npy and key.json atomically: a killed build leaves no
  cache."""
  features, labels = [], []
  for batch in batches:
    real = batch['mask']
    features.append(np.asarray(compute(batch))[real].astype(np.float32))
    labels.append(batch['label'][real])
  tmp = f'{directory}.tmp{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  np.save(os.path.join(tmp, 'features.npy'), np.concatenate(features))
  np.save(os.path.join(tmp, 'label.npy'), np.concatenate(labels))
  with open(os.path.join(tmp, 'key.json'), 'w') as f:
    json.dump(key, f, indent=1, sort_keys=True, default=str)
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  if _load(directory) is None and os.path.exists(directory):  # stale: out of the way first
    stale = f'{directory}.stale{os.getpid()}'
    os.replace(directory, stale)
    shutil.rmtree(stale)
  try:
    os.replace(tmp, directory)
  except OSError:  # another run (a sweep's) wrote the same cache meanwhile: keep theirs
    if _load(directory) is None:
      raise
    shutil.rmtree(tmp)


def _load(directory: str) -> _Cached | None:
  try:
    return _Cached(np.load(os.path.join(directory, 'features.npy'), mmap_mode='r'),
                   np.load(os.path.join(directory, 'label.npy')))
  except (OSError, ValueError):
    return None


@dataclasses.dataclass
class Plan:
  """A cache this run will read (and build first, unless warm)."""
  block: str
  train_mode: bool  # the bottom computes as in training (exact) or in inference (`on`)
  directories: dict  # role ('train', 'eval') -> its cache dir
  input_shapes: object  # the model's positional inputs (ShapeDtypeStructs), to stand in
  key: dict  # what the cache is keyed by, less the data (written beside it)
  warm: bool


def plan(config, model, adapted, splits, pipeline, dtype) -> tuple[Plan | None, Decision]:
  """Decides, cheaply and before anything is written, whether and where to cache.

  Raises errors.ConfigError for `on` where no cache can be made.
  """
  mode = config.cache_frozen_features

  def cannot(why: str):
    if mode == 'on':
      raise errors.ConfigError('cache_frozen_features',
                               f'cache_frozen_features=on, but {why}; use auto or off.')
    if mode == 'auto':
      logging.info('Frozen features not cached: %s.', why)
    return None, Decision(False, why)

  if mode not in MODES:
    raise errors.ConfigError('cache_frozen_features', f'cache_frozen_features={mode!r} is '
                             f'unknown; use one of {", ".join(MODES)}.')
  if mode == 'off':
    return cannot('cache_frozen_features=off')
  if config.task != 'image_classification':
    return cannot(f'task={config.task} is not cached yet (image classification is)')
  if config.get('remat', 'none') != 'none':  # the boundary is read inside remat's trace
    return cannot(f'remat={config.remat} recomputes the blocks, and the cache boundary cannot '
                  'be read inside them')
  if config.augment.random_resized_crop or config.augment.flip:
    return cannot('the training images are augmented, so the frozen bottom sees new inputs '
                  'every epoch')
  block, why = boundary(model, adapted)
  if block is None:
    return cannot(why)

  probe = next(data.eval_batches(splits['train'], batch_size=2,
                                 transform=_transforms(config, splits)['train']))
  args = pipeline.inputs(probe)
  # Abstract: the casts and the bottom are traced, never computed or compiled.
  shape_of = lambda train: jax.eval_shape(
      lambda p, a: bottom_output(adapted.module, block, *precision.cast((p, a), dtype),
                                 train=train), adapted.params, args)
  try:
    shape, train_mode = shape_of(True), True
  except flax.errors.InvalidRngError:
    if mode == 'auto':
      return cannot('the frozen blocks draw random numbers in training (dropout or '
                    'drop-connect), so cached features would differ from the uncached run; '
                    'cache_frozen_features=on caches their inference-mode values')
    logging.warning('cache_frozen_features=on: the frozen blocks below %s use dropout or '
                    'drop-connect in training; their features are cached in inference mode, '
                    'so this run differs from an uncached one.', block)
    shape, train_mode = shape_of(False), False
  if not hasattr(shape, 'shape'):
    return cannot(f'the first block that trains ({block}) is not a module called on an '
                  'array')

  below = model.blocks[:model.blocks.index(block)] if block in model.blocks else model.blocks
  bottom = {p: v for p, v in paths.flatten(adapted.params).items()
            if p.split('/', 1)[0] in below}
  key = {'version': _VERSION, 'model': model.config, 'block': block,
         'bottom_params': _sha256_arrays(bottom),
         'dtype': jnp.dtype(dtype).name, 'train_mode': train_mode,
         'image_size': config.image_size, 'eval_crop_ratio': config.eval_crop_ratio,
         'dataset': config.dataset}
  directories = {}
  for role, split in splits.items():
    try:
      material = {**key, 'role': role, 'data': _data_fingerprint(split)}
    except ValueError as e:
      return cannot(f'the {role} split has {e}')
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode())
    directories[role] = os.path.join(cache_root(config), digest.hexdigest()[:32])
  warm = all(_load(d) is not None for d in directories.values())
  total_bytes = 4 * int(np.prod(shape.shape[1:])) * sum(s.num_examples for s in splits.values())
  if mode == 'auto' and not warm:
    seen = config.total_steps * config.batch_size
    if seen < splits['train'].num_examples:
      return cannot(f'the run sees {seen} training examples, fewer than the '
                    f'{splits["train"].num_examples} that building the cache computes')
    if total_bytes > MAX_BYTES:
      return cannot(f'the cache would take {total_bytes / 2**30:.1f} GiB (over '
                    f'{MAX_BYTES / 2**30:.0f}); cache_frozen_features=on builds it anyway')
  input_shapes = jax.eval_shape(lambda a: a, args)
  return (Plan(block, train_mode, directories, input_shapes, key, warm),
          Decision(True, 'exact' if train_mode else 'inference-mode bottom (on)', block, warm))


def _transforms(config, splits) -> dict:
  from finetune_jax import pipelines  # pylint: disable=g-import-not-at-top
  if pipelines.needs_host_transform(splits['train'], config):
    train, eval_ = pipelines.make_image_transforms(config)
  else:
    train = eval_ = None
  return {role: train if role == 'train' else eval_ for role in splits}


def build(plan_: Plan, decision: Decision, config, adapted, splits, pipeline, dtype):
  """(module, pipeline) that train on the cached features, built first unless warm."""
  from finetune_jax import pipelines  # pylint: disable=g-import-not-at-top
  tick = time.perf_counter()
  cached = {role: _load(d) for role, d in plan_.directories.items()}
  block = plan_.block
  if any(c is None for c in cached.values()):
    params = precision.cast(adapted.params, dtype)
    compute = jax.jit(lambda p, b: bottom_output(
        adapted.module, block, p, precision.cast(pipeline.inputs(b), dtype),
        train=plan_.train_mode, rngs={'dropout': jax.random.PRNGKey(0)}))
    transforms = _transforms(config, splits)
    for role, split in splits.items():
      if cached[role] is None:
        directory = plan_.directories[role]
        logging.info('Caching the frozen features at the input of %s for the %s split '
                     '(%d examples) in %s.', block, role, split.num_examples, directory)
        batches = data.eval_batches(split, batch_size=config.eval_batch_size,
                                    transform=transforms[role])
        _build(directory, lambda b: compute(params, b), batches,
               {**plan_.key, 'role': role})
        cached[role] = _load(directory)
  decision.build_s = time.perf_counter() - tick
  logging.info('Training on cached features at the input of %s (%s): %s.', block,
               'warm' if plan_.warm else f'built in {decision.build_s:.1f} s',
               plan_.directories['train'])

  def inputs(batch):
    # The model's own inputs only feed the bottom, now dead code: zeros of their shape.
    n = batch['label'].shape[0]
    dummies = jax.tree.map(lambda s: jnp.zeros((n, *s.shape[1:]), s.dtype),
                           plan_.input_shapes)
    return (batch['features'], *dummies)

  as_split = lambda role: data.Split(cached[role], len(cached[role]),
                                     splits[role].num_classes, splits[role].class_names)
  features = {role: as_split(role) for role in cached}
  return FromFeatures(adapted.module, block), pipelines.Pipeline(
      train=lambda start_step: data.train_batches(
          features['train'], batch_size=config.batch_size, seed=config.seed,
          start_step=start_step, per_process=True),
      inputs=inputs, describe=f'cached features at the input of {block}',
      **pipelines.eval_passes(lambda split: functools.partial(
          data.eval_batches, split, batch_size=config.eval_batch_size, per_process=True),
                              features['eval'], features.get('val'),
                              pipelines.extra_splits(features)))

"""Grain pipelines: an infinite, resumable training stream and a padded eval pass.

Both are `grain.MapDataset`s over example *indices*: range -> shuffle ->
repeat -> batch gives each step's indices as a pure function of (seed,
step), and one map per batch reads those examples with a single batched
read (`source.__getitems__`). Resuming is slicing at `start_step`; there is
no iterator state to save. Reading per batch rather than per example is
what makes this fast: array_record serves a batched read ~13x faster than
single reads (measured on Fashion-MNIST: ~9k vs ~2.2k examples/s end to end).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

from absl import flags
import grain
import jax
import numpy as np

Batch = dict[str, np.ndarray]

# Batches buffered ahead by reader threads. Grain's default (500 elements)
# means 500 *batches* here: fine for MNIST, gigabytes for 224px images.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


@dataclasses.dataclass
class Split:
  """One split of a dataset, ready for `train_batches` / `eval_batches`."""

  source: Any  # len(source); source[i] -> dict of numpy values / bytes / ints
  num_examples: int
  num_classes: int | None
  class_names: list[str] | None

  def subset(self, indices: np.ndarray) -> 'Split':
    """The examples at `indices` (sorted, unique) as a split of their own."""
    return dataclasses.replace(self, source=Subset(self.source, indices),
                               num_examples=len(indices))


class Subset:
  """Examples `indices` of a source, read through it (batched where it can).

  The wrapped source's attributes (`dataset_info`, `split`) stay visible, and
  `indices` is part of what identifies it (the feature cache keys on it).
  """

  def __init__(self, source, indices: np.ndarray):
    self.base, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.base[int(self.indices[i])]

  def __getitems__(self, indices):
    return read_examples(self.base, self.indices[np.asarray(indices, np.int64)].tolist())

  def __getattr__(self, name):
    if name in ('base', 'indices'):  # not set yet (unpickling)
      raise AttributeError(name)
    return getattr(self.base, name)


def labels(split: Split) -> np.ndarray:
  """Every example's label (int64 [N]), read in batches."""
  out = []
  for start in range(0, split.num_examples, 4096):
    stop = min(start + 4096, split.num_examples)
    out += [int(ex['label']) for ex in read_examples(split.source, list(range(start, stop)))]
  return np.asarray(out, np.int64)


def pick(count: int, total: int, seed: int, labels_: np.ndarray | None = None) -> np.ndarray:
  """`count` of `total` example indices (sorted), a pure function of the seed.

  With labels, the pick is stratified: each class gets its share of `count`
  (largest remainders break the rounding), so the subset keeps the class balance.
  """
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5eed]))
  if labels_ is None:
    return np.sort(rng.permutation(total)[:count])
  classes, sizes = np.unique(labels_, return_counts=True)
  quota = sizes * count / total
  take = np.floor(quota).astype(np.int64)
  extra = np.argsort(-(quota - take), kind='stable')[:count - take.sum()]
  take[extra] += 1
  chosen = [rng.permutation(np.flatnonzero(labels_ == c))[:k] for c, k in zip(classes, take)]
  return np.sort(np.concatenate(chosen))


def as_count(value: float, total: int, name: str) -> int:
  """A count (>= 1) or a fraction (< 1) of `total`; 0 stays 0."""
  if value < 0:
    raise ValueError(f'{name}={value} must be >= 0 (a count, or a fraction below 1).')
  count = int(round(value * total)) if value < 1 else int(value)
  if value and not count:
    raise ValueError(f'{name}={value} selects no example of {total}; use a larger fraction.')
  return count


def carve(split: Split, *, validation: float, train_examples: float, seed: int,
          stratify: bool, name: str) -> tuple[Split, Split | None]:
  """(train, validation) from a train split: the validation examples first, then a
  subset of the rest to train on; both stratified by class where `stratify`."""
  total = split.num_examples
  n_val = as_count(validation, total, 'validation_examples')
  if n_val >= total:
    raise ValueError(f'validation_examples={validation} takes {n_val} of the {total} examples '
                     f'of {name}, leaving none to train on; use fewer.')
  n_train = as_count(train_examples, total - n_val, 'train_examples')
  if n_train > total - n_val:
    raise ValueError(f'train_examples={train_examples} is more than the {total - n_val} '
                     f'examples of {name} left to train on'
                     + (f' after {n_val} for validation' if n_val else '') + '; use fewer.')
  if not n_val and not n_train:
    return split, None
  labels_ = labels(split) if stratify else None
  val_idx = pick(n_val, total, seed, labels_) if n_val else np.zeros(0, np.int64)
  rest = np.setdiff1d(np.arange(total), val_idx)
  train_idx = rest
  if n_train:
    chosen = pick(n_train, len(rest), seed + 1, None if labels_ is None else labels_[rest])
    train_idx = rest[chosen]
  return split.subset(train_idx), (split.subset(val_idx) if n_val else None)


def train_batches(split: Split, *, batch_size: int, seed: int,
                  start_step: int = 0, transform: Callable | None = None,
                  worker_count: int = 0, per_process: bool = False) -> Iterator[Batch]:
  """Infinite stream of global batches, reshuffled every epoch.

  Batch k is a pure function of (seed, k): `start_step=k` yields exactly what
  an uninterrupted run sees from step k on. Epochs are shuffled, then
  concatenated, then batched: no example is dropped, and a batch may
  straddle two epochs.

  Args:
    split: from `load_split`.
    batch_size: global batch size (leading dim of every array).
    seed: shuffle seed (also seeds a random transform).
    start_step: index of the first batch to yield.
    transform: per-example function, a `grain.transforms.Map`, or a
      `grain.transforms.RandomMap` (given a generator seeded by (seed, step),
      so augmentation is resumable too). Runs in the grain workers.
    worker_count: grain worker processes; 0 reads in this process.
    per_process: read and yield only this process's rows of each global batch
      (`process_rows`), in a run of several processes.
  """
  _check_positive(batch_size=batch_size)
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  if split.num_examples == 0:
    raise ValueError('Cannot draw training batches from an empty split.')
  shuffle_seed = _shuffle_seed(seed)
  indices = grain.MapDataset.range(len(split.source)).shuffle(seed=shuffle_seed)
  indices = indices.repeat()  # each epoch is reshuffled (seed + epoch)
  batches = indices.batch(batch_size, drop_remainder=True).map_with_index(
      ReadBatch(split.source, transform, shuffle_seed, rows=_rows(batch_size, per_process)))
  return _iterate(batches[start_step:], worker_count)


def eval_batches(split: Split, *, batch_size: int,
                 transform: Callable | None = None,
                 worker_count: int = 0, per_process: bool = False) -> Iterator[Batch]:
  """One pass over the split in stored order, every batch exactly batch_size.

  The last batch is padded with blank examples; `mask` (bool [B]) is True
  for real examples, so summing metrics under the mask counts each once.
  `per_process`: as train_batches'.
  """
  _check_positive(batch_size=batch_size)
  batches = grain.MapDataset.range(len(split.source)).batch(batch_size)
  batches = batches.map_with_index(
      ReadBatch(split.source, transform, seed=0, pad_to=batch_size,
                rows=_rows(batch_size, per_process)))
  return _iterate(batches, worker_count)


class ReadBatch:
  """(step, example indices) -> batch: batched read, transform, stack.

  A class rather than a closure so grain can pickle it into worker processes.
  """

  def __init__(self, source, transform=None, seed: int = 0,
               pad_to: int | None = None, rows: slice = slice(None)):
    self.source = source
    self.transform = transform
    self.seed = seed
    self.pad_to = pad_to
    self.rows = rows  # of the global batch that this process reads (process_rows)

  def __call__(self, step: int, indices: np.ndarray) -> Batch:
    positions = np.arange(self.pad_to or len(indices))[self.rows]
    real = positions[positions < len(indices)]
    examples = read_examples(self.source, indices[real].tolist())
    examples = self._transformed(step, examples, real)
    if self.pad_to is None:
      return stack_examples(examples)
    blank = blank_like(examples[0] if examples else self.source[0])
    examples += [blank] * (len(positions) - len(real))
    batch = stack_examples(examples)
    batch['mask'] = np.arange(len(positions)) < len(real)
    return batch

  def _transformed(self, step: int, examples: list, positions) -> list:
    transform = self.transform
    if transform is None:
      return list(examples)
    if isinstance(transform, grain.transforms.RandomMap):
      # Seeded by (seed, step, row of the global batch): the same draws whichever process
      # reads the row.
      return [transform.random_map(ex, np.random.default_rng([self.seed, step, int(i)]))
              for ex, i in zip(examples, positions)]
    if isinstance(transform, grain.transforms.Map):
      transform = transform.map
    return [transform(ex) for ex in examples]


def process_rows(batch_size: int) -> slice:
  """The rows of a global batch that this process reads: its equal share, in process order
  (the devices of process i hold the i-th block of a batch sharded over all devices)."""
  count = jax.process_count()
  if batch_size % count:
    raise ValueError(f'batch size {batch_size} must be divisible by the {count} processes.')
  share = batch_size // count
  return slice(jax.process_index() * share, (jax.process_index() + 1) * share)


def _rows(batch_size: int, per_process: bool) -> slice:
  return process_rows(batch_size) if per_process else slice(None)


def local_rows(batches: Iterator[Batch], batch_size: int) -> Iterator[Batch]:
  """This process's rows of each global batch, for pipelines that must read whole batches
  (text ones tokenise and bucket a batch together)."""
  rows = process_rows(batch_size)
  if rows == slice(0, batch_size):
    return batches
  return (jax.tree.map(lambda x: x[rows], b) for b in batches)


def read_examples(source, indices: Sequence[int]) -> list:
  """One batched read where the source offers it (TFDS data sources do)."""
  if hasattr(source, '__getitems__'):
    return list(source.__getitems__(indices))
  return [source[i] for i in indices]


def stack_examples(examples: Sequence[dict[str, Any]]) -> Batch:
  """Stacks examples into arrays with a leading batch dimension.

  Text (bytes/str) goes into object arrays, kept as Python objects for the
  tokeniser; int64 becomes int32 (JAX's default integer width).
  """
  batch = {}
  for key, first in examples[0].items():
    values = [example[key] for example in examples]
    if isinstance(first, dict):
      batch[key] = stack_examples(values)
    elif isinstance(first, (bytes, str)):
      batch[key] = np.empty(len(values), dtype=object)
      batch[key][:] = values
    else:
      array = np.stack(values)
      batch[key] = array.astype(np.int32) if array.dtype == np.int64 else array
  return batch


def blank_like(example: dict[str, Any]) -> dict[str, Any]:
  """Same structure, zeros / empty strings: padding for the last eval batch."""
  def blank(value):
    if isinstance(value, dict):
      return {k: blank(v) for k, v in value.items()}
    if isinstance(value, (bytes, str)):
      return type(value)()
    return np.zeros_like(value)
  return blank(example)


def _shuffle_seed(seed: int) -> int:
  """A 32-bit shuffle seed that does not correlate with nearby seeds.

  Grain shuffles epoch e with seed + e, so seeds s and s+1 used as-is would
  share all but one epoch order. Hashing the seed first avoids that.
  """
  return int(np.random.SeedSequence(int(seed)).generate_state(1)[0])


def _iterate(ds: grain.MapDataset, worker_count: int) -> Iterator[Batch]:
  it = ds.to_iter_dataset(_READ_OPTIONS)
  if worker_count > 0:
    # Grain's workers read absl flags; outside an absl app (tests, notebooks)
    # nothing has parsed them, so accept the defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return _closing(iter(it))
  return iter(it)


def _closing(iterator) -> Iterator[Batch]:
  """Stops grain's worker processes when the stream ends or is dropped."""
  try:
    yield from iterator
  finally:
    iterator.close()


def _check_positive(**values: int) -> None:
  for name, value in values.items():
    if value <= 0:
      raise ValueError(f'{name} must be positive, got {value}.')

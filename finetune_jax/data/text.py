"""Text datasets, tokenized once into the data dir, and their padded batches.

    split = data.load_text_split('fortunes', 'train', tokenizer=tok)
    data.check_lengths(split, 128, truncate=False, what='fortunes[train]')
    for batch in data.text_batches(split, batch_size=32, seed=0,
                                   max_length=128, pad_id=0, truncate=False):
      ...  # {'input_ids' int32 [32, L], 'attention_mask', 'label' int32 [32]}

Tokenizing happens once per (dataset, tokenizer): the first `load_text_split`
(or `python -m finetune_jax.data.prepare --tokenizer <model>`) writes a TFDS
array_record dataset of token ids beside the text one,

    <data_dir>/<builder>_tokenized/<fingerprint>/<version of the text data>/

and later loads only read it (it is rebuilt if the text dataset's splits
change size). The fingerprint is the first 16 hex digits of the sha256 of
the tokenizer's JSON (`Tokenizer.to_str()` with truncation and padding
turned off: those happen here, at batching time), plus `_<text_key>` for a
text field other than 'text'. Examples keep the text dataset's order:

    {'input_ids': int32 [n],           # the tokenizer's specials included
     'label': int,                     # when the dataset has a class label
     'prompt_length': int}             # when the dataset has a 'prompt' field

The label is the text dataset's 'label' feature, else its only ClassLabel
feature (Austen's 'book'). With a 'prompt' field, prompt and text are
encoded as one string, prompt first (put any separator in the prompt), and
`prompt_length` counts the leading tokens that are specials or start inside
the prompt. Texts that are empty or only whitespace are dropped (they would
be all padding: a NaN under mean pooling) and the number is logged.

Batches are padded to a few bucket lengths (`bucket_lengths`) so a compiled
step sees a handful of shapes. Text longer than `max_length` is refused by
`check_lengths` unless truncation is asked for, which keeps the first
tokens and the tokenizer's closing specials (BERT's [SEP]); it is never
wrapped into another example. Causal-LM packing is in `packing`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import time
import types
from typing import ClassVar, Iterator, Sequence

from etils import epath
import grain
import numpy as np
import tensorflow_datasets as tfds

from finetune_jax.data import builders
from finetune_jax.data import pipeline

Batch = dict[str, np.ndarray]

TOKENIZED_SUFFIX = '_tokenized'
SOURCE_FILE = 'text_source.json'  # written last: marks a complete build
PROMPT_KEY = 'prompt'
_ENCODE_BATCH = 1024  # texts per `encode_batch` call
_READ_CHUNK = 4096  # examples per batched read


@dataclasses.dataclass
class TextSplit(pipeline.Split):
  """A tokenized split: `source[i]` is {'input_ids'[, 'label', 'prompt_length']}.

  `lengths` is read from a side file, so no example is read to build it.
  """

  lengths: np.ndarray  # int32 [num_examples]: tokens per example
  has_prompt: bool  # examples carry 'prompt_length'
  # Closing special tokens (BERT's [SEP]) that truncation keeps at the end.
  keep_last: int
  name: str  # e.g. 'fortunes[train]', for messages
  version_dir: str

  def subset(self, indices: np.ndarray) -> 'TextSplit':
    return dataclasses.replace(super().subset(indices), lengths=self.lengths[indices])


# ------------------------------------------------------------ tokenizers


def plain_tokenizer(tokenizer):
  """A copy with truncation and padding off: the stored ids are whole texts."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  tok.no_truncation()
  tok.no_padding()
  return tok


def tokenizer_fingerprint(tokenizer) -> str:
  """sha256 (hex) of the tokenizer's JSON, truncation and padding off."""
  text = plain_tokenizer(tokenizer).to_str()
  return hashlib.sha256(text.encode('utf-8')).hexdigest()


def closing_specials(tokenizer) -> int:
  """How many special tokens the tokenizer appends after a text ([SEP]: 1)."""
  empty, some = tokenizer.encode('').ids, tokenizer.encode('a').ids
  n = 0
  while (n < min(len(empty), len(some) - 1) and
         empty[-1 - n] == some[-1 - n]):
    n += 1
  return n


def encode(tokenizer, texts: Sequence[str],
           prompts: Sequence[str] | None = None):
  """(ids per text, prompt lengths or None), `encode_batch` in chunks."""
  ids, prompt_lengths = [], [] if prompts is not None else None
  for start in range(0, len(texts), _ENCODE_BATCH):
    chunk = list(texts[start:start + _ENCODE_BATCH])
    if prompts is None:
      encodings = tokenizer.encode_batch(chunk)
    else:
      heads = list(prompts[start:start + _ENCODE_BATCH])
      encodings = tokenizer.encode_batch(
          [p + t for p, t in zip(heads, chunk)])
      prompt_lengths += [_prompt_length(e, len(p))
                         for e, p in zip(encodings, heads)]
    ids += [np.asarray(e.ids, np.int32) for e in encodings]
  return ids, prompt_lengths


def _prompt_length(encoding, prompt_chars: int) -> int:
  """Leading tokens that are specials or start inside the prompt."""
  for i, (special, (start, _)) in enumerate(
      zip(encoding.special_tokens_mask, encoding.offsets)):
    if not special and start >= prompt_chars:
      return i
  return len(encoding.ids)


# ----------------------------------------------------- tokenized datasets


def tokenized_version_dir(name: str, tokenizer, data_dir: str | None = None,
                          text_key: str = 'text') -> str:
  """Where the tokenized copy of dataset `name` for `tokenizer` lives."""
  from finetune_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  data_dir = data_lib.resolve_data_dir(data_dir)
  raw_dir = _raw_version_dir(name, data_dir)
  return os.path.join(data_dir, _tokenized_name(raw_dir, data_dir),
                      _config_name(tokenizer, text_key),
                      os.path.basename(raw_dir))


def prepare_tokenized(name: str, tokenizer, data_dir: str | None = None,
                      text_key: str = 'text') -> str:
  """Builds the tokenized copy of `name` if missing; returns its version dir."""
  from finetune_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  data_dir = data_lib.resolve_data_dir(data_dir)
  version_dir = tokenized_version_dir(name, tokenizer, data_dir, text_key)
  raw_dir = _raw_version_dir(name, data_dir)
  record = _read_source(version_dir)
  if record is None or record.get('text_splits') != _split_signature(raw_dir):
    _build(name, raw_dir, version_dir, data_dir, tokenizer, text_key)
  return version_dir


def load_text_split(name: str, split: str, *, tokenizer,
                    data_dir: str | None = None,
                    text_key: str = 'text') -> TextSplit:
  """The tokenized view of one split (TFDS split syntax: 'train[:90%]').

  Builds the tokenized dataset on first use (one log line); then only reads.
  Raises one ValueError if the dataset is not prepared, has no `text_key`
  field, or has no such split.
  """
  version_dir = prepare_tokenized(name, tokenizer, data_dir, text_key)
  record = _read_source(version_dir)
  builder = tfds.builder_from_directory(version_dir)
  available = list(builder.info.splits.keys())
  for requested in (p.split('[')[0].strip() for p in split.split('+')):
    if requested not in available:
      raise ValueError(f'Dataset {name!r} has no split {requested!r}; its '
                       f'splits: {", ".join(available)}.')
  source = builder.as_data_source(split)
  instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(
      builder.info.splits)
  with np.load(os.path.join(version_dir, record['lengths_file'])) as stored:
    lengths = np.concatenate(
        [stored[i.splitname][i.from_:i.to] for i in instructions])
  features = builder.info.features
  label = features['label'] if 'label' in features.keys() else None
  return TextSplit(
      source=source,
      num_examples=len(source),
      num_classes=label.num_classes if label else None,
      class_names=list(label.names) if label else None,
      lengths=lengths.astype(np.int32),
      has_prompt='prompt_length' in features.keys(),
      keep_last=record['keep_last'],
      name=f'{name}[{split}]',
      version_dir=version_dir,
  )


def _raw_version_dir(name: str, data_dir: str) -> str:
  from finetune_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  version_dir = data_lib.prepared_version_dir(name, data_dir)
  if version_dir is None:
    raise data_lib.not_prepared_error(name, data_dir)
  return version_dir


def _split_signature(version_dir: str) -> dict[str, list]:
  """Split -> [examples per shard, bytes]: changes when the text data does."""
  with open(os.path.join(version_dir, 'dataset_info.json')) as f:
    splits = json.load(f).get('splits', [])
  return {s['name']: [[int(n) for n in s.get('shardLengths', [])],
                      int(s.get('numBytes', 0))] for s in splits}


def _tokenized_name(raw_version_dir: str, data_dir: str) -> str:
  """'fortunes_poems' -> 'fortunes_poems_tokenized' (a valid TFDS name)."""
  raw = os.path.relpath(os.path.dirname(raw_version_dir), data_dir)
  return re.sub(r'[^a-z0-9_]+', '_', raw.lower()) + TOKENIZED_SUFFIX


def _config_name(tokenizer, text_key: str) -> str:
  name = tokenizer_fingerprint(tokenizer)[:16]
  if text_key != 'text':
    name += '_' + re.sub(r'[^a-z0-9_]+', '_', text_key.lower())
  return name


def _label_key(features) -> str | None:
  """'label' if it is a ClassLabel, else the only ClassLabel feature."""
  labels = [k for k, f in features.items()
            if isinstance(f, tfds.features.ClassLabel)]
  if 'label' in labels:
    return 'label'
  return labels[0] if len(labels) == 1 else None


def _read_all(source) -> list:
  return [ex for start in range(0, len(source), _READ_CHUNK)
          for ex in pipeline.read_examples(
              source, range(start, min(start + _READ_CHUNK, len(source))))]


def _as_str(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _build(name: str, raw_dir: str, version_dir: str, data_dir: str,
           tokenizer, text_key: str) -> None:
  """Tokenizes every split of the text dataset into a TFDS dataset."""
  start = time.perf_counter()
  raw = tfds.builder_from_directory(raw_dir)
  features = raw.info.features
  if text_key not in features.keys():
    raise ValueError(
        f'Dataset {name!r} has no text field {text_key!r} (its fields: '
        f'{", ".join(sorted(features.keys()))}); name the text field with '
        'text_key.')
  label_key = _label_key(features)
  with_prompt = PROMPT_KEY in features.keys() and text_key != PROMPT_KEY
  tok = plain_tokenizer(tokenizer)
  splits, dropped = {}, {}
  for split in raw.info.splits.keys():
    examples = _read_all(raw.as_data_source(split))
    texts = [_as_str(ex[text_key]) for ex in examples]
    keep = [i for i, t in enumerate(texts) if t.strip()]
    dropped[split] = len(texts) - len(keep)
    if not keep:
      raise ValueError(f'Dataset {name!r} split {split!r} has no non-empty '
                       f'{text_key!r} text to tokenize.')
    prompts = ([_as_str(examples[i][PROMPT_KEY]) for i in keep]
               if with_prompt else None)
    ids, prompt_lengths = encode(tok, [texts[i] for i in keep], prompts)
    columns = {'input_ids': ids}
    if label_key:
      columns['label'] = [int(examples[i][label_key]) for i in keep]
    if with_prompt:
      columns['prompt_length'] = prompt_lengths
    splits[split] = columns

  out_features = {'input_ids': tfds.features.Tensor(shape=(None,),
                                                     dtype=np.int32)}
  if label_key:
    out_features['label'] = tfds.features.ClassLabel(
        names=features[label_key].names)
  if with_prompt:
    out_features['prompt_length'] = tfds.features.Scalar(dtype=np.int32)
  tokenized_name = os.path.basename(os.path.dirname(os.path.dirname(
      version_dir)))
  config = os.path.basename(os.path.dirname(version_dir))
  shutil.rmtree(os.path.dirname(version_dir), ignore_errors=True)  # stale
  builder_cls = _tokenized_builder(
      tokenized_name, config, os.path.basename(version_dir),
      tfds.features.FeaturesDict(out_features), splits,
      f'{name} ({text_key!r}) tokenized; fingerprint {config}.')
  with _quiet_tfds():
    builder_cls(config=config, data_dir=data_dir,
                file_format='array_record').download_and_prepare()

  # Lengths as stored (read back, so they match the files' order).
  built = tfds.builder_from_directory(version_dir)
  lengths = {split: np.array([len(ex['input_ids']) for ex in _read_all(
      built.as_data_source(split))], np.int32) for split in splits}
  np.savez(os.path.join(version_dir, 'lengths.npz'), **lengths)
  _write_source(version_dir, {
      'dataset': name, 'text_version_dir': raw_dir, 'text_key': text_key,
      'text_splits': _split_signature(raw_dir),
      'label_key': label_key, 'prompt_key': PROMPT_KEY if with_prompt else None,
      'tokenizer_sha256': tokenizer_fingerprint(tokenizer),
      'keep_last': closing_specials(tok), 'lengths_file': 'lengths.npz',
      'splits': {s: {'examples': int(len(v)), 'tokens': int(v.sum()),
                     'dropped_empty': dropped[s]} for s, v in lengths.items()},
  })
  with open(os.path.join(version_dir, 'tokenizer.json'), 'w') as f:
    f.write(tok.to_str())
  logging.info(
      'Tokenized %s into %s in %.1fs: %s.', name, version_dir,
      time.perf_counter() - start,
      '; '.join(f'{s} {len(v)} texts, {int(v.sum())} tokens'
                + (f', {dropped[s]} empty dropped' if dropped[s] else '')
                for s, v in lengths.items()))


class _TokenizedBuilder(tfds.core.GeneratorBasedBuilder,
                        skip_registration=True):
  """Base of the per-dataset builders `_tokenized_builder` makes."""

  FEATURES: ClassVar[tfds.features.FeaturesDict]
  SPLITS: ClassVar[dict[str, dict[str, list]]]  # split -> column -> values
  DESCRIPTION: ClassVar[str]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # see builders.OfflineBuilder.code_path
    return epath.Path(inspect.getfile(_TokenizedBuilder))

  def _info(self) -> tfds.core.DatasetInfo:
    # disable_shuffling keeps the text dataset's order (TFDS would otherwise
    # reorder examples by hashed key).
    return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION,
                                 features=self.FEATURES,
                                 disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is in memory
    return {split: self._generate_examples(columns)
            for split, columns in self.SPLITS.items()}

  def _generate_examples(self, columns):
    keys = list(columns)
    for i, values in enumerate(zip(*columns.values())):
      yield i, dict(zip(keys, values))


def _tokenized_builder(name: str, config: str, version: str, features,
                       splits: dict, description: str):
  """A builder class named `name` with one config (TFDS reads the class)."""
  return types.new_class(
      name, (_TokenizedBuilder,), {'skip_registration': True},
      lambda ns: ns.update(
          name=name, VERSION=tfds.core.Version(version),
          BUILDER_CONFIGS=[tfds.core.BuilderConfig(name=config)],
          FEATURES=features, SPLITS=splits, DESCRIPTION=description,
          __module__=__name__))


@contextlib.contextmanager
def _quiet_tfds():
  """No TFDS progress bars for a build that logs its own line."""
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  active = getattr(tqdm_utils, '_active', True)
  tqdm_utils.display_progress_bar(False)
  try:
    yield
  finally:
    tqdm_utils.display_progress_bar(active)


def _read_source(version_dir: str) -> dict | None:
  return builders.read_build_record(os.path.join(version_dir, SOURCE_FILE))


def _write_source(version_dir: str, record: dict) -> None:
  builders.write_build_record(os.path.join(version_dir, SOURCE_FILE), record)


# --------------------------------------------------------------- lengths


def check_lengths(split: TextSplit, max_length: int, truncate: bool,
                  what: str | None = None,
                  model_context: int | None = None) -> int:
  """Refuses over-long examples, or counts the ones truncation will cut.

  Returns how many examples are longer than `max_length` (0 if none); with
  `truncate` False any such example is one ValueError naming the fixes.
  `model_context` (the model's positions), when given, bounds max_length.
  """
  what = what or split.name
  if max_length <= 0:
    raise ValueError(f'text.max_length must be positive, got {max_length}.')
  if model_context is not None and max_length > model_context:
    raise ValueError(
        f'text.max_length={max_length} exceeds the model\'s context of '
        f'{model_context} positions; set --config.text.max_length='
        f'{model_context} or less.')
  too_long = int((split.lengths > max_length).sum())
  if too_long and not truncate:
    context = (f' ({model_context})' if model_context is not None else '')
    raise ValueError(
        f'{too_long} of {split.num_examples} examples of {what} are longer '
        f'than text.max_length={max_length} tokens (longest: '
        f'{int(split.lengths.max())} tokens). Text is never cut or wrapped '
        'silently: set --config.text.truncate=True to keep the first '
        f'{max_length} tokens of each, or a larger --config.text.max_length, '
        f"up to the model's context{context}.")
  return too_long


def bucket_lengths(max_length: int, smallest: int = 32) -> tuple[int, ...]:
  """Powers of two from `smallest` below max_length, then max_length itself.

  bucket_lengths(128) == (32, 64, 128); bucket_lengths(100) == (32, 64, 100).
  """
  if max_length <= 0 or smallest <= 0:
    raise ValueError(f'max_length and smallest must be positive, got '
                     f'{max_length} and {smallest}.')
  buckets, length = [], smallest
  while length < max_length:
    buckets.append(length)
    length *= 2
  return tuple(buckets) + (max_length,)


def pick_bucket(longest: int, buckets: Sequence[int], max_length: int) -> int:
  """The smallest bucket >= longest, capped at max_length (always a bucket)."""
  for length in sorted({b for b in buckets if 0 < b < max_length}):
    if length >= longest:
      return length
  return max_length


def truncated(ids: np.ndarray, max_length: int, keep_last: int) -> np.ndarray:
  """The first tokens, plus the closing specials ([SEP]) when there are any."""
  if len(ids) <= max_length:
    return ids
  keep_last = min(keep_last, max_length - 1)
  if keep_last <= 0:
    return ids[:max_length]
  return np.concatenate([ids[:max_length - keep_last], ids[-keep_last:]])


# ---------------------------------------------------------------- batches


class PadBatch:
  """Example indices -> a padded batch (a class so grain can pickle it)."""

  def __init__(self, split: TextSplit, max_length: int,
               buckets: Sequence[int], pad_id: int, truncate: bool,
               pad_to: int | None = None):
    self.source = split.source
    self.name = split.name
    self.keep_last = split.keep_last
    self.max_length = max_length
    self.buckets = tuple(buckets)
    self.pad_id = pad_id
    self.truncate = truncate
    self.pad_to = pad_to

  def __call__(self, indices: np.ndarray) -> Batch:
    examples = pipeline.read_examples(self.source, np.asarray(indices).tolist())
    rows = [ex['input_ids'] for ex in examples]
    longest = max(len(r) for r in rows)
    if longest > self.max_length and not self.truncate:
      raise ValueError(
          f'An example of {self.name} has {longest} tokens, more than '
          f'text.max_length={self.max_length}; see check_lengths (set '
          '--config.text.truncate=True or a larger --config.text.max_length).')
    rows = [truncated(r, self.max_length, self.keep_last) for r in rows]
    length = pick_bucket(max(len(r) for r in rows), self.buckets,
                         self.max_length)
    num_rows = self.pad_to or len(rows)
    input_ids = np.full((num_rows, length), self.pad_id, np.int32)
    attention_mask = np.zeros((num_rows, length), np.int32)
    for i, row in enumerate(rows):
      input_ids[i, :len(row)] = row
      attention_mask[i, :len(row)] = 1
    # Blank rows attend to one pad token: a row with nothing to attend to
    # gives NaN under softmax or mean pooling, and NaN * 0 is still NaN.
    attention_mask[len(rows):, 0] = 1
    batch = {'input_ids': input_ids, 'attention_mask': attention_mask}
    if 'label' in examples[0]:
      batch['label'] = np.zeros(num_rows, np.int32)
      batch['label'][:len(rows)] = [ex['label'] for ex in examples]
    if self.pad_to is not None:
      batch['mask'] = np.arange(num_rows) < len(rows)
    return batch


def text_batches(split: TextSplit, *, batch_size: int, seed: int,
                 start_step: int = 0, max_length: int,
                 buckets: Sequence[int] | None = None, pad_id: int,
                 truncate: bool, worker_count: int = 0) -> Iterator[Batch]:
  """Infinite training stream for classification, reshuffled every epoch.

  Batch k is a pure function of (seed, k), as `pipeline.train_batches` (same
  shuffle): `start_step=k` resumes exactly. Each batch is padded to the
  smallest bucket >= its longest example (`buckets` defaults to
  `bucket_lengths(max_length)`); longer examples are cut to max_length when
  `truncate`, else refused.

  Yields {'input_ids' int32 [B, L], 'attention_mask' int32 [B, L],
  'label' int32 [B] (when the dataset has labels)}.
  """
  pipeline._check_positive(batch_size=batch_size, max_length=max_length)  # pylint: disable=protected-access
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  if split.num_examples == 0:
    raise ValueError('Cannot draw training batches from an empty split.')
  if not truncate:
    check_lengths(split, max_length, truncate)
  buckets = bucket_lengths(max_length) if buckets is None else buckets
  indices = grain.MapDataset.range(split.num_examples).shuffle(
      seed=pipeline._shuffle_seed(seed)).repeat()  # pylint: disable=protected-access
  batches = indices.batch(batch_size, drop_remainder=True).map(
      PadBatch(split, max_length, buckets, pad_id, truncate))
  return pipeline._iterate(batches[start_step:], worker_count)  # pylint: disable=protected-access


def text_eval_batches(split: TextSplit, *, batch_size: int, max_length: int,
                      buckets: Sequence[int] | None = None, pad_id: int,
                      truncate: bool = True, sort_by_length: bool = False,
                      worker_count: int = 0) -> Iterator[Batch]:
  """One pass, every example exactly once, each batch exactly batch_size rows.

  Stored order, or shortest first with `sort_by_length` (less padding; order
  ties by index). The last batch is filled with blank rows: 'mask' (bool
  [B]) is True for real examples. Over-long examples are cut to max_length:
  `check_lengths` on this split is the place that refuses them (truncate=False
  here refuses too).
  """
  pipeline._check_positive(batch_size=batch_size, max_length=max_length)  # pylint: disable=protected-access
  if not truncate:
    check_lengths(split, max_length, truncate)
  buckets = bucket_lengths(max_length) if buckets is None else buckets
  order = (np.argsort(split.lengths, kind='stable') if sort_by_length
           else np.arange(split.num_examples))
  batches = grain.MapDataset.source(order).batch(batch_size).map(
      PadBatch(split, max_length, buckets, pad_id, truncate=True,
               pad_to=batch_size))
  return pipeline._iterate(batches, worker_count)  # pylint: disable=protected-access

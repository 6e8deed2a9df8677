"""Jane Austen's six novels (Debian `r-cran-janeaustenr`): a causal-LM corpus.

The package ships the novels as R lazy-load data, one character vector of
lines per novel. `Rdata.rdx` (gzip) is a serialized index: variable name ->
(offset, length) into `Rdata.rdb`, where each object is a 4-byte length
followed by zlib data. PyPI `rdata` parses both; it reads data only (no R
code runs, nothing is unpickled), so R itself is never needed.
"""

from __future__ import annotations

import gzip
import os
import re
import warnings
import zlib

import numpy as np
import tensorflow_datasets as tfds

from finetune_jax.data import builders

# (R variable, title as janeaustenr's austen_books() gives it), in
# publication order: the ClassLabel order of 'book'.
NOVELS = (
    ('sensesensibility', 'Sense & Sensibility'),
    ('prideprejudice', 'Pride & Prejudice'),
    ('mansfieldpark', 'Mansfield Park'),
    ('emma', 'Emma'),
    ('northangerabbey', 'Northanger Abbey'),
    ('persuasion', 'Persuasion'),
)
BOOKS = tuple(title for _, title in NOVELS)
PACKAGE_SUBDIR = 'usr/lib/R/site-library/janeaustenr'
# Lazy-load databases that may hold the novels (data/ in 1.0.0; older
# releases kept them as package-internal data in R/sysdata).
_DATABASES = ('data/Rdata', 'R/sysdata')
# Every TEST_EVERY-th chapter of each book (10, 20, ...) is held out.
TEST_EVERY = 10

_CHAPTER = re.compile(r'^chapter\s+([0-9]+|[ivxlc]+)\.?$', re.IGNORECASE)
_VOLUME = re.compile(r'^volume\s+([0-9]+|[ivxlc]+)\.?$', re.IGNORECASE)
_END = re.compile(r'^(the end|finis|\(end of volume \w+\.?\))\.?$',
                  re.IGNORECASE)
# Northanger Abbey ends with an editor's note: it and all after it go.
_EDITORIAL = re.compile(r'^a note on the text$', re.IGNORECASE)


def read_novels(package_dir: os.PathLike | str) -> dict[str, list[str]]:
  """R variable -> the novel's lines, from the extracted package dir."""
  package_dir = os.fspath(package_dir)
  for database in _DATABASES:
    rdx_path = os.path.join(package_dir, database + '.rdx')
    if os.path.exists(rdx_path):
      novels = read_lazy_load_db(rdx_path, os.path.join(package_dir,
                                                        database + '.rdb'))
      if all(var in novels for var, _ in NOVELS):
        return {var: novels[var] for var, _ in NOVELS}
  looked_for = ' and '.join(d + '.rdx' for d in _DATABASES)
  raise ValueError(
      f'No janeaustenr lazy-load data with the six novels under '
      f'{package_dir} (looked for {looked_for}). Is it an extracted '
      'r-cran-janeaustenr package?')


def read_lazy_load_db(rdx_path: str, rdb_path: str) -> dict[str, list[str]]:
  """Every character-vector object of an R lazy-load database."""
  import rdata  # pylint: disable=g-import-not-at-top
  with open(rdx_path, 'rb') as f:
    index = _parse_r(gzip.decompress(f.read()), rdata)
  with open(rdb_path, 'rb') as f:
    rdb = f.read()
  out = {}
  for name, (offset, length) in index['variables'].items():
    # 4 bytes of uncompressed length, then a zlib stream.
    raw = zlib.decompress(rdb[int(offset) + 4:int(offset) + int(length)])
    value = _parse_r(raw, rdata)
    if getattr(value, 'dtype', None) is not None and value.dtype.kind == 'U':
      out[str(name)] = ['' if v is None else str(v) for v in value.tolist()]
  return out


def _parse_r(raw: bytes, rdata):
  with warnings.catch_warnings():  # "Unknown file type: assumed RDS"
    warnings.simplefilter('ignore')
    return rdata.conversion.convert(rdata.parser.parse_data(raw))


def paragraphs(lines: list[str]) -> list[tuple[int, str]]:
  """(chapter, paragraph) pairs of one novel's lines.

  Paragraphs are runs of non-blank lines, their whitespace collapsed to
  single spaces (the line breaks are the e-text's 70-column wrapping, not
  the author's). Chapter headings are not paragraphs: they only advance the
  chapter number, counted 1, 2, ... through the book (Emma's restart in each
  volume). Dropped: everything before the first chapter (title page,
  Northanger Abbey's advertisement), volume headings, end markers ('THE END',
  'Finis', '(End of volume one.)'), scene breaks ('* * * * *': no letter
  or digit) and Northanger Abbey's closing editor's note.
  """
  out, chapter, current = [], 0, []
  for line in list(lines) + ['']:
    if line.strip():
      current.append(line)
      continue
    if not current:
      continue
    text = ' '.join(' '.join(current).split())
    current = []
    if _CHAPTER.match(text):
      chapter += 1
    elif _EDITORIAL.match(text):
      break
    elif chapter and not (_VOLUME.match(text) or _END.match(text) or
                          not any(c.isalnum() for c in text)):
      out.append((chapter, text))
  return out


def is_test_chapter(chapter: int) -> bool:
  return chapter % TEST_EVERY == 0


class Austen(builders.OfflineBuilder):
  """Paragraphs of Jane Austen's six novels, labelled by book.

  text (Text): one paragraph (see `paragraphs` for what is dropped);
  book (ClassLabel over `BOOKS`); chapter (int32, 1-based within the book).
  Split, fixed: every 10th chapter of each book (10, 20, ...: 25 of 269
  chapters) is `test`, the rest `train`. Whole chapters keep held-out text
  contiguous, so no test paragraph has its neighbours in train.

  From janeaustenr 1.0.0: 9,993 paragraphs (train 9,101, test 892) of 3.99M
  characters (train 3.64M, test 0.36M). Per book: Sense & Sensibility 1,809,
  Pride & Prejudice 2,057, Mansfield Park 1,789, Emma 2,315, Northanger Abbey
  1,018, Persuasion 1,005.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'From Debian r-cran-janeaustenr 1.0.0.'}
  RAW_DIR = 'janeaustenr'
  DEBIAN_PACKAGE = 'r-cran-janeaustenr'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      '`apt-get download r-cran-janeaustenr`, then `dpkg -x` the .deb into '
      '<manual_dir>/janeaustenr/.')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Paragraphs of Jane Austen's six novels, by book.",
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'book': tfds.features.ClassLabel(names=BOOKS),
            'chapter': tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=('text', 'book'),
    )

  def _split_generators(self, dl_manager):
    novels = read_novels(self.raw_dir(dl_manager) / PACKAGE_SUBDIR)
    by_book = {var: paragraphs(lines) for var, lines in novels.items()}
    return {'train': self._generate_examples(by_book, test=False),
            'test': self._generate_examples(by_book, test=True)}

  def _generate_examples(self, by_book, test: bool):
    for label, (var, _) in enumerate(NOVELS):
      for i, (chapter, text) in enumerate(by_book[var]):
        if is_test_chapter(chapter) == test:
          yield f'{var}/{i}', {'text': text, 'book': label,
                               'chapter': chapter}

"""Texts from the Debian package `fortunes`: topic classification and poems."""

from __future__ import annotations

import collections
import os
from typing import Sequence

import tensorflow_datasets as tfds

from finetune_jax.data import builders

# Distinct topics with 500+ entries each in fortunes 1:1.99.1-7.3.
TOPICS = (
    'computers', 'definitions', 'men-women', 'politics',
    'science', 'songs-poems', 'work', 'zippy',
)
POEMS_TOPIC = 'songs-poems'
# Where the topic files sit inside the extracted package.
TOPICS_SUBDIR = 'usr/share/games/fortunes'


def read_fortunes(path: os.PathLike | str) -> list[str]:
  """Reads one topic file: entries separated by lines holding only `%`.

  Entries are stripped; empty ones and repeats within the file are dropped.
  """
  with open(os.fspath(path), encoding='utf-8', errors='replace') as f:
    lines = f.read().splitlines()
  entries, current = [], []
  for line in lines + ['%']:
    if line.strip() == '%':
      entries.append('\n'.join(current).strip())
      current = []
    else:
      current.append(line)
  return list(dict.fromkeys(e for e in entries if e))


def read_topics(topics_dir: os.PathLike | str,
                topics: Sequence[str] = TOPICS) -> dict[str, list[str]]:
  """Texts per topic, without the few that appear under two topics

  (the same input with two labels would only be noise).
  """
  by_topic = {t: read_fortunes(os.path.join(topics_dir, t)) for t in topics}
  counts = collections.Counter(t for texts in by_topic.values() for t in texts)
  return {topic: [t for t in texts if counts[t] == 1]
          for topic, texts in by_topic.items()}


class _FortunesBase(builders.OfflineBuilder, skip_registration=True):
  RAW_DIR = DEBIAN_PACKAGE = 'fortunes'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      '`apt-get download fortunes`, then `dpkg -x` the .deb into '
      '<manual_dir>/fortunes/.')

  def topics_dir(self, dl_manager):
    return self.raw_dir(dl_manager) / TOPICS_SUBDIR


class Fortunes(_FortunesBase):
  """Topic classification: which fortune file a text comes from.

  text (Text); label over `TOPICS` (8 topic files). Texts are stripped and
  deduplicated; the 7 that appear under two topics are dropped. Split, fixed:
  `builders.is_test_text` (sha256 of the text) sends ~20% to test.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'From Debian fortunes 1:1.99.1, 8 topics.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Fortune-cookie texts labelled by topic file.',
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'label': tfds.features.ClassLabel(names=TOPICS),
        }),
        supervised_keys=('text', 'label'),
    )

  def _split_generators(self, dl_manager):
    by_topic = read_topics(self.topics_dir(dl_manager))
    return {'train': self._generate_examples(by_topic, test=False),
            'test': self._generate_examples(by_topic, test=True)}

  def _generate_examples(self, by_topic, test: bool):
    for label, topic in enumerate(TOPICS):
      for i, text in enumerate(by_topic[topic]):
        if builders.is_test_text(text) == test:
          yield f'{topic}/{i}', {'text': text, 'label': label}


class FortunesPoems(_FortunesBase):
  """The `songs-poems` fortunes alone: a small corpus for causal-LM tuning.

  text (Text) only. Same cleaning and split rule as `Fortunes` (texts shared
  with other topics are kept here: there is no label to contradict).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'From Debian fortunes 1:1.99.1, songs-poems.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Songs and poems from the Debian fortunes package.',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
    )

  def _split_generators(self, dl_manager):
    texts = read_fortunes(self.topics_dir(dl_manager) / POEMS_TOPIC)
    return {'train': self._generate_examples(texts, test=False),
            'test': self._generate_examples(texts, test=True)}

  def _generate_examples(self, texts, test: bool):
    for i, text in enumerate(texts):
      if builders.is_test_text(text) == test:
        yield i, {'text': text}

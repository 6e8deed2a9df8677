"""Key-by-key bookkeeping shared by the checkpoint converters.

Each converter knows its own names; what they share is here: module
templates with a layer index, rank-checked transposes, the tied-LM-head check
and a collector that refuses a weight landing on a filled path or mapping to
nothing, so a wrong checkpoint fails by name instead of loading as a model
with lost weights.
"""
import re
from collections.abc import Iterable

import numpy as np

from finetune_jax import errors
from finetune_jax import quantized


def template_regex(template: str, sep: str = '.') -> re.Pattern:
  """Matches '<template><sep><leaf>'; '{i}' in the template is a layer index."""
  module = re.escape(template).replace(r'\{i\}', r'(?P<i>\d+)')
  return re.compile(rf'^{module}{re.escape(sep)}(?P<leaf>[a-z_]+)$')


def add_lm_head(flat: dict, weight, *, tied: bool, embedding: str, embedding_key: str,
                source: str) -> None:
  """A separate LM head (V, D) becomes lm_head/kernel (D, V); a tied one is dropped.

  Some exporters write a tied head too; only an exact copy of the embedding
  may be dropped, anything else would silently lose the trained head.
  """
  if weight is None:
    return
  if not tied:
    flat['lm_head/kernel'] = quantized.to_numpy(weight.T)
  elif not np.array_equal(weight, flat.get(embedding)):
    raise errors.CheckpointError(
        source, 'the config ties the LM head to the token embedding '
        f'(tie_word_embeddings=true), but lm_head.weight differs from {embedding_key}. '
        'Set "tie_word_embeddings": false in config.json to load the separate head.')


class Templates:
  """Checkpoint names -> our paths by (their module, our module, layout) rows.

  leaves: per layout, their leaf name -> ours; a leaf not listed does not
  match, so such a key ends up unmapped.
  """

  def __init__(self, modules: Iterable[tuple[str, str, str]],
               leaves: dict[str, dict[str, str]], sep: str = '.'):
    modules = tuple(modules)
    self._rules = [(template_regex(t, sep), ours, layout) for t, ours, layout in modules]
    self._inverse = [(template_regex(ours, '/'), t, layout) for t, ours, layout in modules]
    self._leaves = leaves
    self._sep = sep

  def theirs(self, path: str) -> tuple[str, str] | None:
    """(checkpoint name, layout) of our param `path`, the same rows read backwards."""
    for regex, template, layout in self._inverse:
      m = regex.match(path)
      inverse = {v: k for k, v in self._leaves[layout].items()}
      if m and m['leaf'] in inverse:
        groups = {k: v for k, v in m.groupdict().items() if k != 'leaf'}
        return f'{template.format(**groups)}{self._sep}{inverse[m["leaf"]]}', layout
    return None

  def match(self, name: str) -> tuple[str, str, str] | None:
    """(our path, layout, their leaf) of `name`; None when no row takes it."""
    for regex, module, layout in self._rules:
      m = regex.match(name)
      if m and m['leaf'] in self._leaves[layout]:
        return (f'{module.format(**m.groupdict())}/{self._leaves[layout][m["leaf"]]}',
                layout, m['leaf'])
    return None


class ParamCollector:
  """Our flat {path: array}, filled key by key from one checkpoint.

  A path filled twice fails at once (two namings mixed in one file); keys
  that map to nothing fail together in `result`, listed with `hint`.

  Args:
    source: the file (or a stand-in) named by every error.
    family: the model family, as in '... have no BERT parameter'.
    hint: the question that follows the list of unmapped keys.
    noun: what the checkpoint holds: 'tensors', 'arrays', 'keys'.
    mixed: why two keys can meet on one path, for that error.
  """

  def __init__(self, source: str, family: str, hint: str, *, noun: str = 'tensors',
               mixed: str = 'the checkpoint mixes two namings'):
    self.source, self.family, self.hint, self.noun, self.mixed = (
        source, family, hint, noun, mixed)
    self._flat, self._origin, self._unmapped = {}, {}, []

  def add(self, ours: str, key: str, value) -> None:
    """Stores `value` (C-contiguous; a quantized one part by part) at our path `ours`, read
    from `key`."""
    if ours in self._flat:
      raise errors.CheckpointError(
          self.source, f'it and {self._origin[ours]!r} both map to {ours!r}; {self.mixed}.',
          key=key)
    self._flat[ours], self._origin[ours] = quantized.to_numpy(value), key

  def unmapped(self, key: str) -> None:
    """Notes a key with no parameter; `result` reports all of them at once."""
    self._unmapped.append(key)

  def transposed(self, key: str, value, axes: tuple[int, ...] = (1, 0),
                 what: str = 'Linear weight') -> np.ndarray:
    """value.transpose(axes), refusing another rank by key: torch (out, in) -> (in, out).
    A quantized value (blocks kept) transposes its parts."""
    value = value if quantized.is_quantized(value) else np.asarray(value)
    if value.ndim != len(axes):
      raise errors.CheckpointError(self.source, f'shape {value.shape}, not a {what}.', key=key)
    return value.transpose(axes)

  def result(self) -> dict[str, np.ndarray]:
    """The flat params; raises listing the first 20 unmapped keys, if any."""
    if self._unmapped:
      raise errors.CheckpointError(
          self.source, f'{len(self._unmapped)} {self.noun} have no {self.family} parameter: '
          f'{self._unmapped[:20]}. {self.hint}')
    return self._flat


def hf_labels(num_classes: int) -> dict:
  """config.json fields that size a transformers classifier to `num_classes`."""
  names = [f'LABEL_{i}' for i in range(num_classes)]
  return {'id2label': dict(enumerate(names)), 'label2id': {n: i for i, n in enumerate(names)}}

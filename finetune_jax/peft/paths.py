"""Parameter paths: '/'-joined names such as 'blocks_3/project_bn/scale'.

Every freezing rule in this package is a regex over these paths, and a rule
that matches nothing is an error that lists the nearest real paths.
"""
import difflib
import re
from typing import Iterable, Mapping, Sequence

from flax import traverse_util

# Normalisation statistics are stored as params so that
# `module.apply({'params': p}, x)` works, but they are never trained.
STATISTICS = re.compile(r'(^|/)(mean|var)$')


def flatten(params: Mapping) -> dict:
  return traverse_util.flatten_dict(params, sep='/')


def unflatten(flat: Mapping) -> dict:
  return traverse_util.unflatten_dict(dict(flat), sep='/')


def nearest(pattern: str, paths: Sequence[str], n: int = 8) -> list[str]:
  """The paths that look most like `pattern`, for error messages."""
  literal = re.sub(r'[\^$\\.*+?()\[\]{}|]', '', pattern)
  close = difflib.get_close_matches(literal, paths, n=n, cutoff=0.0)
  return close or list(paths[:n])


def match(patterns: Iterable[str], paths: Sequence[str], what: str) -> set:
  """The paths matched (re.search) by any pattern; each must match one."""
  matched = set()
  for pattern in patterns:
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f'{what}: {pattern!r} is not a valid regex ({e}).') from None
    hits = {p for p in paths if regex.search(p)}
    if not hits:
      raise ValueError(
          f'{what}: pattern {pattern!r} matches no parameter. Nearest parameter '
          f'paths: {nearest(pattern, paths)}. Fix the pattern in the config.')
    matched |= hits
  return matched


def split(params: Mapping, trainable: set) -> tuple[dict, dict]:
  """(trainable, frozen) nested dicts; together they hold every leaf once."""
  flat = flatten(params)
  unknown = trainable - flat.keys()
  if unknown:
    raise ValueError(f'Trainable paths not in the model: {sorted(unknown)}')
  train = {k: v for k, v in flat.items() if k in trainable}
  frozen = {k: v for k, v in flat.items() if k not in trainable}
  return unflatten(train), unflatten(frozen)


def merge(trainable: Mapping, frozen: Mapping) -> dict:
  """The inverse of `split`. Pure pytree restructuring: free inside jit."""
  return unflatten({**flatten(frozen), **flatten(trainable)})


def count(params: Mapping) -> int:
  return sum(int(v.size) for v in flatten(params).values())

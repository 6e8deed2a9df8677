"""Parameter paths: '/'-joined names such as 'blocks_3/project_bn/scale'.

Every freezing rule in this package is a regex over these paths, and a rule
that matches nothing is an error that lists the nearest real paths. Methods
that change layers (LoRA, IA3, adapters) select *module* paths, a param path
without its leaf ('layer_0/attention/self/query'), with `select_modules`.
"""
import re
from typing import Iterable, Mapping, Sequence

import numpy as np
from flax import traverse_util

from finetune_jax import errors

# Normalisation statistics are stored as params so that
# `module.apply({'params': p}, x)` works, but they are never trained.
STATISTICS = re.compile(r'(^|/)(mean|var)$')


def flatten(params: Mapping) -> dict:
  return traverse_util.flatten_dict(params, sep='/')


def unflatten(flat: Mapping) -> dict:
  return traverse_util.unflatten_dict(dict(flat), sep='/')


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
      close = errors.nearest(pattern, paths)
      raise errors.NoMatch(
          what, pattern, close, f'{what}: pattern {pattern!r} matches no parameter. '
          f'Nearest parameter paths: {close}. Fix the pattern in the config.')
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


def join(trainable: Mapping, frozen: Mapping) -> dict:
  """The inverse of `split`. Pure pytree restructuring: free inside jit."""
  return unflatten({**flatten(frozen), **flatten(trainable)})


def count(params: Mapping) -> int:
  """Parameters, a quantized kernel counted as the values it holds."""
  return sum(int(np.prod(np.shape(getattr(v, 'qvalue', v)))) for v in flatten(params).values())


def candidate_modules(flat: Mapping, skip: str | None = None) -> list[str]:
  """Module paths owning a Dense (2-D) or Conv (3-D+) kernel, minus `skip`'s."""
  return sorted(p[:-len('/kernel')] for p, v in flat.items()
                if p.endswith('/kernel') and np.ndim(v) >= 2
                and not (skip and p.startswith(skip)))


def collapse_digits(candidates) -> list[str]:
  """The paths with layer numbers folded, 'layer_*/attention/self/query': short lists."""
  return sorted({re.sub(r'\d+', '*', p) for p in candidates})


def example_patterns(candidates) -> str:
  """A config-ready tuple of patterns for the fix in an error message."""
  names = sorted({p.rsplit('/', 1)[-1] for p in candidates})[:3]
  return '(' + ', '.join(repr(f'{n}$') for n in names) + (',)' if len(names) == 1 else ')')


def select_modules(targets, candidates, what: str, option: str, method: str,
                   head: str | None = None, architecture=None) -> set:
  """The candidates a target selects; a target selecting none is an error.

  Targets are roles, bare names or regexes, as `architecture.pattern` reads
  them (regexes only without an architecture). The error is the commonest
  PEFT complaint, so it names the nearest module paths and all candidates.
  what: where the targets came from; option: the config field to fix
  ('peft.lora.targets'); method: 'LoRA', for the message.
  """
  if not candidates:
    raise ValueError(f'{what}: this model has no nn.Dense or nn.Conv kernel to adapt.')
  matched, unmatched = set(), []
  for target in targets:
    try:
      pattern = architecture.pattern(target) if architecture else target
    except ValueError as e:
      raise errors.ConfigError(option, f'{what}: {e}') from None
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f'{what}: {pattern!r} is not a valid regex ({e}).') from None
    hits = {p for p in candidates if regex.search(p)}
    if not hits:
      unmatched.append(target)
    matched |= hits
  if unmatched:
    close = {p: errors.nearest(p, candidates, n=5) for p in unmatched}
    head_note = f" The head '{head}/' trains in full and takes no {method}." if head else ''
    raise errors.NoMatch(
        option, unmatched, close,
        f'{what}: {unmatched} match no nn.Dense/nn.Conv module. Patterns are re.search-ed '
        f"over module paths (a param path without its leaf, e.g. {candidates[0]!r}). "
        f'Nearest module paths: {close}. All {len(candidates)} candidate modules '
        f'(digits folded to *): {collapse_digits(candidates)}.{head_note} Fix the patterns, '
        f'e.g. --config.{option}="{example_patterns(candidates)}".')
  return matched

"""Loading a converted checkpoint into freshly initialised params.

Paths are '/'-joined ('blocks_3/project_bn/scale'). `dont_load` regexes
(re.search) keep the init value (e.g. '^head/' for a new classifier); every
other parameter must come from the checkpoint with the same shape, and every
checkpoint entry must be used, so nothing is dropped or invented silently.
"""
import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from finetune_jax import errors
from finetune_jax import quantized


def flat(params: Mapping) -> dict:
  return traverse_util.flatten_dict(dict(params), sep='/')


def compile_patterns(patterns: Sequence[str]) -> list[re.Pattern]:
  if isinstance(patterns, str):
    raise errors.ConfigError('dont_load', f'dont_load must be a list of regexes, got the '
                             f'string {patterns!r}; write [{patterns!r}].')
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise errors.ConfigError(
          'dont_load', f'dont_load: {pattern!r} is not a valid regex ({e}).') from None
  return compiled


def check_dont_load(dont_load: Sequence[str], paths: Sequence[str],
                    source: str = '<file>') -> list[re.Pattern]:
  """Compiled patterns; each must be a valid regex matching some path."""
  regexes = compile_patterns(dont_load)
  for regex in regexes:
    if not any(regex.search(p) for p in paths):
      close = errors.nearest(regex.pattern, list(paths), n=5)
      raise errors.NoMatch(
          'dont_load', regex.pattern, close,
          f'dont_load pattern {regex.pattern!r} matches no parameter of the model or of '
          f'{source}. Nearest parameter paths: {close}.')
  return regexes


def _as_param(value, dtype):
  """A loaded value on the device: in the param's dtype, or as kept quantized blocks."""
  if quantized.is_quantized(value):
    return jax.tree.map(jnp.asarray, value)
  return jnp.asarray(value, dtype=dtype)


def load_into(init_params: Mapping, loaded_params: Mapping,
              dont_load: Sequence[str] = (), source: str = '<file>') -> dict:
  """`init_params` with every leaf not matched by `dont_load` taken from `loaded_params`.

  Raises `errors.NoMatch` for a dont_load pattern that matches nothing, and one
  `errors.CheckpointError` (file `source`) for checkpoint entries the model lacks
  (unless dont_load'ed), model params the checkpoint lacks, or shape mismatches.
  """
  init, loaded = flat(init_params), flat(loaded_params)
  regexes = check_dont_load(dont_load, [*init, *loaded], source)

  def skipped(path):
    return any(r.search(path) for r in regexes)

  unexpected = [p for p in loaded if p not in init and not skipped(p)]
  if unexpected:
    raise errors.CheckpointError(
        source, f'has {len(unexpected)} parameters the model does not: {unexpected[:20]}. '
        'Check the architecture config, or add a dont_load pattern to drop them.')
  missing = [p for p in init if p not in loaded and not skipped(p)]
  if missing:
    raise errors.CheckpointError(
        source, f'lacks {len(missing)} parameters of the model: {missing[:20]}. Check the '
        'architecture config, or add a dont_load pattern to keep their initial values.')
  mismatched = [p for p, v in init.items()
                if not skipped(p) and tuple(np.shape(loaded[p])) != tuple(np.shape(v))]
  if mismatched:
    shapes = '; '.join(f'{p}: {tuple(np.shape(loaded[p]))} in the file vs '
                       f'{tuple(np.shape(init[p]))} in the model' for p in mismatched[:20])
    raise errors.CheckpointError(
        source, f'shape mismatch: {shapes}. Fix the model config (e.g. num_classes) or add '
        'the parameter to dont_load (e.g. "^head/").')
  params = {p: v if skipped(p) else _as_param(loaded[p], v.dtype) for p, v in init.items()}
  return traverse_util.unflatten_dict(params, sep='/')

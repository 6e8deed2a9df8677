"""Random init drawn on the host with numpy, in the structure of `module.init`.

Compiling flax's `module.init` builds one RNG kernel per leaf: about 20 s for
EfficientNet-Lite0 on a 2-core CPU, seconds even for tiny test models. Each
model gives a per-leaf `value(path, shape, dtype, seed)` drawn like its own
initializers; this module supplies the structure and the shared draws.
"""
import math
import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# flax's truncated_normal variance scaling divides by this so that the
# +-2 sigma truncated normal keeps the requested variance.
TRUNCATED_STD = 0.87962566103423978


def leaf_rng(seed: int, path: str) -> np.random.Generator:
  """One stream per (seed, path): a leaf's value does not depend on the others."""
  return np.random.default_rng([seed, zlib.crc32(path.encode())])


def truncated_normal(rng: np.random.Generator, shape, std: float, dtype) -> np.ndarray:
  """Normal truncated at +-2 sigma, scaled so the result has standard deviation `std`."""
  z = rng.standard_normal(math.prod(shape))
  bad = np.abs(z) > 2
  while bad.any():  # resample outside +-2 sigma
    z[bad] = rng.standard_normal(int(bad.sum()))
    bad = np.abs(z) > 2
  return (z * std / TRUNCATED_STD).reshape(shape).astype(dtype)


def batchnorm_conv_constant(path: str, shape, dtype):
  """BN-conv nets' fixed inits: 1 for BN scales and variances, 0 for biases,
  means and the new head; None for kernels, which are drawn."""
  leaf = path.rsplit('/', 1)[-1]
  if leaf in ('scale', 'var'):
    return np.ones(shape, dtype)
  if leaf in ('bias', 'mean') or path.startswith('head/'):
    return np.zeros(shape, dtype)
  if leaf != 'kernel':
    raise ValueError(f'No initializer for parameter {path!r}.')
  return None


def param_shapes(module, input_shape, input_dtype=jnp.float32) -> dict:
  """Flat {path: ShapeDtypeStruct} of `module`'s params, computing nothing.

  input_dtype: of the dummy input; int32 for token ids (embeddings need ints).
  """
  dummy = jax.ShapeDtypeStruct(tuple(input_shape), input_dtype)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), dummy)['params']
  return traverse_util.flatten_dict(dict(shapes), sep='/')


def init_params(module, input_shape, value: Callable, seed: int,
                input_dtype=jnp.float32, draw: Callable[[str], bool] | None = None) -> dict:
  """`module`'s params, each leaf drawn by `value(path, shape, dtype, seed)`.

  draw: which paths to draw (None: all). The others are zero-stride stand-ins
    with the right shape and dtype, for leaves a checkpoint will fill: a
    leaf's draw does not depend on the others, so skipping them changes none.
  """
  def leaf(p, s):
    if draw is None or draw(p):
      return jnp.asarray(value(p, s.shape, s.dtype, seed))
    return np.broadcast_to(np.zeros((), s.dtype), s.shape)

  return traverse_util.unflatten_dict(
      {p: leaf(p, s) for p, s in param_shapes(module, input_shape, input_dtype).items()},
      sep='/')

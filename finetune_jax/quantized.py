"""Quantized weights, as a quantized base (QLoRA) holds them.

`qwix.QArray` (the JAX quantization library's) holds symmetric blocks: int8 and NF4
from `peft.quantize_base`, GGUF's Q8_0 (d * q) and Q4_0 (d * (q - 8)). GGUF's Q4_1
blocks are affine with a float minimum, d * q + m. A QArray's zero point has the
values' integer type, which cannot carry m / d exactly, so `OffsetQArray` is a QArray
plus that per-block offset: the file's own 4-bit weights, dequantized to the same floats.
"""
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import struct


@struct.dataclass
class OffsetQArray:
  """dequantize(base) + offset, the offset one value per block of `base.scale`."""
  base: qwix.QArray
  offset: jax.Array

  shape = property(lambda self: self.base.shape)
  ndim = property(lambda self: self.base.ndim)
  dtype = property(lambda self: self.base.dtype)
  qvalue = property(lambda self: self.base.qvalue)
  T = property(lambda self: self.transpose())

  def transpose(self, *axes) -> 'OffsetQArray':
    return jax.tree.map(lambda x: x.transpose(*axes), self)


def is_quantized(value) -> bool:
  return isinstance(value, (qwix.QArray, OffsetQArray))


def _per_value(blocks, shape):
  """Per-block values broadcast to `shape` (each axis a whole multiple of the blocks')."""
  for axis, (n, b) in enumerate(zip(shape, blocks.shape)):
    if n != b:
      blocks = jnp.repeat(blocks, n // b, axis=axis)
  return blocks


def dequantize(value):
  """A quantized array as floats (the scale's dtype); anything else as it is."""
  if isinstance(value, OffsetQArray):
    w = qwix.dequantize(value.base)
    return w + _per_value(jnp.asarray(value.offset, w.dtype), w.shape)
  if isinstance(value, qwix.QArray):
    return qwix.dequantize(value)
  return value


def dequantize_tree(tree):
  """Every quantized array in `tree` as a float array."""
  return jax.tree.map(dequantize, tree, is_leaf=is_quantized)


def to_numpy(value):
  """A host copy of an array or a quantized array's parts (C-contiguous)."""
  return jax.tree.map(np.ascontiguousarray, value)

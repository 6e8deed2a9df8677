"""Quantized weights, as a quantized base (QLoRA) holds them.

Two kinds, one interface (`is_quantized`, `dequantize`, `take`):
- `qwix.QArray`, the JAX quantization library's: what `peft.quantize_base` makes of a
  float kernel (int8, NF4).
- `BlockQuantized`: a checkpoint's own blocks, kept as the file stores them (GGUF's Q8_0,
  Q4_0 and Q4_1: d * q, with Q4_1's per-block minimum m added). A QArray's zero point has
  the values' integer type, which cannot carry Q4_1's m / d exactly, and its float16 scales
  would dequantize in float16; this one computes d * q + m in float32 as llama.cpp's
  reference does, so it gives the file's floats bit for bit at the file's own size.
"""
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import struct


@struct.dataclass
class BlockQuantized:
  """qvalue * scale (+ offset) in float32; `scale` and `offset` hold one value per block
  (each axis of qvalue a whole multiple of theirs)."""
  qvalue: jax.Array
  scale: jax.Array
  offset: jax.Array | None = None

  shape = property(lambda self: self.qvalue.shape)
  ndim = property(lambda self: self.qvalue.ndim)
  dtype = property(lambda self: np.dtype(np.float32))  # what it dequantizes to
  T = property(lambda self: self.transpose())

  def transpose(self, *axes) -> 'BlockQuantized':
    return jax.tree.map(lambda x: x.transpose(*axes), self)


def is_quantized(value) -> bool:
  return isinstance(value, (qwix.QArray, BlockQuantized))


def _per_value(blocks, shape):
  """Per-block values broadcast to `shape`."""
  for axis, (n, b) in enumerate(zip(shape, blocks.shape)):
    if n != b:
      blocks = jnp.repeat(blocks, n // b, axis=axis)
  return blocks


def dequantize(value):
  """A quantized array as floats; anything else as it is."""
  if isinstance(value, BlockQuantized):
    w = value.qvalue.astype(jnp.float32) * _per_value(value.scale.astype(jnp.float32),
                                                      value.shape)
    if value.offset is not None:
      w = w + _per_value(value.offset.astype(jnp.float32), value.shape)
    return w
  if isinstance(value, qwix.QArray):
    return qwix.dequantize(value)
  return value


def dequantize_tree(tree):
  """Every quantized array in `tree` as a float array."""
  return jax.tree.map(dequantize, tree, is_leaf=is_quantized)


def take(table, ids):
  """Rows `ids` of a (V, D) table as floats; a quantized table dequantizes only those rows."""
  if is_quantized(table):
    return dequantize(jax.tree.map(lambda x: jnp.take(x, ids, axis=0), table))
  return jnp.take(table, ids, axis=0)


def to_numpy(value):
  """A host copy of an array, or of a quantized array's parts (C-contiguous)."""
  return jax.tree.map(np.ascontiguousarray, value)

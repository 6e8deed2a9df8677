"""Mixed precision: compute in bfloat16, keep params, gradients and optimizer state in float32.

`precision` in the config: 'float32'; 'bfloat16' (the step casts the params and
the model's floating inputs to bfloat16, so matmuls, convolutions and
activations run in bfloat16, while the float32 trainable params get float32
gradients through the cast and the optimizer never sees bfloat16); or 'auto':
bfloat16 where the hardware has fast bfloat16 units (GPU, TPU), float32 on CPU,
where XLA:CPU runs bfloat16 slower (README, Speed).
"""
import jax
import jax.numpy as jnp

PRECISIONS = ('float32', 'bfloat16', 'auto')


def compute_dtype(precision: str, platform: str | None = None):
  """The dtype the step computes in, for `precision` on `platform` (default: JAX's)."""
  if precision not in PRECISIONS:
    raise ValueError(f'Unknown precision {precision!r}; use one of {PRECISIONS}.')
  if precision == 'auto':
    platform = platform or jax.default_backend()
    return jnp.bfloat16 if platform in ('gpu', 'tpu') else jnp.float32
  return jnp.dtype(precision).type


def cast(tree, dtype):
  """`tree` with its floating leaves in `dtype` (integers and bools as they are)."""
  def leaf(x):
    x = jnp.asarray(x)
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(leaf, tree)

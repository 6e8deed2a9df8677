"""Layers shared by the zoo: fast depthwise conv, frozen BN, rematerialised blocks."""
import functools
from typing import Sequence

from flax.core import lift
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

DEPTHWISE_IMPLS = ('auto', 'shift', 'lax')

# `remat` modes: none; block (keep each block's input alone, recompute the rest of it in the
# backward pass); or a jax.checkpoint_policies name, which keeps what that policy saves in
# each block (dots_saveable: the matmul outputs) and recomputes the rest.
REMAT_POLICIES = ('dots_saveable', 'dots_with_no_batch_dims_saveable', 'nothing_saveable',
                  'everything_saveable')
REMAT_MODES = ('none', 'block', *REMAT_POLICIES)


def remat(block: type[nn.Module], mode: str, static_argnums: tuple[int, ...] = ()):
  """`block` as a model builds it under `mode` (REMAT_MODES): itself, or rematerialised.

  static_argnums count `self` as 0, as nn.remat's do: the block's Python-valued
  arguments (`train`), which must not be traced. The block is nn.remat's jax.checkpoint with
  one addition, `_tied`: its weight gradients are computed before its input gradient moves on.
  """
  if mode == 'none':
    return block
  if mode not in REMAT_MODES:
    raise ValueError(f'remat={mode!r} is not one of {REMAT_MODES}.')
  policy = None if mode == 'block' else getattr(jax.checkpoint_policies, mode)
  return nn.transforms.lift_transform(_tied_checkpoint, block, policy=policy,
                                      static_argnums=tuple(i - 1 for i in static_argnums))


@jax.custom_vjp
def _tied(tree):
  """The identity. Backward, the cotangents of every perturbed leaf leave through one
  optimization barrier: a block's weight gradients are computed before its input gradient
  reaches the block below. XLA:CPU otherwise defers every block's weight-gradient matmuls to
  the end of the backward pass, and each block's recomputed activations live until then."""
  return tree


def _tied_fwd(tree):
  # The residual marks the leaves that carry a gradient ((): perturbed, None: not), so the
  # backward pass ties only those; a frozen weight's cotangent is never computed.
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten(p.value for p in leaves), [() if p.perturbed else None for p in leaves]


def _tied_bwd(perturbed, cotangents):
  leaves, treedef = jax.tree.flatten(cotangents, is_leaf=lambda x: isinstance(x, SymbolicZero))
  live = [i for i, mark in enumerate(perturbed) if mark is not None
          and not isinstance(leaves[i], SymbolicZero)]
  tied = dict(zip(live, lax.optimization_barrier([leaves[i] for i in live])))
  return (treedef.unflatten(tied.get(i) for i in range(len(leaves))),)


_tied.defvjp(_tied_fwd, _tied_bwd, symbolic_zeros=True)


def _tied_checkpoint(fn, policy=None, static_argnums=()):
  """flax's lift.checkpoint (nn.remat's core), its variables and traced arguments tied."""
  def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):
    @functools.partial(jax.checkpoint, policy=policy, prevent_cse=True,
                       static_argnums=tuple(i + 2 for i in static_argnums))
    def rematted(variable_groups, rng_groups, *args):
      scope = scope_fn(variable_groups, rng_groups)
      return fn(scope, *args), repack_fn(scope)

    traced = {i: arg for i, arg in enumerate(args) if i not in static_argnums}
    variable_groups, traced = _tied((variable_groups, traced))
    args = [traced.get(i, arg) for i, arg in enumerate(args)]
    return rematted(variable_groups, rng_groups, *args)
  return lift.pack(inner, (True,), (True,), (True,), name='remat')


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow 'SAME' padding: output ceil(size / stride), extra pad at the end."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def resolve_depthwise_impl(impl: str) -> str:
  """'auto' is 'shift' on CPU, where XLA's grouped convolution is 10x slow."""
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(
        f'depthwise_impl={impl!r} is not one of {DEPTHWISE_IMPLS}.')
  if impl == 'auto':
    return 'shift' if jax.default_backend() == 'cpu' else 'lax'
  return impl


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1,
                     padding: Sequence[tuple[int, int]] | str = 'SAME',
                     impl: str = 'auto') -> jax.Array:
  """Depthwise 2D convolution of NHWC `x` with a (kh, kw, 1, C) kernel.

  `padding` is 'SAME' (TensorFlow style), 'VALID' or ((lo, hi), (lo, hi)).
  impl 'shift' sums, over the kernel taps, strided slices of the padded input
  times that tap's per-channel weights: plain elementwise work that XLA:CPU
  fuses well. 'lax' is `lax.conv_general_dilated` with one group per channel.
  Both give the same values and gradients.
  """
  kh, kw, one, channels = kernel.shape
  if one != 1 or x.shape[-1] != channels:
    raise ValueError(
        f'depthwise kernel {kernel.shape} must be (kh, kw, 1, C) with C = the '
        f'input channels {x.shape[-1]}.')
  if padding == 'SAME':
    padding = (same_padding(x.shape[1], kh, stride),
               same_padding(x.shape[2], kw, stride))
  elif padding == 'VALID':
    padding = ((0, 0), (0, 0))
  padding = tuple(tuple(p) for p in padding)
  if resolve_depthwise_impl(impl) == 'lax':
    return lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (stride, stride), padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=channels)
  return _depthwise_shift(x, kernel[:, :, 0, :].astype(x.dtype), stride, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shift(x, taps, stride, padding):
  return _shifted_sum(_pad(x, padding), taps, stride)


def _depthwise_shift_fwd(x, taps, stride, padding):
  return _depthwise_shift(x, taps, stride, padding), (x, taps)


def _depthwise_shift_bwd(stride, padding, residuals, grad):
  """The input's gradient is again one padded array and a shifted sum.

  The output gradient, spread to the stride and padded by the kernel, is
  correlated with the flipped taps: the forward pass's own form, in which
  XLA keeps the padded array once. Left to autodiff, each tap's transpose is
  a pad of its own, and XLA:CPU fuses the gradient's producers (a ReLU6
  mask that recomputes this conv) into every one of them.
  """
  x, taps = residuals
  kh, kw, _ = taps.shape
  padded = _pad(x, padding)
  height, width = padded.shape[1:3]
  out_h, out_w = grad.shape[1:3]
  spread = lax.pad(grad, jnp.zeros((), grad.dtype), (
      (0, 0, 0),
      (kh - 1, height - (out_h - 1) * stride - 1, stride - 1),
      (kw - 1, width - (out_w - 1) * stride - 1, stride - 1),
      (0, 0, 0)))
  grad_padded = _shifted_sum(spread, taps[::-1, ::-1], 1)
  (top, bottom), (left, right) = padding
  grad_x = grad_padded[:, top:height - bottom, left:width - right]
  grad_taps = jnp.stack([
      jnp.stack([jnp.sum(_window(padded, i, j, out_h, out_w, stride) * grad,
                         axis=(0, 1, 2)) for j in range(kw)])
      for i in range(kh)])
  return grad_x, grad_taps


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


def _pad(x, padding):
  (top, bottom), (left, right) = padding
  return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


def _window(x, i, j, out_h, out_w, stride):
  """The input values that tap (i, j) multiplies, one per output position."""
  return lax.slice(
      x, (0, i, j, 0),
      (x.shape[0], i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1,
       x.shape[3]),
      (1, stride, stride, 1))


def _shifted_sum(x, taps, stride):
  """VALID depthwise correlation: the sum over taps of strided slices times weights."""
  kh, kw, _ = taps.shape
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      term = _window(x, i, j, out_h, out_w, stride) * taps[i, j]
      out = term if out is None else out + term
  return out


class DepthwiseConv(nn.Module):
  """Depthwise conv with a (k, k, 1, C) kernel, as flax's grouped nn.Conv."""
  kernel_size: int
  stride: int = 1
  padding: str = 'SAME'
  impl: str = 'auto'
  kernel_init: nn.initializers.Initializer = nn.initializers.variance_scaling(
      2.0, 'fan_out', 'normal')

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', self.kernel_init,
                        (self.kernel_size, self.kernel_size, 1, x.shape[-1]))
    return depthwise_conv2d(x, kernel, self.stride, self.padding, self.impl)


class FrozenBatchNorm(nn.Module):
  """BatchNorm that always normalises with its stored statistics.

  `mean` and `var` live in the 'params' collection next to `scale` and `bias`
  so `module.apply({'params': p}, x)` needs no 'batch_stats'; they get no
  gradient (stop_gradient) and the trainer never updates leaves of those
  names. Fine-tuning with frozen statistics also makes the result independent
  of how the batch is split across devices.
  """
  epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,))
    bias = self.param('bias', nn.initializers.zeros, (features,))
    mean = lax.stop_gradient(self.param('mean', nn.initializers.zeros, (features,)))
    var = lax.stop_gradient(self.param('var', nn.initializers.ones, (features,)))
    # One multiply-add per element; the per-channel work is negligible.
    multiplier = scale * lax.rsqrt(var + self.epsilon)
    return x * multiplier.astype(x.dtype) + (bias - mean * multiplier).astype(x.dtype)


def classifier_outputs(features, num_classes: int, dropout_rate: float = 0.0,
                       train: bool = False) -> dict:
  """{'features'} plus, when `num_classes`, 'logits' from the classifier `head`.

  Call it inside a compact `__call__`: the Dense joins the calling module as
  'head' (head/kernel, head/bias), the name every loader and PEFT method
  expects. Zero-initialised: a new head starts at uniform predictions.
  """
  out = {'features': features}
  if num_classes:
    x = nn.Dropout(dropout_rate)(features, deterministic=not train)
    out['logits'] = nn.Dense(num_classes, kernel_init=nn.initializers.zeros,
                             name='head')(x)
  return out

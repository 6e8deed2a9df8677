"""Runs a zoo model with some layer calls rewritten, its source untouched.

LoRA, DoRA, IA3 and bottleneck adapters change what chosen nn.Dense and
nn.Conv calls return (IA3's feed-forward scale: what they receive). Rather
than editing each model, `Intercepted.apply` runs the base module inside
`flax.linen.intercept_methods`: a hook sees every layer call together with
its bound module, so new params can live next to the kernel they change
('<module>/lora_a') and the param tree keeps the model's own layout. The
object duck-types linen's `apply`, the only thing the trainer and the sampler
call; it is a frozen dataclass so that it hashes, as
`jax.jit(..., static_argnames='module')` in sampling.py needs.
"""
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from finetune_jax import quantized


@dataclasses.dataclass(frozen=True)
class Call:
  """One `__call__` of a bound module, as a hook sees it."""
  module: nn.Module  # bound: has_variable, get_variable and make_rng work
  next_fun: Callable  # the original call: next_fun(*args, **kwargs)
  args: tuple
  kwargs: dict
  train: bool  # the `train` argument of the outer apply (False when absent)

  def run(self):
    """The original call. Once only: a compact layer cannot run twice here."""
    if quantized_weight(self.module) is not None:
      return self.run_on(self.inputs)
    return self.next_fun(*self.args, **self.kwargs)

  def run_on(self, inputs):
    """The original call on other inputs (IA3 rescales a layer's input). Once only.

    A layer whose weight is quantized (QLoRA's base, peft/quantize.py) is computed here:
    an nn.Dense dequantizes its kernel inside the matmul, an nn.Embed the rows it looks up."""
    weight = quantized_weight(self.module)
    if weight is not None:
      return quantized_call(self.module, inputs, weight)
    if self.args:
      return self.next_fun(inputs, *self.args[1:], **self.kwargs)
    return self.next_fun(**{**self.kwargs, 'inputs': inputs})

  @property
  def inputs(self):
    return self.args[0] if self.args else self.kwargs['inputs']

  @property
  def path(self) -> str:
    return '/'.join(self.module.path)


# The layers whose weight may be held quantized, and that weight's name.
_QUANTIZABLE = ((nn.Dense, 'kernel'), (nn.Embed, 'embedding'))


def quantized_weight(module: nn.Module):
  """An nn.Dense's kernel or an nn.Embed's table where it is quantized (quantized.py),
  else None."""
  for layer, name in _QUANTIZABLE:
    if isinstance(module, layer) and module.has_variable('params', name):
      weight = module.get_variable('params', name)
      return weight if quantized.is_quantized(weight) else None
  return None


def float_kernel(module: nn.Module):
  """The module's kernel as floats: dequantized where it is quantized."""
  kernel = module.get_variable('params', 'kernel')
  return quantized.dequantize(kernel)


@jax.checkpoint
def _dequantized_matmul(x, kernel):
  # Under jax.checkpoint the backward pass dequantizes the kernel again instead of keeping
  # the float copy from the forward pass: only the quantized kernel stays in memory.
  return jnp.dot(x, quantized.dequantize(kernel).astype(x.dtype))


@jax.checkpoint
def _dequantized_attend(x, table):
  return jnp.dot(x, quantized.dequantize(table).astype(x.dtype).T)


def quantized_call(module: nn.Module, x, weight):
  """What `module` (nn.Dense or nn.Embed) returns for `x` with its quantized `weight`."""
  if isinstance(module, nn.Embed):
    (rows,) = module.promote_dtype(quantized.take(weight, x), dtype=module.dtype, inexact=False)
    return rows
  y = _dequantized_matmul(x, weight)
  if module.use_bias:
    y = y + module.get_variable('params', 'bias').astype(y.dtype)
  return y


def check_layer(call: Call, option: str, method: str):
  """Refuses a selected layer the methods cannot change, naming the option to narrow."""
  m = call.module
  if not isinstance(m, (nn.Dense, nn.Conv)):
    raise ValueError(
        f'{option} selected {call.path!r}, a {type(m).__name__}; {method} adapts '
        f'nn.Dense and nn.Conv layers only. Narrow {option} to leave it out.')
  if isinstance(m, nn.Conv) and (m.feature_group_count != 1 or m.mask is not None):
    raise ValueError(
        f'{option} selected {call.path!r}, a grouped or masked nn.Conv, which '
        f'{method} does not adapt. Narrow {option} to leave it out.')


def matmul(module: nn.Module, x, kernel):
  """x @ kernel over the last axis, in `module`'s dtype and precision, so an
  added branch computes like the layer it sits on."""
  x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=module.dtype)
  return jnp.dot(x, kernel, precision=module.precision)


Hook = Callable[[Call], Any]  # must hash and compare by value (a frozen dataclass)


@dataclasses.dataclass(frozen=True)
class PassThrough:
  """The hook that changes nothing: every call as it is, so a quantized base (Call.run)
  computes for a method without a hook of its own, or for the plain base model."""

  def __call__(self, call: Call):
    return call.run()


@dataclasses.dataclass(frozen=True)
class Intercepted:
  """`base` with every module `__call__` routed through `hook`."""
  base: nn.Module
  hook: Hook

  def apply(self, variables, *args, **kwargs):
    # Train mode is read here, where the caller states it, and closed over:
    # inside a layer nothing says whether dropout is on.
    train = bool(kwargs.get('train', False))

    def interceptor(next_fun, call_args, call_kwargs, context):
      if context.method_name == 'attend':  # a tied LM head on a quantized table
        table = quantized_weight(context.module)
        if table is not None:
          return _dequantized_attend(*call_args, table)
      if context.method_name != '__call__':
        return next_fun(*call_args, **call_kwargs)
      return self.hook(Call(context.module, next_fun, call_args, call_kwargs, train))

    with nn.intercept_methods(interceptor):
      return self.base.apply(variables, *args, **kwargs)

  def __getattr__(self, name):
    # Attributes such as `num_classes` read through to the base module.
    if name.startswith('__') or name in ('base', 'hook'):
      raise AttributeError(name)
    return getattr(self.base, name)

"""QLoRA's base: the frozen Dense kernels held quantized, dequantized inside each matmul.

`peft.quantize_base` = int8 | nf4 (NormalFloat 4, Dettmers et al. 2023) | none. After the
method has split the params, every frozen 2-D `kernel` of an nn.Dense becomes a qwix
`QArray`: int8 or 4-bit values with one float32 scale per block of `peft.quantize_block`
inputs and per output. What trains (LoRA's factors, the head, biases, norms) stays float32.

Each nn.Dense whose kernel is quantized computes x @ dequantize(kernel) + bias inside a
`jax.checkpoint` (`intercept.quantized_call`), so the backward pass keeps the quantized
kernel and dequantizes it again, instead of keeping a float copy of every kernel from the
forward pass (README, Memory: the XLA:CPU flags this needs, which the CLI sets). The call is
routed through the same interception as LoRA's (`intercept.Call.run`), below the method's
own hook; a method without one gets a pass-through hook.

A kernel the checkpoint already stores quantized at the mode's width (GGUF's Q4_0 and Q4_1
blocks for nf4, Q8_0 for int8; loaded with `keep_quantized`) stays as the file has it:
quantizing its dequantized floats again would only round them a second time. One at another
width is dequantized and quantized to the mode, a kernel at a time. A quantized embedding
table (a GGUF's, usually Q8_0) stays as the file has it too: its nn.Embed looks up and
dequantizes only the rows it needs, and a tied LM head (`attend`) dequantizes the table
inside its matmul, as a Dense does.
"""
import dataclasses

import jax
import jax.numpy as jnp
import qwix

from finetune_jax import errors
from finetune_jax import quantized
from finetune_jax.peft import base
from finetune_jax.peft import intercept
from finetune_jax.peft import paths

QUANTIZE_BASE = ('none', 'int8', 'nf4')
BITS = {'int8': 8, 'nf4': 4}
# Methods whose training changes the base weights, which a quantized base cannot hold.
TRAINS_BASE = ('full', 'bitfit', 'partial')


def check(cfg) -> None:
  """A ConfigError for a quantize_base this method cannot use, before anything loads."""
  mode = cfg.get('quantize_base', 'none')
  if mode not in QUANTIZE_BASE:
    raise errors.ConfigError('peft.quantize_base', f'peft.quantize_base={mode!r} is unknown; '
                             f'use one of {", ".join(QUANTIZE_BASE)}.')
  method = cfg.method if cfg.method != 'lp_ft' else cfg.lp_ft.body
  if mode != 'none' and method in TRAINS_BASE:
    raise errors.ConfigError(
        'peft.quantize_base', f'peft.quantize_base={mode} freezes the base weights in '
        f'{mode}, but peft.method={method} trains them; use a method that trains added params '
        '(lora, dora, ia3, adapter, prompt_tuning, prefix_tuning, linear_probe) or '
        'quantize_base=none.')


def quantize_kernel(kernel, mode: str, block: int):
  """A (in, out) kernel as a QArray: per-output scales over blocks of `block` inputs. An
  abstract kernel (jax.ShapeDtypeStruct) gives the abstract QArray, for memory plans."""
  tile = block if kernel.shape[0] % block == 0 else kernel.shape[0]
  quantize = lambda k: qwix.quantize(k, mode, channelwise_axes=(1,), tiled_axes={0: tile})
  if isinstance(kernel, jax.ShapeDtypeStruct):
    return jax.eval_shape(quantize, kernel)
  return quantize(jnp.asarray(kernel))


def base_weight(path: str, value, mode: str, block: int, trains: bool):
  """A param as the quantized base holds it: floats where it trains; a frozen Dense kernel
  in the checkpoint's own blocks where they have the mode's width, else quantized to
  `mode`; any other weight as loaded (a GGUF's embedding table stays in its blocks)."""
  if trains:
    return quantized.dequantize(value)
  if not (path.endswith('/kernel') and value.ndim == 2):
    return value
  if quantized.is_quantized(value):
    if jnp.iinfo(value.qvalue.dtype).bits == BITS[mode]:  # the file's blocks, as they are
      return value
    value = quantized.dequantize(value)
  return quantize_kernel(value, mode, block)


def quantize_base(adapted: base.Adapted, cfg) -> base.Adapted:
  """`adapted` with its frozen Dense kernels quantized (cfg.quantize_base), or as it is."""
  mode = cfg.get('quantize_base', 'none')
  if mode == 'none':
    return adapted
  flat = paths.flatten(adapted.params)
  held = {p: base_weight(p, v, mode, cfg.quantize_block, p in adapted.trainable)
          for p, v in flat.items()}
  module = adapted.module
  if not isinstance(module, intercept.Intercepted):
    module = intercept.Intercepted(module, intercept.PassThrough())
  return dataclasses.replace(adapted, module=module, params=paths.unflatten(held))

"""Throughput and model FLOP utilisation of the real train step.

Builds the step exactly as the trainer does (PEFT split, optax partition,
frozen params as an argument, donated state) for a zoo model on random
inputs, then reports, from XLA's own figures:
  - images/s (median over timed steps, after the compile),
  - FLOPs per step (compiled.cost_analysis) and achieved TFLOP/s,
  - a dense float32 matmul's TFLOP/s measured in the same run (JAX's default
    precision: TF32 on Ampere/Hopper GPUs), and the ratio (MFU),
  - bytes per step program (compiled.memory_analysis).

  python experiments/bench_step.py --model efficientnet-lite0-random \
      --image_size 64 --batch 64 --method partial --num_frozen_blocks 9
"""
import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from finetune_jax import base_config
from finetune_jax import models
from finetune_jax import peft
from finetune_jax import steps
from finetune_jax import tasks
from finetune_jax import train
from finetune_jax.peft import paths


def median_seconds(fn, steps):
  jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    tick = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - tick)
  return statistics.median(times)


def matmul_tflops(n, dtype, steps):
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  return 2 * n**3 / median_seconds(lambda: f(a), steps) / 1e12


def bench_config(args, method):
  """The base config (every method's section) with the benched method set."""
  c = base_config.get_config()
  c.total_steps = 1000
  c.warmup_steps = 10
  c.learning_rate = 3e-4
  c.head_learning_rate = 1e-3
  c.peft.method = method
  c.peft.num_frozen_blocks = args.num_frozen_blocks
  if args.lora_targets:
    c.peft.lora.targets = tuple(args.lora_targets.split(','))
  return c


def bench(args, method, impl):
  model = models.load_pretrained(args.model, num_classes=10)
  config = bench_config(args, method)
  # The implementation goes on the base module: a PEFT wrapper's clone is the bare model.
  model = dataclasses.replace(model, module=model.module.clone(depthwise_impl=impl))
  adapted = peft.adapt(model, config.peft)
  module = adapted.module
  state, frozen, tx = train.initial_state(config, model, adapted)
  inputs = lambda b: (model.preprocess(b['image'], image_size=args.image_size),)
  step = jax.jit(steps.make_train_step(module, inputs, tasks.ImageClassification(10),
                                       tx, axis_name=None), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 255, (args.batch, 28, 28, 1), dtype=np.uint8),
           'label': rng.integers(0, 10, (args.batch,)).astype(np.int32)}
  batch = jax.device_put(batch)
  compiled = step.lower(state, frozen, batch).compile()
  flops = compiled.cost_analysis()['flops']
  memory = compiled.memory_analysis()
  holder = {'state': state}

  def one_step():
    holder['state'], metrics = compiled(holder['state'], frozen, batch)
    return metrics
  seconds = median_seconds(one_step, args.steps)
  return {'method': method, 'impl': impl, 'images_per_s': args.batch / seconds,
          'step_ms': 1e3 * seconds, 'gflops_per_step': flops / 1e9,
          'achieved_tflops': flops / seconds / 1e12,
          'temp_bytes': getattr(memory, 'temp_size_in_bytes', None),
          'argument_bytes': getattr(memory, 'argument_size_in_bytes', None),
          'trainable_params': paths.count(state['trainable']),
          'total_params': paths.count(adapted.params)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='efficientnet-lite0-random')
  parser.add_argument('--image_size', type=int, default=64)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--method', default='partial', help='one, or several joined by commas')
  parser.add_argument('--lora_targets', default='',
                      help='lora/dora: regexes joined by commas; empty: the family default')
  parser.add_argument('--num_frozen_blocks', type=int, default=9)
  parser.add_argument('--impls', default='shift,lax')
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--matmul', type=int, default=4096)
  args = parser.parse_args()
  device = jax.devices()[0]
  peak = matmul_tflops(args.matmul, jnp.float32, args.steps)
  print(json.dumps({'device': device.device_kind, 'platform': device.platform,
                    'matmul_f32_tflops': round(peak, 3)}))
  for method in args.method.split(','):
    for impl in args.impls.split(','):
      row = bench(args, method, impl)
      row['mfu_vs_matmul'] = row['achieved_tflops'] / peak
      print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                        for k, v in row.items()}))


if __name__ == '__main__':
  main()

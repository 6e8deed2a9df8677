"""Memory and time of the train step under the memory levers: remat and gradient accumulation.

Compiles the real train step (as the trainer builds it: PEFT split, optax partition, frozen
params as an argument, donated state) of a zoo model on random tokens or images, once per
setting, and prints XLA's own figures for each: the compiled program's temp bytes
(activations and other scratch: what remat and accumulation shrink), its argument bytes
(params, optimizer state, batch), the frozen params as held (`--quantize_base`: QLoRA's
int8 or nf4 base) and the median step time. `--accum_impl multisteps`
compares the in-step scan with optax.MultiSteps (k calls of a micro-batch step, the
gradients summed in the optimizer state).

  python experiments/memory_levers.py --model smollm2-135m-random --method full \
      --batch 4 --length 512 --remat none,block,dots_saveable --accum 1

On CPU it compiles as the CLI does for a run with remat (main.REMAT_XLA_FLAGS): with
XLA:CPU's memory-optimised scheduler and remat's optimisation barriers kept, without which
XLA:CPU merges the recomputation back into the forward pass (README, Memory).
`--cpu_scheduler=concurrency` keeps XLA's defaults.
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

if __name__ == '__main__':  # before JAX reads XLA_FLAGS
  if '--cpu_scheduler=concurrency' not in sys.argv:
    from finetune_jax import main as cli_main  # noqa: E402  (imports JAX; starts no backend)
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' '
                               + ' '.join(cli_main.REMAT_XLA_FLAGS)).strip()

import jax
import numpy as np
import optax

from finetune_jax import base_config
from finetune_jax import models
from finetune_jax import optim
from finetune_jax import peft
from finetune_jax import steps
from finetune_jax import tasks
from finetune_jax import train


def _batch_and_task(model, alias, batch, length, rng):
  if alias.startswith(('smollm', 'llama', 'gpt2')):
    ids = rng.integers(0, 1000, (batch, length)).astype(np.int32)
    ones = np.ones((batch, length), np.int32)
    return ({'input_ids': ids, 'attention_mask': ones, 'loss_mask': ones},
            lambda b: (b['input_ids'], b['attention_mask']), tasks.CausalLM())
  images = rng.integers(0, 255, (batch, length, length, 3), dtype=np.uint8)
  return ({'image': images, 'label': rng.integers(0, 10, (batch,)).astype(np.int32)},
          lambda b: (model.preprocess(b['image'], image_size=length),),
          tasks.ImageClassification(10))


def measure(args, remat: str, accum: int, impl: str, quantize: str = 'none') -> dict:
  c = base_config.get_config()
  c.peft.method, c.warmup_steps, c.peft.quantize_base = args.method, 10, quantize
  decoder = args.model.startswith(('smollm', 'llama', 'gpt2'))
  model = models.load_pretrained(args.model, num_classes=None if decoder else 10,
                                 keep_quantized=quantize != 'none')  # as the trainer loads
  model = dataclasses.replace(model, module=model.module.clone(remat=remat))
  adapted = peft.adapt(model, c.peft)
  state, frozen, tx = train.initial_state(c, model, adapted)
  batch, inputs, task = _batch_and_task(model, args.model, args.batch, args.length,
                                        np.random.default_rng(0))
  calls = 1
  if impl == 'multisteps' and accum > 1:  # k calls of a micro-batch step, summed in the state
    tx = optax.MultiSteps(tx, every_k_schedule=accum)
    state['opt_state'] = tx.init(state['trainable'])
    batch = jax.tree.map(lambda x: x[:args.batch // accum], batch)
    calls, accum = accum, 1
  step = jax.jit(steps.make_train_step(adapted.module, inputs, task, tx, None,
                                       grad_accum_steps=accum), donate_argnums=(0,))
  batch = jax.device_put(batch)
  tick = time.perf_counter()
  compiled = step.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - tick
  memory = compiled.memory_analysis()
  holder = {'state': state}

  def update():  # one optimizer update: `calls` step calls
    for _ in range(calls):
      holder['state'], metrics = compiled(holder['state'], frozen, batch)
    return metrics
  times, losses = [], []  # each update's mean loss: every setting starts from the same state
  mean_loss = lambda metrics: round(float(metrics['loss'] / metrics['count']), 6)
  if args.steps:  # else compiled only: XLA's memory figures
    losses.append(mean_loss(update()))
  for _ in range(args.steps):
    tick = time.perf_counter()
    metrics = jax.block_until_ready(update())
    times.append(time.perf_counter() - tick)
    losses.append(mean_loss(metrics))
  return {'model': args.model, 'method': args.method, 'batch': args.batch,
          'length': args.length, 'remat': remat, 'grad_accum_steps': calls * accum,
          'accum_impl': impl if calls * accum > 1 else '-', 'quantize_base': quantize,
          'frozen_mib': optim.state_bytes(frozen) / 2**20,
          'temp_mib': memory.temp_size_in_bytes / 2**20,
          'argument_mib': memory.argument_size_in_bytes / 2**20,
          'optimizer_state_mib': optim.state_bytes(holder['state']['opt_state']) / 2**20,
          'update_s': statistics.median(times) if times else None, 'compile_s': compile_s,
          'losses': losses}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='smollm2-135m-random')
  parser.add_argument('--method', default='full')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--length', type=int, default=512,
                      help='tokens per row for LMs; the image side for vision models')
  parser.add_argument('--remat', default='none,block,dots_saveable')
  parser.add_argument('--accum', default='1', help='grad_accum_steps values, comma-joined')
  parser.add_argument('--accum_impl', default='scan', help='scan and/or multisteps')
  parser.add_argument('--quantize_base', default='none', help='none, int8 and/or nf4 (QLoRA)')
  parser.add_argument('--steps', type=int, default=3, help='timed updates per setting; 0 compiles only')
  parser.add_argument('--cpu_scheduler', default='memory', choices=('memory', 'concurrency'),
                      help="XLA:CPU's scheduler (set from sys.argv before JAX starts)")
  args = parser.parse_args()
  print(json.dumps({'device': jax.devices()[0].device_kind, 'jax': jax.__version__,
                    'xla_flags': os.environ.get('XLA_FLAGS', '')}))
  for remat in args.remat.split(','):
    for accum in map(int, args.accum.split(',')):
      for impl in args.accum_impl.split(',') if accum > 1 else ['scan']:
        for quantize in args.quantize_base.split(','):
          row = measure(args, remat, accum, impl, quantize)
          print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                            for k, v in row.items()}), flush=True)


if __name__ == '__main__':
  main()

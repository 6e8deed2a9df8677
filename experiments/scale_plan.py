"""Per-device memory of fine-tuning a 7B Llama, from XLA's figures for the real compiled step.

For the `llama2-7b` shape (6.7B params; nothing is allocated: params, optimizer state and
batch are abstract, from jax.eval_shape), this compiles the trainer's own train step for
`--devices` forced host devices and reads `memory_analysis` per device:
  - method: full, lora (rank 16 on q and v), qlora (the same LoRA on an nf4 base);
  - layout: pmap (every device holds the whole state and its 1/N of the batch: compiled as one
    device's program) or fsdp (one program over N devices, the state sharded N ways);
  - remat: none or block.
Compute runs in bfloat16 (as `precision=auto` on GPU/TPU), params and optimizer state in
float32, one 1024-token row per device. Compiled on XLA:CPU with the CLI's remat flags,
whose buffer assignment stands in for the GPU/TPU compiler's.

  python experiments/scale_plan.py --devices 8     # 8 x 16 GB GPUs
  python experiments/scale_plan.py --devices 16    # a v5e-16 slice (16 x 16 GB)
"""
import argparse
import dataclasses
import json
import os
import sys
import time

if __name__ == '__main__':  # before JAX reads XLA_FLAGS
  devices = next((a.split('=')[1] for a in sys.argv if a.startswith('--devices=')), None)
  devices = devices or sys.argv[sys.argv.index('--devices') + 1]
  from finetune_jax import main as cli_main  # noqa: E402  (imports JAX; starts no backend)
  os.environ['XLA_FLAGS'] = ' '.join([f'--xla_force_host_platform_device_count={devices}',
                                      *cli_main.REMAT_XLA_FLAGS])

import jax
import jax.numpy as jnp
import numpy as np

from finetune_jax import base_config
from finetune_jax import optim
from finetune_jax import parallel
from finetune_jax import peft
from finetune_jax import steps
from finetune_jax import tasks
from finetune_jax.models import architecture
from finetune_jax.models import registry
from finetune_jax.models.llama import ARCHITECTURE
from finetune_jax.models.llama import model as llama
from finetune_jax.peft import paths

METHODS = {'full': ('full', 'none'), 'lora': ('lora', 'none'), 'qlora': ('lora', 'nf4')}


def plan(name: str, layout: str, remat: str, length: int, variant: str) -> dict:
  method, quantize = METHODS[name]
  config = llama.make_config(variant)
  module = architecture.build_module(llama.LlamaForCausalLM, config).clone(remat=remat)
  params = jax.eval_shape(module.init, jax.random.PRNGKey(0), np.zeros((1, 1), np.int32))
  model = registry.pretrained(ARCHITECTURE, config, params['params'])
  model = dataclasses.replace(model, module=module)
  c = base_config.get_config()
  c.peft.method, c.peft.quantize_base = method, quantize
  c.peft.lora.rank, c.peft.lora.targets = 16, ('q', 'v')
  adapted = peft.adapt(model, c.peft)
  trainable, frozen = paths.split(adapted.params, adapted.trainable)
  tx = optim.make_optimizer(c, trainable, model.head)
  abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                                       tree)
  trainable = abstract(trainable)
  state = {'step': jax.ShapeDtypeStruct((), jnp.int32),
           'rng': jax.ShapeDtypeStruct((2,), jnp.uint32), 'trainable': trainable,
           'opt_state': jax.eval_shape(tx.init, trainable)}
  n = jax.device_count()
  rows = 1 if layout == 'pmap' else n
  ids = jax.ShapeDtypeStruct((rows, length), jnp.int32)
  batch = {'input_ids': ids, 'attention_mask': ids, 'loss_mask': ids}
  step = steps.make_train_step(adapted.module, lambda b: (b['input_ids'], b['attention_mask']),
                               tasks.CausalLM(), tx, None, jnp.bfloat16)
  tick = time.perf_counter()
  if layout == 'pmap':  # one device's program: the whole state, its share of the batch
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, frozen, batch).compile()
  else:
    fsdp = parallel.Fsdp(jax.devices())
    place = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=fsdp.sharding(x)), tree)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                        sharding=fsdp.batch_sharding), batch)
    compiled = fsdp.compile_train(step).lower(place(state), place(frozen), batch).compile()
  memory = compiled.memory_analysis()
  gib = lambda b: round(b / 2**30, 2)
  return {'variant': variant, 'method': name, 'layout': layout, 'remat': remat, 'devices': n,
          'arguments_gib': gib(memory.argument_size_in_bytes),
          'temp_gib': gib(memory.temp_size_in_bytes),
          'per_device_gib': gib(memory.argument_size_in_bytes + memory.temp_size_in_bytes),
          'trainable_params': paths.count(trainable),
          'compile_s': round(time.perf_counter() - tick)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--devices', type=int, required=True)
  parser.add_argument('--methods', default='full,lora,qlora')
  parser.add_argument('--layouts', default='pmap,fsdp')
  parser.add_argument('--remat', default='none,block')
  parser.add_argument('--length', type=int, default=1024)
  parser.add_argument('--variant', default='llama2-7b',
                      help="a Llama VARIANTS key ('tiny': a quick check)")
  args = parser.parse_args()
  for name in args.methods.split(','):
    for layout in args.layouts.split(','):
      for remat in args.remat.split(','):
        print(json.dumps(plan(name, layout, remat, args.length, args.variant)), flush=True)


if __name__ == '__main__':
  main()

r"""The project's train step against PyTorch + Hugging Face PEFT, side by side.

Each side runs in its own worker process (so each has its own peak RSS and
thread pool); the parent asks them for one step in turn, R rounds, so noise on
the machine hits both. Both sides train on the same batch, with AdamW and the
model's own dropout. Ours is built as the trainer builds it
(`train.build_model`, `train.initial_state`, `steps.make_train_step`).

  python experiments/benchmark.py [--workloads minilm_full,minilm_lora] \
      [--rounds 10] [--out results.md]

Prints, per workload: median step time of each side, their ratio and
examples/s; XLA's FLOPs per step, achieved GFLOP/s and its share of a dense
float32 matmul timed in the same run; the compiled step's memory and each
side's peak RSS.
"""
import argparse
import dataclasses
import multiprocessing
import resource
import statistics
import sys
import time

import numpy as np

MATMUL_N = 2048


@dataclasses.dataclass(frozen=True)
class Workload:
  name: str
  method: str  # 'full' or 'lora'
  batch: int
  length: int
  num_classes: int = 8


WORKLOADS = {w.name: w for w in [
    Workload('minilm_full', 'full', batch=32, length=128),
    Workload('minilm_lora', 'lora', batch=32, length=128),
]}
LEARNING_RATE, WEIGHT_DECAY, LORA_RANK, LORA_ALPHA = 1e-4, 0.01, 8, 16


def make_batch(w: Workload) -> dict:
  rng = np.random.default_rng(0)
  return {'input_ids': rng.integers(1000, 30000, (w.batch, w.length), dtype=np.int32),
          'attention_mask': np.ones((w.batch, w.length), np.int32),
          'label': rng.integers(0, w.num_classes, (w.batch,)).astype(np.int32)}


def jax_side(w: Workload):
  """(one-step callable, facts from XLA) for our trainer's step."""
  import jax
  import jax.numpy as jnp
  sys.path.insert(0, '.')
  from configs import minilm_fortunes
  from finetune_jax import steps, tasks, train

  config = minilm_fortunes.get_config()
  config.peft.method = w.method
  config.peft.lora.rank, config.peft.lora.alpha = LORA_RANK, float(LORA_ALPHA)
  config.peft.lora.targets = ('q', 'v')
  config.learning_rate = config.head_learning_rate = LEARNING_RATE
  config.optimizer.weight_decay = WEIGHT_DECAY
  model, adapted = train.build_model(config)
  state, frozen, tx = train.initial_state(config, model, adapted)
  inputs = lambda b: (b['input_ids'], b['attention_mask'])
  step = jax.jit(steps.make_train_step(adapted.module, inputs, tasks.make_task(config),
                                       tx, axis_name=None), donate_argnums=(0,))
  batch = jax.device_put(make_batch(w))
  compiled = step.lower(state, frozen, batch).compile()
  memory = compiled.memory_analysis()
  a = jnp.ones((MATMUL_N, MATMUL_N), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  jax.block_until_ready(matmul(a))
  times = []
  for _ in range(5):
    tick = time.perf_counter()
    jax.block_until_ready(matmul(a))
    times.append(time.perf_counter() - tick)
  facts = {'flops': compiled.cost_analysis()['flops'],
           'matmul_gflops': 2 * MATMUL_N**3 / statistics.median(times) / 1e9,
           'temp_bytes': memory.temp_size_in_bytes,
           'argument_bytes': memory.argument_size_in_bytes}
  holder = {'state': state}

  def one_step():
    holder['state'], metrics = compiled(holder['state'], frozen, batch)
    jax.block_until_ready(metrics)
  return one_step, facts


def torch_side(w: Workload):
  """(one-step callable, {}) for transformers + PEFT on the same weights."""
  import torch
  import transformers
  from finetune_jax.models import bert
  import peft

  class Classifier(torch.nn.Module):
    """Mean pooling of the last hidden states, then a linear head (as ours)."""

    def __init__(self):
      super().__init__()
      self.encoder = transformers.AutoModel.from_pretrained(bert.minilm_dir())
      self.head = torch.nn.Linear(self.encoder.config.hidden_size, w.num_classes)

    def forward(self, input_ids, attention_mask):
      hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
      mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
      return self.head((hidden * mask).sum(1) / mask.sum(1))

  torch.manual_seed(0)
  model = Classifier()
  if w.method == 'lora':
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=['query', 'value'],
        modules_to_save=['head'], lora_dropout=0.0))
  model.train()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                          lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  batch = {k: torch.from_numpy(v).long() for k, v in make_batch(w).items()}

  def one_step():
    logits = model(batch['input_ids'], batch['attention_mask'])
    loss = torch.nn.functional.cross_entropy(logits, batch['label'])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
  return one_step, {}


def worker(side: str, name: str, conn) -> None:
  one_step, facts = (jax_side if side == 'jax' else torch_side)(WORKLOADS[name])
  one_step()  # Warm-up: compile (ours), allocator and autograd caches (theirs).
  while conn.recv() == 'step':
    tick = time.perf_counter()
    one_step()
    conn.send(time.perf_counter() - tick)
  facts['peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  conn.send(facts)


def run(name: str, rounds: int) -> dict:
  context = multiprocessing.get_context('spawn')
  sides = {}
  for side in ('jax', 'torch'):
    parent, child = context.Pipe()
    process = context.Process(target=worker, args=(side, name, child))
    process.start()
    sides[side] = (process, parent)
  times = {'jax': [], 'torch': []}
  for _ in range(rounds):
    for side, (_, conn) in sides.items():
      conn.send('step')
      times[side].append(conn.recv())
  facts = {}
  for side, (process, conn) in sides.items():
    conn.send('stop')
    facts[side] = conn.recv()
    process.join()
  w = WORKLOADS[name]
  ours, theirs = statistics.median(times['jax']), statistics.median(times['torch'])
  gflops = facts['jax']['flops'] / ours / 1e9
  return {'workload': name, 'ours_s': ours, 'torch_s': theirs, 'speedup': theirs / ours,
          'ours_ex_s': w.batch / ours, 'torch_ex_s': w.batch / theirs,
          'gflop_per_step': facts['jax']['flops'] / 1e9, 'gflop_s': gflops,
          'matmul_share': gflops / facts['jax']['matmul_gflops'],
          'temp_mib': facts['jax']['temp_bytes'] / 2**20,
          'ours_rss_mib': facts['jax']['peak_rss_bytes'] / 2**20,
          'torch_rss_mib': facts['torch']['peak_rss_bytes'] / 2**20}


COLUMNS = [('workload', '{}'), ('ours_s', '{:.3f}'), ('torch_s', '{:.3f}'),
           ('speedup', '{:.2f}x'), ('ours_ex_s', '{:.1f}'), ('torch_ex_s', '{:.1f}'),
           ('gflop_per_step', '{:.0f}'), ('gflop_s', '{:.0f}'), ('matmul_share', '{:.0%}'),
           ('temp_mib', '{:.0f}'), ('ours_rss_mib', '{:.0f}'), ('torch_rss_mib', '{:.0f}')]


def table(rows: list[dict]) -> str:
  lines = ['| ' + ' | '.join(c for c, _ in COLUMNS) + ' |',
           '|' + '---|' * len(COLUMNS)]
  for row in rows:
    lines.append('| ' + ' | '.join(f.format(row[c]) for c, f in COLUMNS) + ' |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workloads', default=','.join(WORKLOADS))
  parser.add_argument('--rounds', type=int, default=10)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  names = args.workloads.split(',')
  unknown = [n for n in names if n not in WORKLOADS]
  if unknown:
    parser.error(f'unknown workloads {unknown}; choose from {",".join(WORKLOADS)}')
  rows = []
  for name in names:
    rows.append(run(name, args.rounds))
    print(table(rows[-1:]).splitlines()[-1], flush=True)
  text = table(rows)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()

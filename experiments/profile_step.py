r"""Where a train step's time goes: XLA's own per-thunk times from `jax.profiler`.

Times N steps of a compiled train step under `jax.profiler.trace` and sums the
trace's events per thunk kind (XLA:CPU names each thunk after its fusion:
`ynn_fusion` for the dots YNNPACK runs, `pad_slice_fusion`, ...), optionally
per output shape, next to XLA's FLOP count.

  python experiments/profile_step.py --workload minilm_full [--by_shape]
  python experiments/profile_step.py --config configs/default.py \
      --set cache_frozen_features=on [--set peft.method=linear_probe]

A workload is one of experiments/benchmark.py's; a config is built and fed
exactly as the trainer does (its pipeline, its feature cache).
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Events that wrap the thunks rather than being one.
_WRAPPERS = ('ThunkExecutor', '$', 'PjitFunction', 'SlinkyThreadPool')


def workload_step(name: str):
  import benchmark  # pylint: disable=g-import-not-at-top
  from finetune_jax import precision, steps, tasks, train
  w = benchmark.WORKLOADS[name]
  config = benchmark.our_config(w, 'float32')
  model, adapted = train.build_model(config)
  state, frozen, tx = train.initial_state(config, model, adapted)
  inputs = ((lambda b: (b['image'],)) if w.task == 'image_classification'
            else (lambda b: (b['input_ids'], b['attention_mask'])))
  step = steps.make_train_step(adapted.module, inputs, tasks.make_task(config), tx, None,
                               precision.compute_dtype(config.precision))
  return step, state, frozen, jax.device_put(benchmark.make_batch(w))


def config_step(path: str, settings: list[str]):
  from finetune_jax import feature_cache, pipelines, precision, steps, tasks, train
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(','.join(settings) or None)  # as `--config path:ITEMS`
  dtype = precision.compute_dtype(config.precision)
  model, adapted = train.build_model(config)
  splits = pipelines.open_dataset(config)
  pipeline = pipelines.make(config, splits, model)
  state, frozen, tx = train.initial_state(config, model, adapted)
  plan, decision = feature_cache.plan(config, model, adapted, splits, pipeline, dtype)
  net = adapted.module
  if plan:
    net, pipeline = feature_cache.build(plan, decision, config, adapted, splits, pipeline, dtype)
  step = steps.make_train_step(net, pipeline.inputs, tasks.make_task(config), tx, None, dtype)
  return step, state, frozen, next(pipeline.train(0))


def profile(step, state, frozen, batch, num_steps: int, by_shape: bool) -> None:
  compiled = jax.jit(step, donate_argnums=(0,)).lower(state, frozen, batch).compile()
  state, metrics = compiled(state, frozen, batch)
  jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(num_steps):
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
    trace = glob.glob(os.path.join(trace_dir, '**', '*.json.gz'), recursive=True)[0]
    events = json.load(gzip.open(trace))
  events = events['traceEvents'] if isinstance(events, dict) else events
  shapes = {}
  for line in compiled.as_text().splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[\d,]*\})? ', line)
    if m:
      shapes[m.group(1)] = m.group(2)
  totals = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and not e['name'].startswith(_WRAPPERS):
      kind = re.sub(r'[.\d]+$', '', e['name'])
      totals[(kind, shapes.get(e['name'], '')) if by_shape else kind] += e.get('dur', 0)
  total = sum(totals.values())
  print(f'{compiled.cost_analysis()["flops"] / 1e9:.2f} GFLOP per step (XLA); thunks '
        f'{total / 1e3 / num_steps:.1f} ms per step (the mean of {num_steps} steps)')
  for key, micros in totals.most_common(20):
    print(f'{micros / 1e3 / num_steps:9.1f} ms {100 * micros / total:5.1f}%  '
          f'{" ".join(key) if by_shape else key}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workload', default='')
  parser.add_argument('--config', default='')
  parser.add_argument('--set', action='append', default=[],
                      help='FIELD=VALUE, as in `--config file.py:FIELD=VALUE`')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--by_shape', action='store_true')
  args = parser.parse_args()
  if bool(args.workload) == bool(args.config):
    parser.error('give --workload or --config')
  made = (workload_step(args.workload) if args.workload
          else config_step(args.config, args.set))
  profile(*made, args.steps, args.by_shape)


if __name__ == '__main__':
  main()

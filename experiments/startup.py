r"""Startup per shipped config: where the time before the first train step goes.

For each config, in a fresh process, times the stages the trainer runs before
its first step, as `train.train_and_evaluate` runs them: opening the dataset,
loading the pretrained model and adapting it, building the pipeline, the
initial state (optimizer included), the first batch, and compiling the train
and eval steps (with JAX's persistent compilation cache off, then on and warm).

  python experiments/startup.py [--configs default,minilm_fortunes,...]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ('default', 'vit', 'resnet', 'vgg16', 'minilm_fortunes', 'gpt2_lyrics',
           'smollm2_poems')


def measure(name: str, cache_dir: str) -> dict:
  """Runs in a child process: the stage times of config `name` (seconds)."""
  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.join(ROOT, 'configs'))
  tick = time.perf_counter()
  times = {}

  def stage(label):
    nonlocal tick
    now = time.perf_counter()
    times[label] = round(now - tick, 2)
    tick = now

  import jax  # pylint: disable=import-outside-toplevel
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  from finetune_jax import parallel, pipelines, precision, steps, tasks, train
  stage('import')
  config = __import__(name).get_config()
  strategy = parallel.make(config.parallel)
  task = tasks.make_task(config)
  splits = pipelines.open_dataset(config)
  stage('open dataset')
  model, adapted = train.build_model(config)
  stage('load + adapt model')
  pipeline = pipelines.make(config, splits, model, adapted.method.reserved_positions(adapted))
  stage('pipeline')
  state, frozen, tx = train.initial_state(config, model, adapted)
  stage('initial state')
  batch = strategy.shard(next(pipeline.train(0)))
  stage('first batch')
  dtype = precision.compute_dtype(config.precision)
  train_step = strategy.compile_train(
      steps.make_train_step(adapted.module, pipeline.inputs, task, tx, strategy.axis_name, dtype))
  eval_step = strategy.compile_eval(
      steps.make_eval_step(adapted.module, pipeline.inputs, task, dtype))
  state, frozen = strategy.place(state), strategy.place(frozen)
  state, _ = jax.block_until_ready(train_step(state, frozen, batch))  # donates the old state
  stage('compile + first train step')
  eval_batch = strategy.shard(next(pipeline.eval()))
  jax.block_until_ready(eval_step(state['trainable'], frozen, eval_batch))
  stage('compile + first eval step')
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default=','.join(CONFIGS))
  parser.add_argument('--child', help=argparse.SUPPRESS)
  parser.add_argument('--cache_dir', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.child, args.cache_dir)))
    return
  rows = []
  with tempfile.TemporaryDirectory() as cache:
    for name in args.configs.split(','):
      for label, cache_dir in (('cold', ''), ('cache written', cache), ('cache warm', cache)):
        proc = subprocess.run([sys.executable, __file__, f'--child={name}',
                               f'--cache_dir={cache_dir}'], capture_output=True, text=True,
                              env={**os.environ, 'XLA_FLAGS': ''})
        if proc.returncode:
          print(f'{name} ({label}) failed: {proc.stderr.strip().splitlines()[-1]}', flush=True)
          break
        times = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append((name, label, times))
        print(name, label, times, flush=True)
  stages = list(rows[0][2]) if rows else []
  print('\n| config | compile cache | ' + ' | '.join(stages) + ' | total |')
  print('|---|---|' + '---|' * (len(stages) + 1))
  for name, label, times in rows:
    print(f'| {name} | {label} | ' + ' | '.join(f'{times[s]:.1f}' for s in stages)
          + f' | {sum(times.values()):.1f} |')


if __name__ == '__main__':
  main()

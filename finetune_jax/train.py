"""The training loop: `train_and_evaluate(config, workdir)`.

Data flows one way: config -> pretrained model -> PEFT split into trainable
and frozen params -> optimizer over the trainable ones -> compiled steps
(steps.py) -> metrics and checkpoints.
"""
import contextlib
import dataclasses
import logging
import os
import resource
import sys
import time

import jax
import numpy as np
import tqdm

from finetune_jax import checkpoint
from finetune_jax import config_checks
from finetune_jax import distributed
from finetune_jax import drift as feature_drift
from finetune_jax import errors
from finetune_jax import failpoints
from finetune_jax import feature_cache
from finetune_jax import models
from finetune_jax import nonfinite
from finetune_jax import optim
from finetune_jax import parallel
from finetune_jax import peft
from finetune_jax import pipelines
from finetune_jax import precision
from finetune_jax import sampling
from finetune_jax import signals
from finetune_jax import steps
from finetune_jax import tasks
from finetune_jax import workdir as workdir_lib
from finetune_jax.peft import hf_format
from finetune_jax.peft import paths


class _Progress:
  """A progress bar on a terminal, periodic log lines otherwise."""

  def __init__(self, total: int, initial: int):
    self._bar = tqdm.tqdm(total=total, initial=initial, unit='step',
                          disable=not sys.stderr.isatty())

  def update(self, step: int, metrics: dict | None = None):
    self._bar.update(1)
    if metrics:
      line = ' '.join(f'{k}={v:.4g}' for k, v in metrics.items())
      if self._bar.disable:
        logging.info('step %d: %s', step, line)
      else:
        self._bar.set_postfix_str(line)

  def close(self):
    self._bar.close()


class _StepTimer:
  """Wall time of the train steps alone: not the compile, evals or saves.

  Dispatch is asynchronous, so each boundary waits for the state first.
  """

  def __init__(self):
    self._start, self._paused = None, 0.0

  def start(self, state):
    jax.block_until_ready(state)
    self._start = time.perf_counter()

  @contextlib.contextmanager
  def paused(self, state):
    jax.block_until_ready(state)
    tick = time.perf_counter()
    yield
    self._paused += time.perf_counter() - tick

  def rate(self, state, examples: int):
    if self._start is None or examples <= 0:
      return None
    jax.block_until_ready(state)
    return examples / (time.perf_counter() - self._start - self._paused)


def _host_sum(device_metrics: list, strategy, per_device: bool = False) -> dict:
  """Sums per-step metric dicts that still live on device (one sync).

  Under pmap each leaf has a device axis: the train step's sums are already
  reduced over it (every device holds the total), the eval step's are not
  (`per_device`: each holds its own, added up here).
  """
  total = jax.device_get(jax.tree.map(lambda *xs: sum(xs), *device_metrics))
  if isinstance(strategy, parallel.Pmap):
    total = jax.tree.map(lambda x: x.sum(0) if per_device else x[0], total)
  return total


# Steps dispatched ahead of the device at most. XLA:CPU runs a bounded number
# of programs per device at once; with more queued, devices of a collective
# can wait on each other forever (seen with 8 host devices and 46 eval
# batches). A window this size still hides the host's work on accelerators.
MAX_IN_FLIGHT = 8


def evaluate(eval_step, state, frozen, pipeline, task, strategy,
             interrupted=lambda: False) -> dict | None:
  """The eval split's metrics (eval_*), the validation split's (val_*) where held out, and
  each extra eval's (<name>_*); None if `interrupted()` turns true on the way."""
  passes = {'val_': pipeline.validation, 'eval_': pipeline.eval,
            **{f'{name}_': batches for name, batches in pipeline.extra.items()}}
  metrics = {}
  for prefix, batches in passes.items():
    if batches is None:
      continue
    sums = []
    for batch in batches():
      failpoints.hit('eval_batch')
      if interrupted():
        return None
      sums.append(eval_step(state['trainable'], frozen, strategy.shard(batch)))
      if len(sums) % MAX_IN_FLIGHT == 0:
        jax.block_until_ready(sums[-1])
    metrics.update(task.finalize(_host_sum(sums, strategy, per_device=True), prefix=prefix))
  return metrics


def sample_texts(config, model, adapted, trainable, frozen) -> list[dict]:
  """Continuations of `config.generation.prompts` by the model as it is now."""
  gen = config.generation
  current = dataclasses.replace(model, module=adapted.module,
                                params=paths.join(trainable, frozen))
  texts = sampling.generate_text(
      current, list(gen.prompts), max_new_tokens=gen.max_new_tokens,
      temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
      rng=jax.random.PRNGKey(config.seed))
  return [{'prompt': p, 'text': t} for p, t in zip(gen.prompts, texts)]


def peak_memory_bytes() -> int:
  """The process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == 'darwin' else peak * 1024


def model_options(config) -> dict:
  """What the task asks of the architecture, beyond the checkpoint."""
  if config.task == 'image_classification':
    return {'image_size': config.image_size}
  if config.task == 'text_classification':
    return {'pooling': config.text.pooling}
  return {}


def build_model(config, *, missing_adapter_ok: bool = False):
  """(pretrained model, its PEFT adaptation) as `config` defines them.

  The adaptation starts from the adapter dir `peft.init_from` when one is
  named. Shared with export.py, which rebuilds a run's model from its
  config.json; there a since-deleted adapter dir is no error
  (`missing_adapter_ok`), as the checkpoint holds the trained values.
  """
  # A quantized base keeps what the checkpoint already stores quantized (QLoRA on a GGUF).
  model = models.load_pretrained(config.pretrained, num_classes=config.num_classes,
                                 dont_load=tuple(config.dont_load), seed=config.seed,
                                 keep_quantized=config.peft.quantize_base != 'none',
                                 **model_options(config))
  if config.get('remat', 'none') != 'none':  # before adapt: a method wraps the module
    if not hasattr(model.module, 'remat'):
      raise errors.ConfigError('remat', f'remat={config.remat!r}: {type(model.module).__name__} '
                               'has no remat field; use remat=none, or build its blocks '
                               'through models.layers.remat as the zoo models do.')
    model = dataclasses.replace(model, module=model.module.clone(remat=config.remat))
  adapted = peft.adapt(model, config.peft)
  init_from = config.peft.get('init_from')
  if init_from and (os.path.exists(init_from) or not missing_adapter_ok):
    adapted = hf_format.load_adapter(adapted, model, init_from)
  return model, adapted


def initial_state(config, model, adapted):
  """(step-0 train state, frozen params, optimizer) of an adapted model.

  The state is what checkpoints hold; shared with export.py, which restores
  one into it.
  """
  trainable, frozen = paths.split(adapted.params, adapted.trainable)
  tx = optim.make_optimizer(config, trainable, model.head,
                            peft.base.added_paths(model, adapted), adapted.method.probe_steps)
  state = {'step': np.int32(0), 'rng': jax.random.PRNGKey(config.seed),
           'trainable': trainable, 'opt_state': tx.init(trainable)}
  return state, frozen, tx


def train_and_evaluate(config, workdir: str) -> dict:
  """Fine-tunes `config.pretrained` on `config.dataset`; returns results.json."""
  start_time = time.time()
  # Everything a user can get wrong is checked before anything is written.
  distributed.check(config)
  strategy = parallel.make(config.parallel, tuple(config.mesh.values()))
  config_checks.validate(config, strategy.num_devices)
  workdir_lib.check_usable(workdir)
  workdir_lib.check_compatible(workdir, config)
  task = tasks.make_task(config)
  splits = pipelines.open_dataset(config)
  model, adapted = build_model(config)
  recomputes = config.remat != 'none' or config.peft.quantize_base != 'none'
  if (recomputes and jax.default_backend() == 'cpu'
      and 'cse_barrier_expander' not in os.environ.get('XLA_FLAGS', '')):
    logging.warning('remat and quantize_base save little memory on CPU unless JAX starts with '
                    'the XLA_FLAGS of finetune_jax.main.REMAT_XLA_FLAGS (the CLI sets them).')
  pipeline = pipelines.make(config, splits, model,
                            adapted.method.reserved_positions(adapted))
  state, frozen, tx = initial_state(config, model, adapted)
  dtype = precision.compute_dtype(config.precision)
  cache_plan, cache = feature_cache.plan(config, model, adapted, splits, pipeline, dtype)
  workdir_lib.write_config(workdir, config)

  ckpt = checkpoint.Checkpointer(workdir, config.max_to_keep)
  best_ckpt = (checkpoint.Checkpointer(workdir, 1, best=tasks.selection_metric(config.task))
               if config.keep_best else None)
  had_checkpoints = ckpt.latest_step() is not None
  restored = ckpt.restore_newest_good(strategy.restore_target(state))
  if restored is not None:
    state = restored
    logging.info('Resumed from step %d of %s.', state['step'], ckpt.directory)
  elif had_checkpoints:
    logging.warning('No good checkpoint is left in %s (see the warnings above): starting over '
                    'from step 0.', ckpt.directory)
  start_step = int(state['step'])
  results = workdir_lib.read_results(workdir)
  if start_step >= config.total_steps and results and results['steps'] >= start_step:
    logging.info('Run already finished at step %d: %s', start_step, results['final'])
    for manager in filter(None, (ckpt, best_ckpt)):
      manager.close()
    return results

  report = {'trainable_params': paths.count(state['trainable']),
            'total_params': paths.count(adapted.params),
            'optimizer_state_bytes': optim.state_bytes(state['opt_state']),
            # As held: a quantized base (peft.quantize_base) counts its values and scales.
            'frozen_param_bytes': optim.state_bytes(frozen)}
  logging.info('Method %s: %d of %d params train (%.2f%%); optimizer state %d bytes.',
               config.peft.method, report['trainable_params'], report['total_params'],
               100 * report['trainable_params'] / report['total_params'],
               report['optimizer_state_bytes'])

  module, raw_pipeline = adapted.module, pipeline
  if cache_plan:
    module, pipeline = feature_cache.build(cache_plan, cache, config, adapted, splits,
                                           pipeline, dtype)
  axis = strategy.axis_name
  logging.info('Computing in %s (precision=%s).', jax.numpy.dtype(dtype).name,
               config.precision)
  accum, skip = config.grad_accum_steps, config.nonfinite == 'skip'
  train_step = strategy.compile_train(
      steps.make_train_step(module, pipeline.inputs, task, tx, axis, dtype,
                            grad_accum_steps=accum, skip_nonfinite=skip))
  probe_steps = adapted.method.probe_steps
  if probe_steps:  # lp_ft: the head alone first; no gradient for the rest
    head = {p for p in paths.flatten(state['trainable']) if p.startswith(model.head + '/')}
    probe_step = strategy.compile_train(
        steps.make_train_step(module, pipeline.inputs, task, tx, axis, dtype, only=head,
                              grad_accum_steps=accum, skip_nonfinite=skip))
    logging.info('lp_ft: steps 1-%d train the head alone, then %s trains.', probe_steps,
                 config.peft.lp_ft.body)
  eval_step = strategy.compile_eval(
      steps.make_eval_step(module, pipeline.inputs, task, dtype))
  host_frozen = frozen
  state = strategy.place(state)
  frozen = strategy.place(frozen)
  lr_schedule = optim.schedule(config, config.learning_rate)

  writer = workdir_lib.MetricWriter(workdir, start_step)
  watch = nonfinite.NonFiniteWatch(config, state['trainable'], skipped_before=sum(
      e.get('train_nonfinite_skips', 0) for e in workdir_lib.read_events(workdir, 'train')))
  stop = signals.StopRequest(enabled=jax.process_count() == 1)

  def run_eval(step):
    metrics = evaluate(eval_step, state, frozen, pipeline, task, strategy,
                       interrupted=lambda: stop.requested)
    if metrics is None:  # a stop request: the resumed run evaluates this step (below)
      return {}
    writer.write(step, 'eval', metrics)
    if best_ckpt:  # orbax keeps it only while it is the best
      best_ckpt.save(step, strategy.checkpointable(state), metrics=metrics)
    logging.info('step %d: %s', step, metrics)
    if config.task == 'causal_lm' and config.generation.prompts:
      samples = sample_texts(config, model, adapted,
                             strategy.to_host(state)['trainable'], host_frozen)
      writer.write_samples(step, samples)
      for sample in samples:
        logging.info('step %d sample: %r -> %r', step, sample['prompt'], sample['text'])
    return metrics

  def is_eval_step(step):
    return step % config.eval_every == 0 or step == config.total_steps

  progress = _Progress(config.total_steps, start_step)
  pending, eval_metrics = [], {}
  timer = _StepTimer()
  preempted = None
  with stop, contextlib.ExitStack() as closing:
    # However the loop ends, the checkpoint writes in flight finish and the metrics flush.
    closing.callback(writer.close)
    closing.callback(progress.close)
    for manager in filter(None, (best_ckpt, ckpt)):
      closing.callback(manager.close)
    if start_step == 0 and config.eval_before_training:
      run_eval(0)
    elif (0 < start_step and is_eval_step(start_step)
          and workdir_lib.read_event(workdir, start_step, 'eval') is None):
      # The run stopped during this step's eval, after its checkpoint was saved.
      eval_metrics = run_eval(start_step)
    batches = pipeline.train(start_step)
    for step in range(start_step + 1, config.total_steps + 1):
      step_fn = probe_step if step <= probe_steps else train_step
      state, metrics = step_fn(state, frozen, strategy.shard(next(batches)))
      watch.add(step, metrics)
      if step == start_step + 1:  # The first step compiles: time the rest.
        timer.start(state)
      pending.append(metrics)
      if step % MAX_IN_FLIGHT == 0:
        jax.block_until_ready(metrics)
      logged = None
      if step % config.log_every == 0 or step == config.total_steps:
        logged = task.finalize(_host_sum(pending, strategy), prefix='train_')
        logged['learning_rate'] = float(lr_schedule(step - 1))
        skips = watch.check(strategy)
        if config.nonfinite == 'skip':
          logged['train_nonfinite_skips'] = skips
        writer.write(step, 'train', logged)
        pending = []
      if is_eval_step(step) and not stop.requested:
        watch.check(strategy)  # keep_best may save at the eval
        with timer.paused(state):
          eval_metrics = run_eval(step)
      if stop.requested or ckpt.reached_preemption(step):
        preempted = step
      if step % config.checkpoint_every == 0 or step == config.total_steps or preempted:
        watch.check(strategy)  # never a checkpoint after a non-finite step under `stop`
        with timer.paused(state):
          ckpt.save(step, strategy.checkpointable(state))
      progress.update(step, logged)
      if preempted:
        break
  if preempted:  # every process saved this step; the same command resumes from it
    logging.warning('Stopped at step %d: checkpoint saved; run the same command to resume.',
                    preempted)
    return {'preempted_at': preempted, 'exit_code': stop.exit_code, 'steps': config.total_steps,
            'final': eval_metrics, 'wall_s': time.time() - start_time}
  examples_per_sec = timer.rate(state, config.batch_size * (config.total_steps - start_step - 1))
  if not eval_metrics:  # Resumed at the end, after the last eval: read it back.
    eval_metrics = workdir_lib.read_event(workdir, config.total_steps, 'eval')
  best = None
  if best_ckpt:
    step = best_ckpt.best_step()
    best = {'step': step, **(workdir_lib.read_event(workdir, step, 'eval') or {})}

  drift = None
  if config.feature_drift_examples and config.task in tasks.CLASSIFICATION and model.head:
    final_params = paths.join(strategy.to_host(state)['trainable'], host_frozen)
    drift = feature_drift.feature_drift(
        adapted.module, model.head, adapted.params, final_params, raw_pipeline.eval,
        raw_pipeline.inputs, config.feature_drift_examples, dtype)
    logging.info('Feature drift on %d eval examples: CKA %.4f, cosine %.4f.',
                 drift['examples'], drift['cka'], drift['cosine'])

  initial = workdir_lib.read_event(workdir, 0, 'eval')
  results = {'final': eval_metrics, 'steps': config.total_steps,
             **({'initial': initial} if initial else {}),
             **({'best': best} if best else {}),
             **({'feature_drift': drift} if drift else {}),
             'method': config.peft.method,
             'trainable_percent': 100 * report['trainable_params'] / report['total_params'],
             'train_examples_per_sec': examples_per_sec,
             'feature_cache': cache.report(),
             'peak_memory_bytes': peak_memory_bytes(),
             'nonfinite_skips': watch.skipped,
             'wall_s': time.time() - start_time, **report}
  workdir_lib.write_results(workdir, results)
  return results

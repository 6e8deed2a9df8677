"""The training loop: `train_and_evaluate(config, workdir)`.

Data flows one way: config -> pretrained model -> PEFT split into trainable
and frozen params -> optimizer over the trainable ones -> compiled steps
(steps.py) -> metrics and checkpoints.
"""
import contextlib
import functools
import logging
import sys
import time

import jax
import numpy as np
import tqdm

from finetune_jax import checkpoint
from finetune_jax import config_checks
from finetune_jax import data
from finetune_jax import models
from finetune_jax import optim
from finetune_jax import parallel
from finetune_jax import peft
from finetune_jax import steps
from finetune_jax import tasks
from finetune_jax import workdir as workdir_lib
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


def _host_sum(device_metrics: list, strategy) -> dict:
  """Sums per-step metric dicts that still live on device (one sync)."""
  total = jax.device_get(jax.tree.map(lambda *xs: sum(xs), *device_metrics))
  if isinstance(strategy, parallel.Pmap):
    total = jax.tree.map(lambda x: x[0], total)
  return total


def make_image_transforms(config):
  """(train, eval) per-example image transforms, run in the grain workers.

  They decode, crop and resize to config.image_size on the host, so the device
  gets uint8 squares (the model's preprocess then only normalises).
  """
  if config.task != 'image_classification':
    return None, None
  shared = dict(crop_ratio=config.eval_crop_ratio, to_rgb=True)
  augment = config.augment
  train_transform = data.make_image_transform(
      config.image_size, train=True,
      random_resized_crop=augment.random_resized_crop, flip=augment.flip,
      scale=tuple(augment.scale), ratio=tuple(augment.ratio), **shared)
  eval_transform = data.make_image_transform(config.image_size, train=False,
                                             **shared)
  return train_transform, eval_transform


def needs_host_transform(split, config) -> bool:
  """Whether images must be decoded, cropped or augmented on the host.

  Stored arrays of one size with no augmentation and a plain resize go to the
  device as they are (fewer bytes to copy) and `preprocess` resizes them there.
  """
  image = split.source[0]['image']
  fixed_array = isinstance(image, np.ndarray) and image.dtype == np.uint8
  augmented = config.augment.random_resized_crop or config.augment.flip
  return not fixed_array or augmented or config.eval_crop_ratio != 1.0


def evaluate(eval_step, state, frozen, split, config, strategy,
             transform=None) -> dict:
  sums = []
  for batch in data.eval_batches(split, batch_size=config.eval_batch_size,
                                 transform=transform):
    sums.append(eval_step(state['trainable'], frozen, strategy.shard(batch)))
  return tasks.finalize(_host_sum(sums, strategy), prefix='eval_')


def train_and_evaluate(config, workdir: str) -> dict:
  """Fine-tunes `config.pretrained` on `config.dataset`; returns results.json."""
  start_time = time.time()
  # Everything a user can get wrong is checked before anything is written.
  strategy = parallel.make(config.parallel)
  config_checks.validate(config, strategy.num_devices)
  workdir_lib.check_compatible(workdir, config)
  task = tasks.make_task(config)
  train_transform, eval_transform = make_image_transforms(config)
  load = functools.partial(data.load_split, data_dir=config.data_dir,
                           on_bad_image=config.folder_on_bad_image)
  train_split = load(config.dataset, 'train')
  eval_split = load(config.dataset, config.eval_split)
  if not needs_host_transform(train_split, config):
    train_transform = eval_transform = None
  if train_split.num_classes is not None and train_split.num_classes != config.num_classes:
    raise ValueError(f'num_classes={config.num_classes} but dataset {config.dataset!r} '
                     f'has {train_split.num_classes} classes; set --config.num_classes.')
  model = models.load_pretrained(config.pretrained, num_classes=config.num_classes,
                                 dont_load=tuple(config.dont_load), seed=config.seed,
                                 image_size=config.image_size)
  adapted = peft.adapt(model, config.peft)
  trainable, frozen = paths.split(adapted.params, adapted.trainable)
  tx = optim.make_optimizer(config, trainable, model.head)
  workdir_lib.write_config(workdir, config)

  state = {'step': np.int32(0), 'rng': jax.random.PRNGKey(config.seed),
           'trainable': trainable, 'opt_state': tx.init(trainable)}
  ckpt = checkpoint.Checkpointer(workdir, config.max_to_keep)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
    logging.info('Resumed from step %d of %s.', state['step'], ckpt.directory)
  start_step = int(state['step'])
  results = workdir_lib.read_results(workdir)
  if start_step >= config.total_steps and results and results['steps'] >= start_step:
    logging.info('Run already finished at step %d: %s', start_step, results['final'])
    ckpt.close()
    return results

  report = {'trainable_params': paths.count(trainable),
            'total_params': paths.count(adapted.params),
            'optimizer_state_bytes': optim.state_bytes(state['opt_state'])}
  logging.info('Method %s: %d of %d params train (%.2f%%); optimizer state %d bytes.',
               config.peft.method, report['trainable_params'], report['total_params'],
               100 * report['trainable_params'] / report['total_params'],
               report['optimizer_state_bytes'])

  inputs = steps.make_inputs(model, config)
  axis = strategy.axis_name
  train_step = strategy.compile_train(
      steps.make_train_step(adapted.module, inputs, task, tx, axis))
  eval_step = strategy.compile_eval(steps.make_eval_step(adapted.module, inputs, task, axis))
  state = strategy.replicate(state)
  frozen = strategy.replicate(frozen)
  lr_schedule = optim.schedule(config, config.learning_rate)

  writer = workdir_lib.MetricWriter(workdir, start_step)
  batches = data.train_batches(train_split, batch_size=config.batch_size,
                               seed=config.seed, start_step=start_step,
                               transform=train_transform,
                               worker_count=config.worker_count)
  progress = _Progress(config.total_steps, start_step)
  pending, eval_metrics = [], {}
  timer = _StepTimer()
  for step in range(start_step + 1, config.total_steps + 1):
    state, metrics = train_step(state, frozen, strategy.shard(next(batches)))
    if step == start_step + 1:  # The first step compiles: time the rest.
      timer.start(state)
    pending.append(metrics)
    logged = None
    if step % config.log_every == 0 or step == config.total_steps:
      logged = tasks.finalize(_host_sum(pending, strategy), prefix='train_')
      logged['learning_rate'] = float(lr_schedule(step - 1))
      writer.write(step, 'train', logged)
      pending = []
    if step % config.eval_every == 0 or step == config.total_steps:
      with timer.paused(state):
        eval_metrics = evaluate(eval_step, state, frozen, eval_split, config,
                                strategy, eval_transform)
      writer.write(step, 'eval', eval_metrics)
      logging.info('step %d: %s', step, eval_metrics)
    if step % config.checkpoint_every == 0 or step == config.total_steps:
      with timer.paused(state):
        ckpt.save(step, strategy.unreplicate(state))
    progress.update(step, logged)
  examples_per_sec = timer.rate(state, config.batch_size * (config.total_steps - start_step - 1))
  progress.close()
  if not eval_metrics:  # Resumed exactly at the end: evaluate what was restored.
    eval_metrics = evaluate(eval_step, state, frozen, eval_split, config,
                            strategy, eval_transform)
  ckpt.close()
  writer.close()

  results = {'final': eval_metrics, 'steps': config.total_steps,
             'method': config.peft.method,
             'trainable_percent': 100 * report['trainable_params'] / report['total_params'],
             'train_examples_per_sec': examples_per_sec,
             'wall_s': time.time() - start_time, **report}
  workdir_lib.write_results(workdir, results)
  return results

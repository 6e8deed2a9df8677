"""One device and eight give the same training, under pmap and under jit."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finetune_jax import optim
from finetune_jax import parallel
from finetune_jax import peft
from finetune_jax import steps
from finetune_jax import tasks
from finetune_jax.peft import paths
from test_freezing import batch, make_config
from toy import toy_model


def train_with(strategy, num_steps=4):
  config = make_config('partial', num_frozen_blocks=1)
  model = toy_model()
  adapted = peft.adapt(model, config.peft)
  trainable, frozen = paths.split(adapted.params, adapted.trainable)
  tx = optim.make_optimizer(config, trainable, model.head)
  state = {'step': jnp.int32(0), 'rng': jax.random.PRNGKey(0),
           'trainable': trainable, 'opt_state': tx.init(trainable)}
  task = tasks.ImageClassification(3)
  inputs = lambda b: (model.preprocess(b['image']),)
  step = strategy.compile_train(steps.make_train_step(
      adapted.module, inputs, task, tx, strategy.axis_name))
  evaluate = strategy.compile_eval(steps.make_eval_step(adapted.module, inputs, task))
  state, frozen = strategy.place(state), strategy.place(frozen)
  for i in range(num_steps):
    state, metrics = step(state, frozen, strategy.shard(batch(i, n=16)))
  eval_batch = dict(batch(99, n=16), mask=np.arange(16) < 13)
  sums = evaluate(state['trainable'], frozen, strategy.shard(eval_batch))
  state = strategy.to_host(state)
  if isinstance(strategy, parallel.Pmap):  # each device's own sums: added up on the host
    sums = jax.tree.map(lambda x: x.sum(0), sums)
  return state, jax.device_get(sums)


def test_eight_devices_are_forced():
  assert jax.local_device_count() == 8


@pytest.mark.parametrize('make', [
    lambda: parallel.Pmap(jax.local_devices()),
    lambda: parallel.Jit(jax.devices()),
    lambda: parallel.Jit(jax.devices()[:1]),
], ids=['pmap8', 'jit8', 'jit1'])
def test_same_results_as_one_device(make):
  reference, ref_sums = train_with(parallel.Pmap(jax.local_devices()[:1]))
  state, sums = train_with(make())
  assert int(state['step']) == 4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               state['trainable'], reference['trainable'])
  assert sums['count'] == ref_sums['count'] == 13
  np.testing.assert_allclose(sums['loss'], ref_sums['loss'], rtol=1e-5)
  np.testing.assert_allclose(sums['accuracy'], ref_sums['accuracy'])


@pytest.mark.slow
def test_runs_with_more_devices_than_cores_and_many_evals_finish(tmp_path):
  """The eval step has no collective (issue: an eval all-reduce under 4 forced devices on 2
  cores waited forever for one device, then aborted in 2 runs of 5). Then the same with
  gradient accumulation under fsdp, whose every step gathers sharded params."""
  root = os.path.join(os.path.dirname(__file__), '..')
  modes = [(), ('--config.grad_accum_steps=2', '--config.parallel=fsdp')]
  for attempt, mode in enumerate(modes):
    proc = subprocess.run(
        [sys.executable, '-m', 'finetune_jax.main', '--config=configs/default.py:smoke',
         f'--workdir={tmp_path / str(attempt)}', '--config.pretrained=efficientnet-lite-tiny',
         '--config.dataset=mnist5k', '--config.image_size=32', '--config.batch_size=32',
         '--config.eval_batch_size=64', '--config.eval_every=1', '--config.peft.num_frozen_blocks=2',
         *mode],
        capture_output=True, text=True, cwd=root, timeout=600,
        env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'JAX devices: [' in proc.stderr and 'id=7' in proc.stderr
    events = (tmp_path / str(attempt) / 'metrics.jsonl').read_text().count('"split": "eval"')
    assert events == 6  # an eval after every step, 16 batches each

"""The `nonfinite` policy: a NaN never reaches a checkpoint; stop, or skip the update."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from finetune_jax import errors
from finetune_jax import nonfinite
from finetune_jax import optim
from finetune_jax import parallel
from finetune_jax import peft
from finetune_jax import pipelines
from finetune_jax import steps
from finetune_jax import tasks
from finetune_jax import train
from finetune_jax.peft import paths
from test_freezing import batch, make_config
from test_main import tiny_config
from toy import toy_model


def _poisoned(b):
  """The batch as float images, one pixel of one example NaN (preprocess passes floats on)."""
  image = b['image'].astype(np.float32)
  image[5, 0, 0, 0] = np.nan  # an example of the third of eight devices
  return {**b, 'image': image}


def test_a_skipped_nan_batch_changes_nothing_under_pmap_and_names_the_first_bad_gradient():
  config = make_config('full')
  model = toy_model()
  adapted = peft.adapt(model, config.peft)
  trainable, frozen = paths.split(adapted.params, adapted.trainable)
  tx = optim.make_optimizer(config, trainable, model.head)
  strategy = parallel.Pmap(jax.local_devices())
  assert strategy.num_devices == 8
  step = strategy.compile_train(steps.make_train_step(
      adapted.module, lambda b: (model.preprocess(b['image']),), tasks.ImageClassification(3),
      tx, strategy.axis_name, skip_nonfinite=True))
  state = strategy.place({'step': jnp.int32(0), 'rng': jax.random.PRNGKey(0),
                          'trainable': trainable, 'opt_state': tx.init(trainable)})
  frozen = strategy.place(frozen)
  state, metrics = step(state, frozen, strategy.shard(_poisoned(batch(0, n=16))))
  assert metrics['nonfinite'].tolist() == [1.0] * 8  # every device saw the summed gradient
  leaf = int(metrics['nonfinite_leaf'][0])
  names = nonfinite.leaf_names(trainable)
  # ReLU's gradient is a select, so the biases' gradients stay finite; a kernel's multiplies
  # by the NaN activations. The first in leaf order: block_0's.
  assert names[leaf] == 'block_0/kernel'
  after = strategy.to_host(state)
  assert int(after['step']) == 1
  before = {'trainable': trainable, 'opt_state': tx.init(trainable)}
  jax.tree.map(np.testing.assert_array_equal,
               {'trainable': after['trainable'], 'opt_state': after['opt_state']}, before)
  # A clean batch then trains as usual.
  state, metrics = step(state, frozen, strategy.shard(batch(1, n=16)))
  assert metrics['nonfinite'].tolist() == [0.0] * 8 and int(metrics['nonfinite_leaf'][0]) == -1
  moved = strategy.to_host(state)['trainable']
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(moved), jax.tree.leaves(trainable)))


def _watch(policy, max_skips=3):
  config = ml_collections.ConfigDict({'nonfinite': policy, 'nonfinite_max_skips': max_skips})
  return nonfinite.NonFiniteWatch(config, {'body': {'w': 0}, 'head': {'b': 0, 'w': 0}})


def _flags(bad, leaf=-1):
  return {'nonfinite': np.float32(bad), 'nonfinite_leaf': np.int32(leaf), 'loss': 1.0}


def test_the_watch_applies_each_policy_when_it_reads_the_flags():
  watch = _watch('stop')
  watch.add(1, _flags(0))
  metrics = _flags(1, leaf=2)
  watch.add(2, metrics)
  assert metrics == {'loss': 1.0}  # the flags are taken out of the training metrics
  with pytest.raises(errors.NonFiniteError, match='Step 2: the gradient of head/w') as e:
    watch.check(parallel.Jit(jax.devices()[:1]))
  assert (e.value.step, e.value.param) == (2, 'head/w')

  watch = _watch('skip', max_skips=3)
  for step, bad in enumerate([1, 1, 0, 1, 1], start=1):
    watch.add(step, _flags(bad, leaf=0 if bad else -1))
  assert watch.check(None) == 4 and watch.skipped == 4
  watch.add(6, _flags(1))  # the third in a row (4, 5, 6): the loss alone this time
  with pytest.raises(errors.NonFiniteError, match='3 steps in a row .* the loss'):
    watch.check(None)


def test_stop_keeps_the_last_good_checkpoint_under_pmap(tmp_path):
  """An LR spike: step 1's update leaves the params huge, step 2's loss is not finite."""
  config = tiny_config(learning_rate=1e30, head_learning_rate=1e30, warmup_steps=0,
                       grad_clip_norm=0.0, checkpoint_every=1, total_steps=6)
  with pytest.raises(errors.NonFiniteError, match=r'Step 2: .* not finite') as e:
    train.train_and_evaluate(config, str(tmp_path))
  assert e.value.step == 2
  assert os.listdir(tmp_path / 'checkpoints') == ['1']  # and no checkpoint after it
  assert not (tmp_path / 'results.json').exists()


def test_skip_counts_a_poisoned_batch_and_trains_on(tmp_path, monkeypatch):
  make = pipelines.make

  def poison_step_3(*args, **kwargs):
    pipeline = make(*args, **kwargs)

    def train_batches(start_step):
      for step, b in enumerate(pipeline.train(start_step), start=start_step + 1):
        yield _poisoned(b) if step == 3 else b
    return dataclasses.replace(pipeline, train=train_batches)

  monkeypatch.setattr(pipelines, 'make', poison_step_3)
  # The poison is in the image pipeline: no cached features (warm from another test) instead.
  config = tiny_config(nonfinite='skip', log_every=1, cache_frozen_features='off')
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results['nonfinite_skips'] == 1 and np.isfinite(results['final']['eval_loss'])
  logged = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  skips = {e['step']: e['train_nonfinite_skips'] for e in logged if e['split'] == 'train'}
  assert skips == {1: 0, 2: 0, 3: 1, 4: 0, 5: 0, 6: 0}

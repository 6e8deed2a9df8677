"""grad_accum_steps = k: k micro-batches in one compiled step give the whole batch's update."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finetune_jax import base_config
from finetune_jax import models
from finetune_jax import optim
from finetune_jax import parallel
from finetune_jax import peft
from finetune_jax import steps
from finetune_jax import tasks
from finetune_jax.peft import paths
from test_freezing import batch as image_batch
from test_freezing import make_config
from toy import toy_model


def _lm_batch(seed, n=64, length=16):
  """Causal-LM rows whose loss masks keep different numbers of tokens, so the micro-batches
  count different numbers of targets (a mean of micro-batch means would be wrong)."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, length + 1, n)
  loss_mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  return {'input_ids': rng.integers(0, 257, (n, length)).astype(np.int32),
          'attention_mask': np.ones((n, length), np.int32), 'loss_mask': loss_mask}


def _lora_config():
  c = base_config.get_config()
  c.peft.method, c.warmup_steps, c.learning_rate = 'lora', 0, 1e-2
  return c


def _setups():
  toy = toy_model()
  llama = models.load_pretrained('llama-tiny')
  return {
      'toy_full': (toy, make_config('full'), tasks.ImageClassification(3),
                   lambda b: (toy.preprocess(b['image']),), lambda i: image_batch(i, n=64)),
      'llama_lora': (llama, _lora_config(), tasks.CausalLM(),
                     lambda b: (b['input_ids'], b['attention_mask']), _lm_batch),
  }


def _train(name, strategy, accum, num_steps=3):
  """(start, end) trainable params on the host, and each step's metric sums."""
  model, config, task, inputs, make_batch = _setups()[name]  # fresh: jit donates the state
  adapted = peft.adapt(model, config.peft)
  trainable, frozen = paths.split(adapted.params, adapted.trainable)
  start = jax.device_get(trainable)
  tx = optim.make_optimizer(config, trainable, model.head)
  state = {'step': jnp.int32(0), 'rng': jax.random.PRNGKey(0),
           'trainable': trainable, 'opt_state': tx.init(trainable)}
  step = strategy.compile_train(steps.make_train_step(
      adapted.module, inputs, task, tx, strategy.axis_name, grad_accum_steps=accum))
  state, frozen = strategy.place(state), strategy.place(frozen)
  sums = []
  for i in range(num_steps):
    state, metrics = step(state, frozen, strategy.shard(make_batch(i)))
    sums.append(jax.device_get(metrics))
  if isinstance(strategy, parallel.Pmap):  # psum-ed: every device holds the total
    sums = [jax.tree.map(lambda x: x[0], s) for s in sums]
  return start, strategy.to_host(state)['trainable'], sums


def assert_same_training(run, reference):
  """(trainable params, per-step metric sums) of two runs agree to float tolerance."""
  (params, sums), (ref_params, ref_sums) = run, reference
  for path, value in paths.flatten(ref_params).items():
    np.testing.assert_allclose(paths.flatten(params)[path], value, rtol=2e-5, atol=2e-6,
                               err_msg=path)
  for a, b in zip(sums, ref_sums):
    assert a['count'] == b['count']
    np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-5)


@pytest.mark.parametrize('name,make', [
    ('toy_full', lambda: parallel.Pmap(jax.local_devices())),
    ('llama_lora', lambda: parallel.Pmap(jax.local_devices())),
    ('toy_full', lambda: parallel.Jit(jax.devices())),
], ids=['toy-pmap8', 'llama-lora-pmap8', 'toy-jit8'])
def test_four_micro_batches_equal_the_whole_batch(name, make):
  start, whole, whole_sums = _train(name, make(), accum=1)
  _, accumulated, accum_sums = _train(name, make(), accum=4)
  assert_same_training((accumulated, accum_sums), (whole, whole_sums))
  # The run moved: equal results are not two copies of the starting params.
  start = paths.flatten(start)
  assert any(not np.allclose(v, start[p]) for p, v in paths.flatten(accumulated).items())


def test_micro_batches_are_strided():
  x = np.arange(8)
  np.testing.assert_array_equal(steps.micro_batches({'x': x}, 4)['x'],
                                [[0, 4], [1, 5], [2, 6], [3, 7]])


def test_a_run_with_accumulation_and_remat_trains_end_to_end(tmp_path):
  """The trainer's path: micro-batches over 8 devices through remat'd blocks."""
  from test_main import tiny_config
  from finetune_jax import train
  results = train.train_and_evaluate(
      tiny_config(grad_accum_steps=2, remat='block', total_steps=2, eval_every=2,
                  checkpoint_every=2, batch_size=32), str(tmp_path))
  assert results['steps'] == 2 and 0.0 <= results['final']['eval_accuracy'] <= 1.0
  assert 'remat=block' in results['feature_cache']['why']

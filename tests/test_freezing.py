"""Freezing invariants for every method, on a tiny model."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from finetune_jax import optim
from finetune_jax import peft
from finetune_jax import steps
from finetune_jax import tasks
from finetune_jax.peft import paths
from toy import toy_model


def make_config(method='full', **peft_kw):
  c = ml_collections.ConfigDict({
      'total_steps': 10, 'warmup_steps': 0, 'schedule': 'constant',
      'learning_rate': 1e-2, 'head_learning_rate': None, 'grad_clip_norm': 0.0,
      'optimizer': {'name': 'adamw', 'b1': 0.9, 'b2': 0.999, 'eps': 1e-8,
                    'weight_decay': 1e-4, 'momentum': 0.9, 'nesterov': True},
      'peft': {'method': method, 'num_frozen_blocks': 0, 'freeze': ()}})
  c.peft.update(peft_kw)
  return c


def batch(seed=0, n=8):
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 255, (n, 4, 4, 1), dtype=np.uint8),
          'label': rng.integers(0, 3, (n,)).astype(np.int32)}


def run_steps(config, num_steps=3):
  model = toy_model()
  adapted = peft.adapt(model, config.peft)
  trainable, frozen = paths.split(adapted.params, adapted.trainable)
  tx = optim.make_optimizer(config, trainable, model.head)
  state = {'step': jnp.int32(0), 'rng': jax.random.PRNGKey(0),
           'trainable': trainable, 'opt_state': tx.init(trainable)}
  step = jax.jit(steps.make_train_step(
      adapted.module, lambda b: (model.preprocess(b['image']),),
      tasks.ImageClassification(3), tx, axis_name=None))
  for i in range(num_steps):
    state, _ = step(state, frozen, batch(i))
  return model, adapted, paths.join(state['trainable'], frozen), state


EXPECTED_TRAINABLE = {
    'full': lambda p: not p.endswith(('/mean', '/var')),
    'linear_probe': lambda p: p.startswith('head/'),
    'bitfit': lambda p: p.startswith('head/') or p.endswith('/bias'),
}


@pytest.mark.parametrize('method', sorted(EXPECTED_TRAINABLE))
def test_only_the_method_params_change(method):
  model, adapted, after, _ = run_steps(make_config(method))
  before = paths.flatten(model.params)
  after = paths.flatten(after)
  expected = {p for p in before if EXPECTED_TRAINABLE[method](p)}
  assert adapted.trainable == expected
  for path, value in before.items():
    if path in expected:
      assert not np.array_equal(after[path], value), f'{path} did not train'
    else:
      np.testing.assert_array_equal(after[path], value, err_msg=path)


def test_partial_freezes_first_blocks_and_regexes():
  config = make_config('partial', num_frozen_blocks=2, freeze=(r'block_1/bias',))
  model, adapted, after, _ = run_steps(config)
  before, after = paths.flatten(model.params), paths.flatten(after)
  assert adapted.trainable == {'block_0/kernel', 'block_0/bias', 'block_1/kernel',
                               'head/kernel', 'head/bias'} - {'block_1/bias'}
  for path in before:
    if path not in adapted.trainable:
      np.testing.assert_array_equal(after[path], before[path], err_msg=path)


@pytest.mark.parametrize('method', ['full', 'linear_probe', 'bitfit', 'partial'])
def test_no_optimizer_state_for_frozen_leaves(method):
  config = make_config(method, num_frozen_blocks=3)
  _, adapted, _, state = run_steps(config, num_steps=1)
  trainable_shapes = sorted(
      v.shape for v in paths.flatten(state['trainable']).values())
  # AdamW keeps mu and nu per trainable leaf, nothing else of any size.
  state_shapes = sorted(x.shape for x in jax.tree.leaves(state['opt_state']) if x.ndim)
  assert state_shapes == sorted(trainable_shapes * 2)
  assert optim.state_bytes(state['opt_state']) < 3 * 4 * paths.count(state['trainable'])


def test_weight_decay_touches_kernels_only():
  config = make_config('full')
  config.optimizer.weight_decay = 0.5
  trainable = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}}
  tx = optim.make_optimizer(config, trainable, head='head')
  zeros = jax.tree.map(jnp.zeros_like, trainable)
  updates, _ = tx.update(zeros, tx.init(trainable), trainable)
  np.testing.assert_allclose(updates['dense']['kernel'], -1e-2 * 0.5 * np.ones((2, 2)))
  np.testing.assert_array_equal(updates['dense']['bias'], np.zeros(2))


def test_head_gets_its_own_learning_rate():
  config = make_config('full', )
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.0
  config.optimizer.weight_decay = 0.0
  config.head_learning_rate = 1.0
  trainable = {'head': {'bias': jnp.zeros(2)}, 'body': {'bias': jnp.zeros(2)}}
  tx = optim.make_optimizer(config, trainable, head='head')
  grads = jax.tree.map(jnp.ones_like, trainable)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  np.testing.assert_allclose(updates['head']['bias'], [-1.0, -1.0])
  np.testing.assert_allclose(updates['body']['bias'], [-1e-2, -1e-2])


def test_params_a_method_added_get_the_peft_learning_rate():
  """LoRA factors, prompts, ...: the head's rate by default, peft.learning_rate when set."""
  config = make_config('full')
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.0
  config.optimizer.weight_decay = 0.0
  config.head_learning_rate = 1.0
  trainable = {'head': {'bias': jnp.zeros(2)}, 'body': {'bias': jnp.zeros(2),
                                                        'lora_a': jnp.zeros(2)}}
  grads = jax.tree.map(jnp.ones_like, trainable)

  def updates(added):
    tx = optim.make_optimizer(config, trainable, head='head', added=added)
    return tx.update(grads, tx.init(trainable), trainable)[0]

  assert updates(frozenset())['body']['lora_a'][0] == pytest.approx(-1e-2)
  assert updates({'body/lora_a'})['body']['lora_a'][0] == pytest.approx(-1.0)
  config.peft.learning_rate = 0.1
  moved = updates({'body/lora_a'})
  assert moved['body']['lora_a'][0] == pytest.approx(-0.1)
  assert moved['body']['bias'][0] == pytest.approx(-1e-2)
  assert moved['head']['bias'][0] == pytest.approx(-1.0)


def test_regex_matching_nothing_lists_nearest_paths():
  config = make_config('partial', freeze=(r'^blok_0/',))
  with pytest.raises(ValueError, match=r"matches no parameter.*block_0/"):
    peft.adapt(toy_model(), config.peft)


def test_bad_method_and_block_count_are_named():
  with pytest.raises(ValueError, match='Unknown peft.method .*known methods'):
    peft.adapt(toy_model(), make_config('lorax').peft)
  with pytest.raises(ValueError, match='num_frozen_blocks=9 is out of range'):
    peft.adapt(toy_model(), make_config('partial', num_frozen_blocks=9).peft)


def test_schedule_warms_up_then_decays():
  config = make_config()
  config.update({'warmup_steps': 4, 'total_steps': 14, 'schedule': 'cosine'})
  lr = optim.schedule(config, 1.0)
  assert float(lr(0)) == 0.0
  assert float(lr(2)) == pytest.approx(0.5)
  assert float(lr(4)) == pytest.approx(1.0)
  assert float(lr(9)) == pytest.approx(0.5)
  assert float(lr(14)) == pytest.approx(0.0, abs=1e-7)


def test_partial_freezes_top_level_arrays_too():
  """A block may be a single array, like ViT's 'cls' or 'pos_embedding'."""
  model = toy_model()
  model.params = {**model.params, 'pos': jnp.zeros((4, 16))}
  model.blocks = ('pos',) + model.blocks
  adapted = peft.adapt(model, make_config('partial', num_frozen_blocks=2).peft)
  assert 'pos' not in adapted.trainable
  assert not any(p.startswith('stem/') for p in adapted.trainable)
  assert 'block_0/kernel' in adapted.trainable


def test_decay_mask_is_kernels_only():
  params = {'pos': jnp.zeros((4, 16)), 'dense': {'kernel': jnp.zeros((2, 2)),
                                                 'bias': jnp.zeros(2)}}
  assert optim.decay_mask(params) == {'pos': False, 'dense': {'kernel': True, 'bias': False}}

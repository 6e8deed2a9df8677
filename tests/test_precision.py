"""Mixed precision: bfloat16 compute, float32 params, gradients and optimizer state."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finetune_jax import base_config
from finetune_jax import config_checks
from finetune_jax import models
from finetune_jax import peft
from finetune_jax import precision
from finetune_jax import steps
from finetune_jax import tasks
from finetune_jax import train


def test_compute_dtype_per_platform():
  assert precision.compute_dtype('float32') == jnp.float32
  assert precision.compute_dtype('bfloat16') == jnp.bfloat16
  assert precision.compute_dtype('auto', 'cpu') == jnp.float32
  assert precision.compute_dtype('auto', 'gpu') == jnp.bfloat16
  assert precision.compute_dtype('auto', 'tpu') == jnp.bfloat16
  with pytest.raises(ValueError, match='Unknown precision'):
    precision.compute_dtype('float16')


def test_an_unknown_precision_is_a_config_error():
  c = base_config.get_config()
  c.pretrained, c.dataset, c.num_classes, c.precision = 'vit-tiny', 'mnist5k', 3, 'fp8'
  with pytest.raises(ValueError, match="precision='fp8' is unknown"):
    config_checks.validate(c, 1)


def _step(method, dtype):
  c = base_config.get_config()
  c.peft.method = method
  c.optimizer.name = 'sgd'  # Updates proportional to the gradients, for comparing them.
  c.warmup_steps, c.schedule = 0, 'constant'
  model = models.load_pretrained('vit-tiny', num_classes=3)
  adapted = peft.adapt(model, c.peft)
  state, frozen, tx = train.initial_state(c, model, adapted)
  step = jax.jit(steps.make_train_step(adapted.module, lambda b: (b['image'],),
                                       tasks.ImageClassification(3), tx, None, dtype))
  rng = np.random.default_rng(0)
  batch = {'image': rng.standard_normal((4, 32, 32, 3)).astype(np.float32),
           'label': np.array([0, 1, 2, 1], np.int32)}
  # The program as JAX gives it to XLA: XLA:CPU may then widen bf16 matmuls to f32.
  hlo = step.lower(state, frozen, batch).as_text()
  new_state, metrics = step(state, frozen, batch)
  return state, new_state, metrics, hlo


@pytest.mark.parametrize('method', ['full', 'lora'])
def test_bfloat16_computes_in_bf16_and_keeps_the_state_in_float32(method):
  before, after32, m32, hlo32 = _step(method, jnp.float32)
  _, after16, m16, hlo16 = _step(method, jnp.bfloat16)
  # The matmuls run in bf16; nothing in the float32 step does.
  assert 'bf16' not in hlo32
  assert any('bf16' in line and 'dot_general' in line for line in hlo16.splitlines())
  for tree in ('trainable', 'opt_state'):
    for a, b in zip(jax.tree.leaves(after16[tree]), jax.tree.leaves(before[tree])):
      assert a.dtype == b.dtype, tree
  # The same loss and gradients (SGD's updates) to bf16 accuracy (8 bits of mantissa).
  np.testing.assert_allclose(float(m16['loss']), float(m32['loss']), rtol=2e-2)
  moved32 = jax.tree.leaves(jax.tree.map(lambda a, b: a - b, after32['trainable'],
                                         before['trainable']))
  moved16 = jax.tree.leaves(jax.tree.map(lambda a, b: a - b, after16['trainable'],
                                         before['trainable']))
  cosine = sum(float(jnp.vdot(a, b)) for a, b in zip(moved16, moved32)) / np.sqrt(
      sum(float(jnp.vdot(a, a)) for a in moved16) * sum(float(jnp.vdot(b, b)) for b in moved32))
  assert cosine > 0.99

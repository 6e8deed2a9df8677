"""What the compiled train step does not do: no wasted work, checked in XLA's own program.

FLOPs come from the compiled program's `cost_analysis`; the dropout check reads
the program JAX lowers (threefry is how `jax.random` draws bits).
"""
import jax
import numpy as np
import pytest

from finetune_jax import base_config
from finetune_jax import models
from finetune_jax import peft
from finetune_jax import steps
from finetune_jax import tasks
from finetune_jax import train


def _programs(alias, method, **peft_fields):
  """(lowered train step, compiled eval step) of a tiny zoo model under `method`."""
  c = base_config.get_config()
  c.peft.method = method
  c.peft.update(peft_fields)
  decoder = alias.startswith(('gpt2', 'llama'))
  model = models.load_pretrained(alias, num_classes=None if decoder else 3)
  adapted = peft.adapt(model, c.peft)
  state, frozen, tx = train.initial_state(c, model, adapted)
  rng = np.random.default_rng(0)
  if decoder:
    batch = {'input_ids': rng.integers(0, 200, (4, 16)).astype(np.int32),
             'attention_mask': np.ones((4, 16), np.int32),
             'loss_mask': np.ones((4, 16), np.int32)}
    inputs, task = lambda b: (b['input_ids'], b['attention_mask']), tasks.CausalLM()
  else:
    batch = {'image': rng.standard_normal((4, 32, 32, 3)).astype(np.float32),
             'label': np.array([0, 1, 2, 1], np.int32)}
    inputs, task = lambda b: (b['image'],), tasks.ImageClassification(3)
  train_step = jax.jit(steps.make_train_step(adapted.module, inputs, task, tx, None))
  eval_step = jax.jit(steps.make_eval_step(adapted.module, inputs, task))
  return (train_step.lower(state, frozen, batch),
          eval_step.lower(state['trainable'], frozen, batch).compile())


def _flops(compiled) -> float:
  return compiled.cost_analysis()['flops']


def test_frozen_layers_get_no_backward_pass():
  forward = _flops(_programs('vit-tiny', 'full')[1])
  full = _flops(_programs('vit-tiny', 'full')[0].compile())
  half = _flops(_programs('vit-tiny', 'partial', num_frozen_blocks=2)[0].compile())
  probe = _flops(_programs('vit-tiny', 'linear_probe')[0].compile())
  # A backward pass costs about twice the forward: full ~3x, a probe ~1x (the
  # head's gradient alone), freezing the bottom in between.
  assert full > 2.5 * forward
  assert probe < 1.01 * forward
  assert 1.2 * forward < half < 0.9 * full


@pytest.mark.parametrize('alias,draws', [('vit-tiny', False), ('llama-tiny', False),
                                         ('gpt2-tiny', True)])
def test_dropout_draws_random_bits_only_where_its_rate_is_not_zero(alias, draws):
  # vit-tiny and Llama have no dropout; GPT-2's is 0.1 (the control).
  lowered = _programs(alias, 'full')[0]
  assert ('threefry' in lowered.as_text()) == draws

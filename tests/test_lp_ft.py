"""LP-FT: the head alone for probe_steps (no gradient for the body), then the body method."""
import os
import sys

import jax
import numpy as np
import pytest

from finetune_jax import base_config
from finetune_jax import checkpoint
from finetune_jax import config_checks
from finetune_jax import models
from finetune_jax import peft
from finetune_jax import steps
from finetune_jax import tasks
from finetune_jax import train
from finetune_jax.peft import paths

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'configs'))
import default  # noqa: E402  (configs/default.py)


def lp_ft_config(**peft_fields):
  c = default.get_config('smoke')
  c.unlock()
  c.update({'pretrained': 'efficientnet-lite-tiny', 'dataset': 'mnist5k', 'image_size': 32})
  c.peft.method = 'lp_ft'
  c.peft.lp_ft.update({'probe_steps': 3, **peft_fields})
  c.lock()
  return c


def test_the_probe_trains_the_head_alone_then_the_body_trains(tmp_path):
  config = lp_ft_config()
  steps.TRACES.clear()
  train.train_and_evaluate(config, str(tmp_path))
  assert steps.TRACES == {'probe_step': 1, 'train_step': 1, 'eval_step': 1}
  model, adapted = train.build_model(config)
  like, _, _ = train.initial_state(config, model, adapted)
  ckpt = checkpoint.Checkpointer(str(tmp_path), config.max_to_keep)
  after_probe, after_ft = (paths.flatten(ckpt.restore(like, s)['trainable']) for s in (3, 6))
  ckpt.close()
  start = paths.flatten(like['trainable'])
  head = {p for p in start if p.startswith(model.head + '/')}
  assert head and len(start) > len(head)
  for p in start:
    if p in head:
      assert not np.array_equal(after_probe[p], start[p]), p
    else:  # bit-identical through the probe: no update, not even weight decay
      np.testing.assert_array_equal(after_probe[p], start[p], err_msg=p)
  assert any(not np.array_equal(after_ft[p], start[p]) for p in start if p not in head)


def test_the_probe_step_takes_no_gradient_for_the_body():
  c = base_config.get_config()
  c.peft.method = 'lp_ft'
  model = models.load_pretrained('vit-tiny', num_classes=3)
  adapted = peft.adapt(model, c.peft)
  state, frozen, tx = train.initial_state(c, model, adapted)
  batch = {'image': np.zeros((4, 32, 32, 3), np.float32), 'label': np.zeros(4, np.int32)}
  task, inputs = tasks.ImageClassification(3), lambda b: (b['image'],)
  head = {p for p in paths.flatten(state['trainable']) if p.startswith(model.head + '/')}

  def flops(**kwargs):
    step = jax.jit(steps.make_train_step(adapted.module, inputs, task, tx, None, **kwargs))
    return step.lower(state, frozen, batch).compile().cost_analysis()['flops']

  forward = jax.jit(steps.make_eval_step(adapted.module, inputs, task)).lower(
      state['trainable'], frozen, batch).compile().cost_analysis()['flops']
  # Beyond the forward pass, the probe adds the head's gradient and an optimizer
  # update at rate 0 for the body (elementwise), nothing like a backward pass.
  probe, full = flops(only=head), flops()
  assert full > 2.5 * forward
  assert probe - forward < 0.1 * (full - forward)


@pytest.mark.parametrize('fields,total,message', [
    ({'probe_steps': 6}, 6, 'probe_steps=6 leaves no step of fine-tuning'),
])
def test_probe_steps_must_leave_fine_tuning(fields, total, message):
  config = lp_ft_config(**fields)
  with pytest.raises(ValueError, match=message):
    config_checks.validate(config, 1)


@pytest.mark.parametrize('body,message', [('linear_probe', 'name the method the fine-tuning'),
                                          ('nonsense', 'name the method the fine-tuning')])
def test_a_bad_body_is_refused(body, message):
  c = base_config.get_config()
  c.peft.method = 'lp_ft'
  c.peft.lp_ft.body = body
  with pytest.raises(ValueError, match=message):
    peft.adapt(models.load_pretrained('vit-tiny', num_classes=3), c.peft)


def test_lora_as_the_body_merges_and_exports_as_lora():
  c = base_config.get_config()
  c.peft.method = 'lp_ft'
  c.peft.lp_ft.body = 'lora'
  model = models.load_pretrained('vit-tiny', num_classes=3)
  adapted = peft.adapt(model, c.peft)
  assert adapted.method.name == 'lora' and adapted.method.probe_steps == 100
  assert any('lora' in p for p in adapted.trainable)
  merged = adapted.method.merged(adapted, adapted.params)
  assert set(paths.flatten(merged)) == set(paths.flatten(model.params))

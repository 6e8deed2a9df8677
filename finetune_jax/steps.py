"""The pure train and eval steps, as the trainer compiles them.

Frozen params are an argument of the step, never a closed-over constant
(that would bake them into the program as constants), and only the
trainable pytree is differentiated. With `axis_name` (pmap) the step
averages gradients and sums metrics over devices itself. `inputs` maps a
batch to the model's positional arguments (see pipelines.py).
"""
import collections

import jax
import optax

from finetune_jax.peft import paths

# How many times each step function was traced: one compile per run.
TRACES = collections.Counter()


def make_train_step(module, inputs, task, tx, axis_name):
  def train_step(state, frozen, batch):
    TRACES['train_step'] += 1
    rng = jax.random.fold_in(state['rng'], state['step'])
    if axis_name:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

    def loss_fn(trainable):
      params = paths.join(trainable, frozen)
      outputs = module.apply({'params': params}, *inputs(batch), train=True,
                             rngs={'dropout': rng})
      return task.loss_and_metrics(outputs, batch)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(state['trainable'])
    if axis_name:
      grads = jax.lax.pmean(grads, axis_name)
      metrics = jax.lax.psum(metrics, axis_name)
    updates, opt_state = tx.update(grads, state['opt_state'], state['trainable'])
    new_state = {'step': state['step'] + 1, 'rng': state['rng'],
                 'trainable': optax.apply_updates(state['trainable'], updates),
                 'opt_state': opt_state}
    return new_state, metrics
  return train_step


def make_eval_step(module, inputs, task, axis_name):
  def eval_step(trainable, frozen, batch):
    TRACES['eval_step'] += 1
    params = paths.join(trainable, frozen)
    outputs = module.apply({'params': params}, *inputs(batch), train=False)
    _, metrics = task.loss_and_metrics(outputs, batch)
    return jax.lax.psum(metrics, axis_name) if axis_name else metrics
  return eval_step

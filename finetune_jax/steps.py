"""The pure train and eval steps, as the trainer compiles them.

Frozen params are an argument of the step, never a closed-over constant
(that would bake them into the program as constants), and only the
trainable pytree is differentiated. `inputs` maps a batch to the model's
positional arguments (see pipelines.py). With a `compute_dtype` other than
float32 the model runs in it (precision.py); the loss, the gradients and the
update stay float32.

The step differentiates the loss *sum* and divides by the number of examples
(or LM targets) in the whole global batch: summed over `grad_accum_steps`
micro-batches and, under pmap (`axis_name`), over devices. So every layout
gives the update of the mean loss over the global batch, even where devices
or micro-batches hold different numbers of targets (padded LM tokens). With
`grad_accum_steps` = k the micro-batches run one after another in a
`lax.scan`, their gradients summed: the memory of a batch k times smaller.
"""
import collections

import jax
import jax.numpy as jnp
import optax

from finetune_jax import precision
from finetune_jax.peft import paths

# How many times each step function was traced: one compile per run.
TRACES = collections.Counter()


def _forward(module, inputs, compute_dtype):
  """(params, batch, **apply kwargs) -> the model's outputs, floats in float32."""
  def forward(params, batch, **kwargs):
    if compute_dtype == jnp.float32:
      return module.apply({'params': params}, *inputs(batch), **kwargs)
    params, args = precision.cast((params, inputs(batch)), compute_dtype)
    outputs = module.apply({'params': params}, *args, **kwargs)
    return precision.cast(outputs, jnp.float32)
  return forward


def micro_batches(batch, k: int):
  """[B, ...] leaves -> [k, B // k, ...]; micro-batch i holds rows i, i + k, i + 2k, ...

  Strided rather than contiguous: a batch sharded over devices in contiguous blocks (jit)
  then gives every micro-batch an equal share of each device's rows, with no data moved.
  """
  return jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1), batch)


def make_train_step(module, inputs, task, tx, axis_name, compute_dtype=jnp.float32,
                    only=None, grad_accum_steps: int = 1, skip_nonfinite: bool = False):
  """`only` (a set of trainable paths): differentiate those alone, the rest of the
  trainable tree held fixed with zero gradients (lp_ft's probe: the head).

  The step's metrics carry `nonfinite` (1.0 where the loss or a gradient was not finite)
  and `nonfinite_leaf` (the first such gradient's index in jax.tree.leaves order; -1: none).
  With `skip_nonfinite` such a step leaves params and optimizer state as they were.
  """
  forward = _forward(module, inputs, compute_dtype)

  def train_step(state, frozen, batch):
    TRACES['train_step' if only is None else 'probe_step'] += 1
    rng = jax.random.fold_in(state['rng'], state['step'])
    if axis_name:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    differentiated, held = state['trainable'], {}
    if only is not None:
      differentiated, held = paths.split(state['trainable'], only)

    def loss_sum(differentiated, batch, rng):
      outputs = forward(paths.join(differentiated, paths.join(held, frozen)), batch, train=True,
                        rngs={'dropout': rng})
      _, metrics = task.loss_and_metrics(outputs, batch)
      return metrics['loss'], metrics

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
    if grad_accum_steps == 1:
      (_, metrics), grad_sum = grad_fn(differentiated, batch, rng)
    else:
      grad_sum, metrics = _accumulate(grad_fn, differentiated, batch, rng, grad_accum_steps)
    if axis_name:
      grad_sum, metrics = jax.lax.psum((grad_sum, metrics), axis_name)
    count = jnp.maximum(metrics['count'], 1.0)
    grads = jax.tree.map(lambda g: g / count, grad_sum)
    if only is not None:  # the held params' rate is 0 in this phase: zeros change nothing
      grads = paths.join(grads, jax.tree.map(jnp.zeros_like, held))
    # Flags for the host's `nonfinite` policy (nonfinite.py), read with the metrics.
    leaf_finite = jnp.stack([jnp.isfinite(g).all() for g in jax.tree.leaves(grads)])
    finite = jnp.isfinite(metrics['loss']) & leaf_finite.all()

    def update(_):
      updates, opt_state = tx.update(grads, state['opt_state'], state['trainable'])
      return optax.apply_updates(state['trainable'], updates), opt_state

    if skip_nonfinite:  # no update at all; the step still advances
      # Every gradient is then held until all are known to be finite: the barrier that
      # grad_clip_norm's global norm already sets, but without clipping it costs memory.
      trainable, opt_state = jax.lax.cond(
          finite, update, lambda _: (state['trainable'], state['opt_state']), None)
    else:
      trainable, opt_state = update(None)
    metrics = {**metrics, 'nonfinite': 1.0 - finite.astype(jnp.float32),
               # Index into jax.tree.leaves(trainable) of the first non-finite gradient; -1: none.
               'nonfinite_leaf': jnp.where(leaf_finite.all(), -1, jnp.argmin(leaf_finite))}
    new_state = {'step': state['step'] + 1, 'rng': state['rng'],
                 'trainable': trainable, 'opt_state': opt_state}
    return new_state, metrics
  return train_step


def _accumulate(grad_fn, differentiated, batch, rng, k: int):
  """(gradient of the loss sum, metric sums) over k micro-batches of `batch`, in a scan."""
  def add_micro(grad_sum, xs):
    micro, i = xs
    (_, metrics), grads = grad_fn(differentiated, micro, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, grad_sum, grads), metrics

  zeros = jax.tree.map(jnp.zeros_like, differentiated)
  grad_sum, metrics = jax.lax.scan(add_micro, zeros, (micro_batches(batch, k), jnp.arange(k)))
  return grad_sum, jax.tree.map(lambda m: m.sum(0), metrics)


def make_eval_step(module, inputs, task, compute_dtype=jnp.float32):
  """Metric sums of one batch. Under pmap each device returns its own, and the host adds
  them up: an eval step has no collective, so a queue of them can never leave an
  all-reduce waiting for a device that the CPU client has not scheduled (more devices
  than cores)."""
  forward = _forward(module, inputs, compute_dtype)

  def eval_step(trainable, frozen, batch):
    TRACES['eval_step'] += 1
    outputs = forward(paths.join(trainable, frozen), batch, train=False)
    _, metrics = task.loss_and_metrics(outputs, batch)
    return metrics
  return eval_step

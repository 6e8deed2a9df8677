"""The optimizer: schedule, clipping, decay mask, per-group learning rates.

It only ever sees the trainable pytree: frozen params get no gradient and no
optimizer state because they are not in the tree it is initialised with.
Within that tree, `optax.partition` gives the new head, and the params a PEFT
method added, their own learning rates.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from finetune_jax.peft import paths


# The names `optimizer.name` and `schedule` take.
OPTIMIZERS = ('adamw', 'sgd')
SCHEDULES = ('cosine', 'linear', 'constant')


def schedule(config, peak: float, hold: int = 0) -> optax.Schedule:
  """Linear warmup to `peak`, then cosine or linear decay to zero by total_steps; with
  `hold`, all of it after `hold` steps at 0 (the body during lp_ft's probe)."""
  decay_steps = max(config.total_steps - hold - config.warmup_steps, 1)
  if config.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps)
  elif config.schedule == 'linear':
    decay = optax.linear_schedule(peak, 0.0, decay_steps)
  elif config.schedule == 'constant':
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f'Unknown schedule {config.schedule!r}; use cosine, '
                     'linear or constant.')
  warmup = optax.linear_schedule(0.0, peak, max(config.warmup_steps, 1))
  warm_then_decay = optax.join_schedules([warmup, decay], [config.warmup_steps])
  if not hold:
    return warm_then_decay
  return optax.join_schedules([optax.constant_schedule(0.0), warm_then_decay], [hold])


# Matrices that weight decay acts on: Dense/Conv kernels and LoRA factors.
DECAYED = ('kernel', 'lora_a', 'lora_b')


def decay_mask(params):
  """Weight decay on kernels (and LoRA's factors) only, as big_vision does.

  Biases, norm scales, class tokens, position embeddings and DoRA magnitudes
  are not decayed.
  """
  flat = paths.flatten(params)
  return paths.unflatten({k: k.rsplit('/', 1)[-1] in DECAYED for k in flat})


def _base_optimizer(config, lr: optax.Schedule) -> optax.GradientTransformation:
  o = config.optimizer
  if o.name == 'adamw':
    return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps,
                       weight_decay=o.weight_decay, mask=decay_mask)
  if o.name == 'sgd':
    return optax.chain(
        optax.add_decayed_weights(o.weight_decay, mask=decay_mask),
        optax.sgd(lr, momentum=o.momentum, nesterov=o.nesterov))
  raise ValueError(f'Unknown optimizer.name {o.name!r}; use adamw or sgd.')


def group_labels(trainable, head: str, added=frozenset()):
  """'head' for the new classifier's params, 'added' for params a PEFT method
  added (`added`: their paths), 'body' for the pretrained rest."""
  flat = paths.flatten(trainable)
  labels = {k: 'head' if k.startswith(head + '/') else 'added' if k in added else 'body'
            for k in flat}
  return paths.unflatten(labels)


def make_optimizer(config, trainable, head: str, added=frozenset(),
                   probe_steps: int = 0) -> optax.GradientTransformation:
  """AdamW or SGD over `trainable`: the head at `head_learning_rate`, the
  params a PEFT method added (paths `added`) at `peft.learning_rate`.

  Added params start from scratch like the head, so by default they share
  its rate. Their group exists only when they do, so the optimizer state of
  the methods that add nothing keeps its structure (checkpoints resume).
  With `probe_steps` (lp_ft), all but the head hold at rate 0 for that many steps.
  """
  head_lr = config.head_learning_rate or config.learning_rate
  groups = {
      'body': _base_optimizer(config, schedule(config, config.learning_rate, probe_steps)),
      'head': _base_optimizer(config, schedule(config, head_lr)),
  }
  added = frozenset(added) & paths.flatten(trainable).keys()
  if added:
    added_lr = config.peft.get('learning_rate') or head_lr
    groups['added'] = _base_optimizer(config, schedule(config, added_lr, probe_steps))
  # identity() when off keeps the state's structure, so a checkpoint resumes
  # whether or not clipping was changed in between.
  clip = (optax.clip_by_global_norm(config.grad_clip_norm) if config.grad_clip_norm
          else optax.identity())
  return optax.chain(clip, optax.partition(groups, group_labels(trainable, head, added)))


def state_bytes(tree) -> int:
  """Bytes of the arrays in `tree`, 4-bit values (a quantized base) at half a byte each."""
  def size(x):
    dtype = x.dtype
    bits = (jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer)
            else 8 * np.dtype(dtype).itemsize)
    return x.size * bits // 8
  return sum(size(x) for x in jax.tree.leaves(tree) if hasattr(x, 'dtype'))

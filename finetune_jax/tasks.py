"""Losses and metrics per task.

Metrics are returned as sums (with the example count under 'count') so that
they add up exactly across devices, steps and padded eval batches; `finalize`
turns them into means on the host.
"""
import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class ImageClassification:
  num_classes: int
  label_smoothing: float = 0.0
  input_key: str = 'image'

  def loss_and_metrics(self, outputs, batch):
    """Mean training loss over real examples, and metric sums."""
    logits = outputs['logits'].astype(jnp.float32)
    labels = batch['label']
    mask = batch.get('mask', jnp.ones(labels.shape, bool)).astype(jnp.float32)
    targets = optax.smooth_labels(
        jax.nn.one_hot(labels, self.num_classes), self.label_smoothing)
    losses = optax.softmax_cross_entropy(logits, targets)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    count = mask.sum()
    metrics = {'loss': (losses * mask).sum(), 'accuracy': (correct * mask).sum(),
               'count': count}
    return metrics['loss'] / jnp.maximum(count, 1.0), metrics


def finalize(sums: dict, prefix: str = '') -> dict:
  """Metric sums -> means, keyed `<prefix><name>`."""
  count = max(float(sums['count']), 1.0)
  return {prefix + k: float(v) / count for k, v in sums.items() if k != 'count'}


TASKS = {'image_classification': ImageClassification}


def make_task(config):
  if config.task not in TASKS:
    raise ValueError(f'Unknown task {config.task!r}; known: {sorted(TASKS)}.')
  return ImageClassification(num_classes=config.num_classes,
                             label_smoothing=config.label_smoothing)

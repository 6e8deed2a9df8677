"""Losses and metrics per task.

Metrics are returned as sums (with the count they average over under
'count') so that they add up exactly across devices, steps and padded eval
batches; each task's `finalize` turns them into means on the host.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax


def finalize(sums: dict, prefix: str = '') -> dict:
  """Metric sums -> means, keyed `<prefix><name>`."""
  count = max(float(sums['count']), 1.0)
  return {prefix + k: float(v) / count for k, v in sums.items() if k != 'count'}


def _example_mask(batch, shape):
  return batch.get('mask', jnp.ones(shape, bool)).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ImageClassification:
  num_classes: int
  label_smoothing: float = 0.0

  def loss_and_metrics(self, outputs, batch):
    """Mean training loss over real examples, and metric sums."""
    logits = outputs['logits'].astype(jnp.float32)
    labels = batch['label']
    mask = _example_mask(batch, labels.shape)
    targets = optax.smooth_labels(
        jax.nn.one_hot(labels, self.num_classes), self.label_smoothing)
    losses = optax.softmax_cross_entropy(logits, targets)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    count = mask.sum()
    metrics = {'loss': (losses * mask).sum(), 'accuracy': (correct * mask).sum(),
               'count': count}
    return metrics['loss'] / jnp.maximum(count, 1.0), metrics

  def finalize(self, sums: dict, prefix: str = '') -> dict:
    return finalize(sums, prefix)


@dataclasses.dataclass(frozen=True)
class TextClassification(ImageClassification):
  """Classification of token sequences; adds macro-F1 to accuracy.

  Macro-F1 needs the confusion matrix, summed like the other metrics.
  """

  def loss_and_metrics(self, outputs, batch):
    loss, metrics = super().loss_and_metrics(outputs, batch)
    predicted = jax.nn.one_hot(jnp.argmax(outputs['logits'], -1), self.num_classes)
    actual = jax.nn.one_hot(batch['label'], self.num_classes)
    actual = actual * _example_mask(batch, batch['label'].shape)[:, None]
    metrics['confusion'] = actual.T @ predicted  # [true, predicted]
    return loss, metrics

  def finalize(self, sums: dict, prefix: str = '') -> dict:
    confusion = np.asarray(sums['confusion'], np.float64)
    out = finalize({k: v for k, v in sums.items() if k != 'confusion'}, prefix)
    out[prefix + 'macro_f1'] = macro_f1(confusion)
    return out


def macro_f1(confusion: np.ndarray) -> float:
  """Mean F1 over the classes that occur as labels or predictions (as sklearn)."""
  tp = np.diag(confusion)
  fp = confusion.sum(0) - tp
  fn = confusion.sum(1) - tp
  seen = (tp + fp + fn) > 0
  if not seen.any():
    return 0.0
  return float(np.mean(2 * tp[seen] / (2 * tp[seen] + fp[seen] + fn[seen])))


@dataclasses.dataclass(frozen=True)
class CausalLM:
  """Next-token prediction: the logits at t predict input_ids[t + 1].

  Only targets with loss_mask 1 count (padding and prompt tokens have 0);
  metrics are per target token, and perplexity is exp(mean loss).
  """

  def loss_and_metrics(self, outputs, batch):
    logits = outputs['logits'][:, :-1].astype(jnp.float32)
    targets = batch['input_ids'][:, 1:]
    weights = batch['loss_mask'][:, 1:].astype(jnp.float32)
    weights = weights * _example_mask(batch, targets.shape[:1])[:, None]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    count = weights.sum()
    metrics = {'loss': (losses * weights).sum(), 'accuracy': (correct * weights).sum(),
               'count': count}
    return metrics['loss'] / jnp.maximum(count, 1.0), metrics

  def finalize(self, sums: dict, prefix: str = '') -> dict:
    out = finalize(sums, prefix)
    out[prefix + 'perplexity'] = math.exp(min(out[prefix + 'loss'], 700.0))
    return out


def selection_metric(task: str) -> tuple[str, bool]:
  """(validation metric that keep_best selects on, whether higher is better)."""
  return ('val_loss', False) if task == 'causal_lm' else ('val_accuracy', True)


TASKS = ('image_classification', 'text_classification', 'causal_lm')
CLASSIFICATION = ('image_classification', 'text_classification')


def make_task(config):
  if config.task not in TASKS:
    raise ValueError(f'Unknown task {config.task!r}; known: {list(TASKS)}.')
  if config.task == 'causal_lm':
    return CausalLM()
  cls = TextClassification if config.task == 'text_classification' else ImageClassification
  return cls(num_classes=config.num_classes, label_smoothing=config.label_smoothing)

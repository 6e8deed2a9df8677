"""Loss and metric sums of the classification task."""
import jax.numpy as jnp
import numpy as np
import pytest

from finetune_jax import tasks


def test_label_smoothing_and_masked_sums():
  logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
  batch = {'label': jnp.array([0, 2, 2]), 'mask': jnp.array([True, True, False])}
  loss, sums = tasks.ImageClassification(3, label_smoothing=0.3).loss_and_metrics(
      {'logits': logits}, batch)
  log_p = np.log(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
  targets = np.full((3, 3), 0.1) + 0.7 * np.eye(3)[[0, 2, 2]]
  expected = -(targets * log_p).sum(-1)[:2]
  assert float(sums['count']) == 2
  assert float(sums['accuracy']) == 1  # the masked third example would be right too
  np.testing.assert_allclose(float(sums['loss']), expected.sum(), rtol=1e-6)
  np.testing.assert_allclose(float(loss), expected.mean(), rtol=1e-6)
  assert tasks.finalize(sums, 'eval_') == pytest.approx(
      {'eval_loss': expected.mean(), 'eval_accuracy': 0.5})

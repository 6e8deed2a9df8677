"""Loss and metric sums of the classification task."""
import jax
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


def test_macro_f1_matches_sklearn_and_ignores_padding():
  from sklearn import metrics
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, 64)
  logits = rng.standard_normal((64, 5)) + 2.0 * np.eye(5)[labels] * (rng.random(64) > 0.4)[:, None]
  mask = np.arange(64) < 50
  _, sums = tasks.TextClassification(5).loss_and_metrics(
      {'logits': jnp.asarray(logits)}, {'label': jnp.asarray(labels), 'mask': jnp.asarray(mask)})
  out = tasks.TextClassification(5).finalize(jax.device_get(sums), 'eval_')
  predicted = logits.argmax(-1)
  assert out['eval_macro_f1'] == pytest.approx(
      metrics.f1_score(labels[:50], predicted[:50], average='macro'), abs=1e-6)
  assert out['eval_accuracy'] == pytest.approx((predicted[:50] == labels[:50]).mean())
  assert 'eval_confusion' not in out


def test_causal_lm_counts_only_masked_targets():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
  ids = rng.integers(0, 7, (2, 5))
  loss_mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])  # a prompt; padding
  loss, sums = tasks.CausalLM().loss_and_metrics(
      {'logits': jnp.asarray(logits)},
      {'input_ids': jnp.asarray(ids), 'loss_mask': jnp.asarray(loss_mask)})
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = [-log_p[b, t - 1, ids[b, t]] for b in range(2) for t in range(1, 5) if loss_mask[b, t]]
  assert float(sums['count']) == len(nll) == 5
  np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)
  out = tasks.CausalLM().finalize(jax.device_get(sums), 'eval_')
  assert out['eval_perplexity'] == pytest.approx(np.exp(np.mean(nll)), rel=1e-5)

"""How far fine-tuning moved a model's features: linear CKA and cosine similarity.

The features are the head's input (the pooled representation a classifier
reads), computed on the first examples of the eval split by the model at its
start and at its end. Kumar et al. (2022) argue that fine-tuning distorts
pretrained features; these two numbers measure by how much.
"""
import jax
import jax.numpy as jnp
import numpy as np

from finetune_jax import feature_cache
from finetune_jax import precision


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
  """Linear centered kernel alignment (Kornblith et al. 2019) of [N, D1] and [N, D2]."""
  x = x - x.mean(0, keepdims=True)
  y = y - y.mean(0, keepdims=True)
  cross = np.linalg.norm(x.T @ y) ** 2
  return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def mean_cosine(x: np.ndarray, y: np.ndarray) -> float:
  """Mean over examples of the cosine similarity of their two feature vectors."""
  norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
  return float(np.mean(np.sum(x * y, axis=1) / np.maximum(norms, 1e-12)))


def head_features(module, head: str, params, batches, inputs, limit: int, dtype) -> np.ndarray:
  """[N, D] head inputs (float64) of the first `limit` real examples of `batches`."""
  compute = jax.jit(lambda p, b: feature_cache.bottom_output(
      module, head, precision.cast(p, dtype), precision.cast(inputs(b), dtype), train=False))
  out, seen = [], 0
  for batch in batches:
    real = batch['mask']
    features = np.asarray(compute(params, {k: v for k, v in batch.items() if k != 'mask'}),
                          np.float64)[real]
    out.append(features.reshape(len(features), -1))
    seen += len(features)
    if seen >= limit:
      break
  return np.concatenate(out)[:limit]


def feature_drift(module, head: str, before, after, batches_fn, inputs, limit: int,
                  dtype=jnp.float32) -> dict:
  """{'cka', 'cosine', 'examples'}: the head's input at `before` params against `after`."""
  start = head_features(module, head, before, batches_fn(), inputs, limit, dtype)
  end = head_features(module, head, after, batches_fn(), inputs, limit, dtype)
  return {'cka': linear_cka(start, end), 'cosine': mean_cosine(start, end),
          'examples': int(len(start))}

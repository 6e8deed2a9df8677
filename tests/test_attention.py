"""The shared attention: both of its paths against a NumPy reference.

Inference goes through `jax.nn.dot_product_attention`, training on CPU through
the hand-written einsums; each must be the same function, masked rows included.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finetune_jax.models import attention


def reference(q, k, v, mask):
  """softmax(q k^T / sqrt(d)) v per head in float64; rows that see no key give 0."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  batch, length, heads, dim = q.shape
  k = np.repeat(k, heads // k.shape[2], axis=2)
  v = np.repeat(v, heads // v.shape[2], axis=2)
  scores = np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(dim)
  mask = np.broadcast_to(np.asarray(mask), scores.shape)
  scores = np.where(mask, scores, -np.inf)
  top = np.max(scores, axis=-1, keepdims=True)
  weights = np.exp(scores - np.where(np.isfinite(top), top, 0.0))
  total = weights.sum(-1, keepdims=True)
  weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
  return np.einsum('bhts,bshd->bthd', weights, v)


def inputs(heads, kv_heads, seed=0, batch=3, length=7, dim=8):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (batch, length, heads, dim))
  k = jax.random.normal(kk, (batch, length, kv_heads, dim))
  v = jax.random.normal(kv, (batch, length, kv_heads, dim))
  # Example 0 is all real tokens, example 1 has 4, example 2 none (fully padded).
  padding = (jnp.arange(length)[None, :] < jnp.array([length, 4, 0] + [length] * (batch - 3))[:, None])
  mask = attention.combine(attention.padding_mask(padding, length),
                           attention.causal_mask(length, length))
  return q, k, v, mask


def training_path(q, k, v, mask):
  """The einsum path, taken where the call trains (here with dropout rate 0)."""
  return attention.dot_product_attention(q, k, v, mask, dropout_rate=0.0, deterministic=False)


@pytest.mark.parametrize('heads,kv_heads', [(4, 4), (4, 2), (4, 1)])
def test_both_paths_equal_the_reference_with_masked_rows(heads, kv_heads):
  q, k, v, mask = inputs(heads, kv_heads)
  want = reference(q, k, v, mask)
  assert np.all(want[2] == 0.0)  # the fully padded example
  for path in (attention.dot_product_attention, training_path):
    got = np.asarray(path(q, k, v, mask))
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    assert np.all(got[2] == 0.0) and np.all(np.isfinite(got))


def test_no_mask_and_the_gradients_of_both_paths_agree():
  q, k, v, mask = inputs(4, 2)
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v), reference(q, k, v, True),
                             atol=2e-6, rtol=1e-5)
  grads = [jax.grad(lambda q, k, v, f=f: jnp.sum(jnp.sin(f(q, k, v, mask))), argnums=(0, 1, 2))(q, k, v)
           for f in (attention.dot_product_attention, training_path)]
  for fused, einsum in zip(*grads):
    assert np.all(np.isfinite(fused))
    np.testing.assert_allclose(fused, einsum, atol=2e-6, rtol=1e-5)


def test_dropout_drops_weights_at_its_rate_and_keeps_the_mean():
  q, k, v, _ = inputs(4, 4, batch=64, length=16)
  ones = jnp.ones_like(v)  # with v = 1 every output is the sum of the kept, rescaled weights
  out = attention.dot_product_attention(q, k, ones, dropout_rate=0.25,
                                        dropout_rng=jax.random.PRNGKey(1), deterministic=False)
  again = attention.dot_product_attention(q, k, ones, dropout_rate=0.25,
                                          dropout_rng=jax.random.PRNGKey(1), deterministic=False)
  np.testing.assert_array_equal(out, again)
  assert abs(float(out.mean()) - 1.0) < 0.02
  assert float(jnp.std(out)) > 0.1  # the masks do vary

"""Attention, forward and forward + backward: the hand-written einsums against `jax.nn`.

  python experiments/bench_attention.py

`models.attention.dot_product_attention` has both paths: `jax.nn.dot_product_attention`
for inference (and for training off CPU), the einsums for training on CPU and for
dropout. This times each path on the shapes (batch, length, query heads,
key/value heads, head dim) of MiniLM's step, SmolLM2's (grouped heads) and
ViT-S's, with a padding mask: the median of 3 alternating rounds of 15 calls,
and the largest difference between the two outputs.
"""
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from finetune_jax.models import attention  # noqa: E402

SHAPES = {'MiniLM': (32, 128, 12, 12, 32), 'SmolLM2': (4, 256, 9, 3, 64),
          'ViT-S': (16, 197, 6, 6, 64)}


def times(fn, *args, calls=15):
  jax.block_until_ready(fn(*args))
  out = []
  for _ in range(calls):
    tick = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - tick)
  return out


def main():
  for name, (b, t, h, kv, d) in SHAPES.items():
    kq, kk, kv_ = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (b, t, h, d))
    k, v = jax.random.normal(kk, (b, t, kv, d)), jax.random.normal(kv_, (b, t, kv, d))
    mask = attention.padding_mask(jnp.arange(t)[None] < t - jnp.arange(b)[:, None], t)
    impls = {  # the mask is an argument, so XLA cannot fold it into the program
        'einsum': lambda q, k, v, m: attention.dot_product_attention(q, k, v, m, deterministic=False),
        'jax.nn': lambda q, k, v, m: attention.dot_product_attention(q, k, v, m, deterministic=True)}
    timed = {impl: {'forward': jax.jit(f),
                    'forward + backward': jax.jit(jax.grad(
                        lambda q, k, v, m, f=f: jnp.sum(f(q, k, v, m) ** 2), argnums=(0, 1, 2)))}
             for impl, f in impls.items()}
    samples = {(impl, kind): [] for impl in timed for kind in timed[impl]}
    for _ in range(3):
      for impl, fns in timed.items():
        for kind, fn in fns.items():
          samples[impl, kind] += times(fn, q, k, v, mask)
    for impl in timed:
      print(f'{name} {(b, t, h, kv, d)} {impl}: ' + ', '.join(
          f'{kind} {1e3 * statistics.median(samples[impl, kind]):.1f} ms' for kind in timed[impl]),
          flush=True)
    diff = jnp.abs(impls['einsum'](q, k, v, mask) - impls['jax.nn'](q, k, v, mask)).max()
    print(f'{name}: largest difference {float(diff):.2e}')


if __name__ == '__main__':
  main()

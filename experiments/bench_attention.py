"""Attention, forward and forward + backward: ours against `jax.nn.dot_product_attention`.

  python experiments/bench_attention.py

Shapes (batch, length, query heads, key/value heads, head dim) of MiniLM's
step, SmolLM2's (grouped heads) and ViT-S's; the median of 10 calls each, and
the largest difference between the two outputs.
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


def median_ms(fn, *args, calls=10):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(calls):
    tick = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - tick)
  return 1e3 * statistics.median(times)


def main():
  for name, (b, t, h, kv, d) in SHAPES.items():
    kq, kk, kv_ = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (b, t, h, d))
    k, v = jax.random.normal(kk, (b, t, kv, d)), jax.random.normal(kv_, (b, t, kv, d))
    mask = jnp.ones((b, 1, t, t), bool)
    impls = {'ours': lambda q, k, v: attention.dot_product_attention(q, k, v, mask),
             'jax.nn': lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)}
    for impl, f in impls.items():
      grad = jax.grad(lambda q, k, v, f=f: f(q, k, v).sum(), argnums=(0, 1, 2))
      print(f'{name} {(b, t, h, kv, d)} {impl}: forward {median_ms(jax.jit(f), q, k, v):.1f} ms, '
            f'forward + backward {median_ms(jax.jit(grad), q, k, v):.1f} ms', flush=True)
    diff = jnp.abs(impls['ours'](q, k, v) - impls['jax.nn'](q, k, v)).max()
    print(f'{name}: largest difference {float(diff):.2e}')


if __name__ == '__main__':
  main()

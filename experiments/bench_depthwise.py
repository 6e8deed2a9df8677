"""Depthwise conv as shifted multiply-adds vs XLA's grouped convolution.

XLA:CPU runs `conv_general_dilated(feature_group_count=C)` far slower than
PyTorch; the 'shift' implementation (sum over taps of strided slices times
per-channel weights) avoids it. This times EfficientNet-Lite0 with both:

  step: a training step that differentiates only the top half (blocks 8-15,
        top, head; stem and blocks 0-7 frozen and passed as an argument),
        softmax cross-entropy, SGD update, dropout on.
  eval: the forward pass only.

Run:  .venv/bin/python experiments/bench_depthwise.py [--torch]
Prints images/s (median over --steps timed calls, after one compile call).
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from finetune_jax.models import load_pretrained

TRAINABLE_FROM = 8  # blocks_8.. + top + head train, as in the partial recipe


def split_params(params, num_blocks):
  trainable_keys = {f'blocks_{i}' for i in range(TRAINABLE_FROM, num_blocks)}
  trainable_keys |= {'top', 'head'}
  trainable = {k: v for k, v in params.items() if k in trainable_keys}
  frozen = {k: v for k, v in params.items() if k not in trainable_keys}
  return trainable, frozen


def make_step(module):
  def loss_fn(trainable, frozen, images, labels, rng):
    out = module.apply({'params': {**frozen, **trainable}}, images, train=True,
                       rngs={'dropout': rng})
    return optax.softmax_cross_entropy_with_integer_labels(out['logits'], labels).mean()

  @jax.jit
  def step(trainable, frozen, images, labels, rng):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, images, labels, rng)
    trainable = jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, trainable, grads)
    return trainable, loss

  return step


def make_eval(module):
  return jax.jit(lambda params, images: module.apply({'params': params}, images)['logits'])


def images_per_second(fn, batch, steps):
  jax.block_until_ready(fn())  # compile + warm up
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return batch / statistics.median(times)


def bench_jax(impl, model, images, labels, steps):
  module = model.module.clone(depthwise_impl=impl)
  trainable, frozen = split_params(model.params, len(model.blocks) - 2)
  step, evaluate = make_step(module), make_eval(module)
  rng = jax.random.PRNGKey(0)
  batch = images.shape[0]
  t0 = time.perf_counter()
  step_ips = images_per_second(
      lambda: step(trainable, frozen, images, labels, rng), batch, steps)
  eval_ips = images_per_second(lambda: evaluate(model.params, images), batch, steps)
  return step_ips, eval_ips, time.perf_counter() - t0


def bench_torch(images, labels, steps):
  """The reference PyTorch model, same freezing, for scale."""
  import torch  # pylint: disable=g-import-not-at-top
  from efficientnet_lite_pytorch import EfficientNet  # pylint: disable=g-import-not-at-top
  model = EfficientNet.from_name('efficientnet-lite0', num_classes=10,
                                 image_size=images.shape[1])
  for name, p in model.named_parameters():
    idx = name.split('.')[1] if name.startswith('_blocks.') else None
    p.requires_grad = not (name.startswith(('_conv_stem', '_bn0')) or
                           (idx is not None and int(idx) < TRAINABLE_FROM))
  for module in model.modules():  # frozen BN statistics, like ours
    if isinstance(module, torch.nn.BatchNorm2d):
      module.eval()
  x = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(np.array(labels)).long()
  opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)

  def step():
    model._dropout.train()  # pylint: disable=protected-access
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()

  def evaluate():
    model.eval()
    with torch.no_grad():
      model(x)

  def ips(fn):
    fn()
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    return x.shape[0] / statistics.median(times)

  return ips(step), ips(evaluate), torch.get_num_threads()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--size', type=int, default=64)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--impls', default='shift,lax')
  parser.add_argument('--torch', action='store_true', help='also time PyTorch')
  args = parser.parse_args()

  model = load_pretrained('efficientnet-lite0', num_classes=10)
  rng = np.random.default_rng(0)
  raw = rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
  images = jax.jit(lambda x: model.preprocess(x, args.size))(raw)
  labels = jnp.asarray(rng.integers(0, 10, args.batch))
  print(f'EfficientNet-Lite0, {args.size}px, batch {args.batch}, backend '
        f'{jax.default_backend()}, median of {args.steps} timed calls')
  for impl in args.impls.split(','):
    step_ips, eval_ips, seconds = bench_jax(impl, model, images, labels, args.steps)
    print(f'  jax depthwise_impl={impl:5s}  step {step_ips:7.1f} img/s   '
          f'eval {eval_ips:7.1f} img/s   (incl. compile: {seconds:.0f} s)')
  if args.torch:
    step_ips, eval_ips, threads = bench_torch(images, labels, args.steps)
    print(f'  torch ({threads} threads)       step {step_ips:7.1f} img/s   '
          f'eval {eval_ips:7.1f} img/s')


if __name__ == '__main__':
  main()

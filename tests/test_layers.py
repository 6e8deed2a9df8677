"""Depthwise conv implementations agree; FrozenBatchNorm is eval-mode BN."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from finetune_jax.models import layers


def _random(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize('size,kernel,stride,expected', [
    (224, 3, 2, (0, 1)),  # even input, stride 2: the extra pad goes at the end
    (224, 5, 2, (1, 2)),
    (7, 3, 2, (1, 1)),
    (75, 5, 2, (2, 2)),
    (8, 3, 1, (1, 1)),
    (8, 5, 1, (2, 2)),
    (2, 5, 1, (2, 2)),
])
def test_same_padding_is_tensorflow_same(size, kernel, stride, expected):
  assert layers.same_padding(size, kernel, stride) == expected
  lo, hi = expected
  assert (size + lo + hi - kernel) // stride + 1 == -(-size // stride)


@pytest.mark.parametrize('kernel', [3, 5])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('size', [8, 7])
def test_shift_matches_lax_values_and_gradients(kernel, stride, size):
  x = _random((2, size, size, 6), 0)
  w = _random((kernel, kernel, 1, 6), 1)

  def loss(impl):
    def f(x, w):
      y = layers.depthwise_conv2d(x, w, stride, 'SAME', impl)
      return jnp.sum(y * jnp.cos(y)), y  # a non-trivial cotangent
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, w)

  (l_shift, y_shift), g_shift = loss('shift')
  (l_lax, y_lax), g_lax = loss('lax')
  assert y_shift.shape == (2, -(-size // stride), -(-size // stride), 6)
  np.testing.assert_allclose(y_shift, y_lax, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l_shift, l_lax, rtol=1e-5)
  for a, b in zip(g_shift, g_lax):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('padding', ['VALID', ((1, 2), (0, 1)), ((0, 0), (3, 0))])
@pytest.mark.parametrize('stride', [1, 2])
def test_shift_gradients_match_lax_for_any_padding(padding, stride):
  # 'shift' has its own backward pass (a shifted sum over the spread output
  # gradient), which must hold for padding on any side and uneven strides.
  x = _random((2, 9, 8, 5), 2)
  w = _random((3, 3, 1, 5), 3)

  def grads(impl):
    f = lambda x, w: jnp.sum(jnp.sin(layers.depthwise_conv2d(x, w, stride, padding, impl)))
    return jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)

  for a, b in zip(grads('shift'), grads('lax')):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('kernel,stride', [(3, 1), (5, 2), (3, 2)])
def test_depthwise_matches_reference_same_padding_conv(kernel, stride):
  """Against efficientnet-lite-pytorch's own TF-'SAME' padded depthwise conv."""
  from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding
  x = _random((2, 9, 10, 4), 2)  # odd/even and non-square: padding differs per axis
  w = _random((kernel, kernel, 1, 4), 3)
  ref = Conv2dDynamicSamePadding(4, 4, kernel, stride=stride, groups=4, bias=False)
  with torch.no_grad():
    ref.weight.copy_(torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy()))
    expected = ref(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()))
  expected = expected.numpy().transpose(0, 2, 3, 1)
  for impl in ('shift', 'lax'):
    got = layers.depthwise_conv2d(x, w, stride, 'SAME', impl)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_depthwise_module_uses_flax_grouped_conv_layout():
  x = _random((1, 6, 6, 4), 4)
  module = layers.DepthwiseConv(3, 2, impl='shift')
  params = module.init(jax.random.PRNGKey(0), x)['params']
  assert params['kernel'].shape == (3, 3, 1, 4)
  flax_conv = nn.Conv(4, (3, 3), 2, padding='SAME', feature_group_count=4, use_bias=False)
  np.testing.assert_allclose(module.apply({'params': params}, x),
                             flax_conv.apply({'params': params}, x), rtol=1e-5, atol=1e-5)


def test_auto_picks_shift_on_cpu_and_bad_input_is_explained():
  assert layers.resolve_depthwise_impl('auto') == (
      'shift' if jax.default_backend() == 'cpu' else 'lax')
  with pytest.raises(ValueError, match='depthwise_impl'):
    layers.resolve_depthwise_impl('fast')
  with pytest.raises(ValueError, match=r'\(kh, kw, 1, C\)'):
    layers.depthwise_conv2d(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 1, 5)))


def test_frozen_batch_norm_is_eval_mode_batch_norm():
  x = _random((3, 4, 4, 5), 5)
  module = layers.FrozenBatchNorm(epsilon=1e-3)
  variables = module.init(jax.random.PRNGKey(0), x)
  assert set(variables) == {'params'}  # no batch_stats collection
  params = {'scale': _random((5,), 6), 'bias': _random((5,), 7),
            'mean': _random((5,), 8), 'var': jnp.abs(_random((5,), 9)) + 0.1}
  ref = torch.nn.BatchNorm2d(5, eps=1e-3).eval()
  with torch.no_grad():
    for ours, theirs in [('scale', 'weight'), ('bias', 'bias'),
                         ('mean', 'running_mean'), ('var', 'running_var')]:
      getattr(ref, theirs).copy_(torch.from_numpy(np.array(params[ours])))
    expected = ref(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()))
  np.testing.assert_allclose(module.apply({'params': params}, x),
                             expected.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(module.apply({'params': p}, x) ** 2))(params)
  assert not np.any(grads['mean']) and not np.any(grads['var'])  # statistics never learn
  assert np.any(grads['scale']) and np.any(grads['bias'])

"""A tiny MLP shaped like a zoo model, for fast tests of the engine."""
import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from finetune_jax.models.layers import FrozenBatchNorm


class ToyNet(nn.Module):
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(16, name='stem')(x))
    x = FrozenBatchNorm(name='stem_bn')(x)
    for i in range(2):
      x = x + nn.relu(nn.Dense(16, name=f'block_{i}')(x))
    features = x
    x = nn.Dropout(0.0, deterministic=not train)(x)
    return {'features': features, 'logits': nn.Dense(self.num_classes, name='head')(x)}


@dataclasses.dataclass
class ToyModel:
  module: nn.Module
  params: dict
  config: dict
  preprocess: Callable
  head: str = 'head'
  blocks: tuple = ('stem', 'stem_bn', 'block_0', 'block_1')
  tokenizer: object = None


def toy_model(num_classes=3, seed=0):
  module = ToyNet(num_classes)
  params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4, 4, 1)))['params']
  preprocess = lambda images, image_size=None: images.astype(jnp.float32) / 255.0
  return ToyModel(module, params, {'num_classes': num_classes}, preprocess)

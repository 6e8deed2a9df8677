"""Pretrained models by alias or checkpoint path.

  model = load_pretrained('efficientnet-lite0', num_classes=10)
  x = model.preprocess(images_uint8)                       # NHWC, resized + normalised
  out = model.module.apply({'params': model.params}, x)    # {'logits', 'features'}

A new `num_classes` replaces the classifier by a zero-initialised one (the
pretrained head is dropped through dont_load '^head/'). Architectures plug in
through `models/zoo/<arch>.py` (see registry.py).
"""
from finetune_jax.models import zoo  # noqa: F401  (registers the zoo)
from finetune_jax.models.loading import merge_pretrained
from finetune_jax.models.registry import describe_aliases
from finetune_jax.models.registry import list_aliases
from finetune_jax.models.registry import load_pretrained
from finetune_jax.models.registry import Pretrained

__all__ = ['Pretrained', 'load_pretrained', 'list_aliases', 'describe_aliases',
           'merge_pretrained']

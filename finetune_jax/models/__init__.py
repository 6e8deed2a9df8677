"""Pretrained models by alias or checkpoint path.

  model = load_pretrained('efficientnet-lite0', num_classes=10)
  x = model.preprocess(images_uint8)                       # NHWC, resized + normalised
  out = model.module.apply({'params': model.params}, x)    # {'logits', 'features'}

A new `num_classes` replaces the classifier by a zero-initialised one (the
pretrained head is dropped through dont_load '^head/'). Architectures plug in
as one folder each, `models/<arch>/`: `model.py` (the flax module),
`convert.py` (checkpoint key maps, both ways) and `__init__.py` (aliases,
loaders and the registered `Architecture`). Importing it registers it.
"""
# The zoo: each import registers an architecture.
from finetune_jax.models import bert  # noqa: F401
from finetune_jax.models import efficientnet_lite  # noqa: F401
from finetune_jax.models import gpt2  # noqa: F401
from finetune_jax.models import llama  # noqa: F401
from finetune_jax.models import resnet  # noqa: F401
from finetune_jax.models import vgg  # noqa: F401
from finetune_jax.models import vit  # noqa: F401
from finetune_jax.models.loading import load_into
from finetune_jax.models.registry import describe_aliases
from finetune_jax.models.registry import list_aliases
from finetune_jax.models.registry import load_pretrained
from finetune_jax.models.registry import Pretrained

__all__ = ['Pretrained', 'load_pretrained', 'list_aliases', 'describe_aliases',
           'load_into']

"""Importing an architecture's hub module registers its aliases and loaders."""
from finetune_jax.models.hub import bert  # noqa: F401
from finetune_jax.models.hub import efficientnet_lite  # noqa: F401
from finetune_jax.models.hub import gpt2  # noqa: F401
from finetune_jax.models.hub import llama  # noqa: F401
from finetune_jax.models.hub import resnet  # noqa: F401
from finetune_jax.models.hub import vgg  # noqa: F401
from finetune_jax.models.hub import vit  # noqa: F401

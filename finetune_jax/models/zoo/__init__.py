"""Importing an architecture's zoo module registers its aliases, loaders and Architecture."""
from finetune_jax.models.zoo import bert  # noqa: F401
from finetune_jax.models.zoo import efficientnet_lite  # noqa: F401
from finetune_jax.models.zoo import gpt2  # noqa: F401
from finetune_jax.models.zoo import llama  # noqa: F401
from finetune_jax.models.zoo import resnet  # noqa: F401
from finetune_jax.models.zoo import vgg  # noqa: F401
from finetune_jax.models.zoo import vit  # noqa: F401

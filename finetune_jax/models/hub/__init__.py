"""Importing an architecture's hub module registers its aliases and loaders."""
from finetune_jax.models.hub import efficientnet_lite  # noqa: F401

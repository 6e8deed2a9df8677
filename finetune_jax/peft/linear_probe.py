"""Linear probe: only the new head trains; the backbone is a fixed feature map."""
from finetune_jax.peft import base


def adapt(model, cfg):
  del cfg
  return base.freeze_all_but(model, lambda path: base.is_head(model, path))

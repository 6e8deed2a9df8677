"""BitFit (Ben Zaken et al., 2021): bias terms and the head train."""
from finetune_jax.peft import base


def adapt(model, cfg):
  del cfg
  return base.freeze_all_but(
      model, lambda path: base.is_head(model, path) or path.endswith('/bias'))

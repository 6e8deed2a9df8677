"""Fine-tuning methods, selected by `config.peft.method`.

Each method is one `method.Method`, registered by its own file; importing
this package registers them all.
"""
import dataclasses

from finetune_jax.peft import adapter  # noqa: F401  (each import registers its methods)
from finetune_jax.peft import freezing  # noqa: F401
from finetune_jax.peft import ia3  # noqa: F401
from finetune_jax.peft import lora  # noqa: F401
from finetune_jax.peft import lp_ft  # noqa: F401
from finetune_jax.peft import method
from finetune_jax.peft import prefix_tuning  # noqa: F401
from finetune_jax.peft import prompt_tuning  # noqa: F401
from finetune_jax.peft import quantize
from finetune_jax.peft.base import Adapted


def adapt(model, cfg) -> Adapted:
  """Applies `cfg.method` to `model` (a `models.Pretrained`), on a quantized base where
  `cfg.quantize_base` asks for one (QLoRA)."""
  quantize.check(cfg)
  chosen = method.get(cfg.method)
  adapted = chosen.adapt(model, cfg)
  if not adapted.trainable:
    raise ValueError(f'peft.method={cfg.method!r} leaves no parameter to train.')
  # A method may hand the adaptation to another (lp_ft's body), which then answers for it.
  adapted = dataclasses.replace(adapted, method=adapted.method or chosen)
  return quantize.quantize_base(adapted, cfg)

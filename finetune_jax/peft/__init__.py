"""Fine-tuning methods, selected by `config.peft.method`."""
from finetune_jax.peft import adapter
from finetune_jax.peft import bitfit
from finetune_jax.peft import full
from finetune_jax.peft import ia3
from finetune_jax.peft import linear_probe
from finetune_jax.peft import lora
from finetune_jax.peft import partial
from finetune_jax.peft import prefix_tuning
from finetune_jax.peft import prompt_tuning
from finetune_jax.peft.base import Adapted

METHODS = {
    'full': full.adapt,
    'linear_probe': linear_probe.adapt,
    'bitfit': bitfit.adapt,
    'partial': partial.adapt,
    'lora': lora.adapt,
    'dora': lora.adapt_dora,
    'ia3': ia3.adapt,
    'adapter': adapter.adapt,
    'prompt_tuning': prompt_tuning.adapt,
    'prefix_tuning': prefix_tuning.adapt,
}


def adapt(model, cfg) -> Adapted:
  """Applies `cfg.method` to `model` (a `models.Pretrained`)."""
  if cfg.method not in METHODS:
    raise ValueError(f'Unknown peft.method {cfg.method!r}; known methods: '
                     f'{sorted(METHODS)}.')
  adapted = METHODS[cfg.method](model, cfg)
  if not adapted.trainable:
    raise ValueError(f'peft.method={cfg.method!r} leaves no parameter to train.')
  return adapted

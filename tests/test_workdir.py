"""Which config changes a workdir may resume under: the run's identity."""
import pytest

from finetune_jax import base_config
from finetune_jax import workdir


def _config(method, **peft_fields):
  c = base_config.get_config()
  c.pretrained, c.dataset, c.num_classes = 'efficientnet-lite-tiny', 'fashion_mnist', 10
  c.peft.method = method
  for key, value in peft_fields.items():
    section, _, field = key.rpartition('.')
    (c.peft[section] if section else c.peft)[field] = value
  return c


def test_only_the_chosen_methods_fields_are_identity(tmp_path):
  workdir.write_config(str(tmp_path), _config('bitfit'))
  # Another method's options do not touch a bitfit run ...
  workdir.check_compatible(str(tmp_path), _config('bitfit', **{'lora.rank': 4}))
  workdir.check_compatible(str(tmp_path), _config('bitfit', num_frozen_blocks=3))
  # ... but its method, and what every method shares, do.
  with pytest.raises(ValueError, match=r"peft.method: 'bitfit' -> 'lora'"):
    workdir.check_compatible(str(tmp_path), _config('lora'))
  with pytest.raises(ValueError, match=r'peft.learning_rate: None -> 0.01'):
    workdir.check_compatible(str(tmp_path), _config('bitfit', learning_rate=0.01))

  lora_run = tmp_path / 'lora'
  workdir.write_config(str(lora_run), _config('lora'))
  workdir.check_compatible(str(lora_run), _config('lora', **{'ia3.targets': ('q',)}))
  with pytest.raises(ValueError, match=r'peft.lora.rank: 8 -> 4'):
    workdir.check_compatible(str(lora_run), _config('lora', **{'lora.rank': 4}))

  partial_run = tmp_path / 'partial'
  workdir.write_config(str(partial_run), _config('partial', num_frozen_blocks=2))
  with pytest.raises(ValueError, match=r'peft.num_frozen_blocks: 2 -> 3'):
    workdir.check_compatible(str(partial_run), _config('partial', num_frozen_blocks=3))

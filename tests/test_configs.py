"""Every shipped config builds, has the contract keys and passes validation."""
import glob
import importlib.util
import os

import pytest

from finetune_jax import config_checks

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), '..', 'configs', '*.py')))


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_all_configs_are_found():
  assert {os.path.basename(p) for p in CONFIGS} >= {
      'default.py', 'resnet.py', 'vgg16.py', 'vit.py', 'minilm_fortunes.py',
      'gpt2_lyrics.py', 'smollm2_poems.py'}


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize('arg', [None, 'smoke'])
def test_config_is_complete_and_valid(path, arg):
  config = load(path).get_config(arg)
  config_checks.validate(config, num_devices=8)
  assert config.parallel == 'pmap'
  if config.task == 'causal_lm':
    assert config.num_classes is None and config.eval_before_training
  else:
    assert config.num_classes > 0
  assert load(path).__doc__ and 'python -m finetune_jax.main' in load(path).__doc__
  if arg == 'smoke':
    assert config.total_steps <= 10


@pytest.mark.parametrize('path', CONFIGS[:1], ids=os.path.basename)
def test_unknown_config_argument_is_refused(path):
  with pytest.raises(ValueError, match="Unknown config argument 'smok'"):
    load(path).get_config('smok')


def test_config_arguments_set_fields_by_path_or_unique_name():
  default = load(os.path.join(os.path.dirname(CONFIGS[0]), 'default.py'))
  config = default.get_config("method=lora,smoke,rank=4,peft.lora.targets=('q', 'v')")
  assert (config.peft.method, config.peft.lora.rank, config.peft.lora.targets) == (
      'lora', 4, ('q', 'v'))
  assert config.total_steps == 6  # smoke, in any position
  assert default.get_config('head_learning_rate=None').head_learning_rate is None
  for arg, message in [('targets=("q",)', r'ambiguous.*peft.ia3.targets.*peft.lora.targets'),
                       ('rnak=3', r"Unknown config argument field 'rnak'.*'rank'"),
                       ("rank='x'", r'peft.lora.rank=.x.')]:
    with pytest.raises(ValueError, match=message):
      default.get_config(arg)

"""The structured errors carry what went wrong as fields, not just as wording."""
import pytest

from finetune_jax import base_config
from finetune_jax import errors
from finetune_jax import models
from finetune_jax import peft


def _peft(method, **fields):
  c = base_config.get_config().peft
  c.method = method
  for key, value in fields.items():
    section, _, field = key.rpartition('.')
    (c[section] if section else c)[field] = value
  return c


@pytest.fixture(scope='module')
def bert():
  return models.load_pretrained('bert-tiny', num_classes=2)


def test_a_target_that_matches_nothing_is_no_match(bert):
  with pytest.raises(errors.NoMatch) as e:
    peft.adapt(bert, _peft('lora', **{'lora.targets': ('query', 'qurey')}))
  assert e.value.option == 'peft.lora.targets' and e.value.pattern == ['qurey']
  assert 'layer_0/attention/self/query' in e.value.nearest['qurey']
  with pytest.raises(errors.NoMatch) as e:
    peft.adapt(bert, _peft('partial', freeze=('^layr_0/',)))
  assert (e.value.option, e.value.pattern) == ('peft.freeze', '^layr_0/')


def test_roles_and_bare_names_select_like_their_regexes(bert):
  def modules(targets):
    adapted = peft.adapt(bert, _peft('lora', **{'lora.targets': targets}))
    return sorted(p for p in adapted.trainable if p.endswith('lora_a'))
  assert modules(('q', 'v')) == modules((r'attention/self/(query|value)$',))
  assert modules(('query',)) == modules((r'(^|/)query$',)) == modules(('q',))
  with pytest.raises(errors.ConfigError, match="'conv' names a role .* that bert lacks"):
    modules(('conv',))


def test_a_method_the_model_cannot_take_is_not_applicable():
  resnet = models.load_pretrained('resnet-tiny', num_classes=3)
  with pytest.raises(errors.NotApplicable) as e:
    peft.adapt(resnet, _peft('prompt_tuning'))
  assert (e.value.option, e.value.method, e.value.architecture) == (
      'peft.method', 'prompt_tuning', 'resnet')
  gpt2 = models.load_pretrained('gpt2-tiny')
  with pytest.raises(errors.NotApplicable, match='a new classifier head'):
    peft.adapt(gpt2, _peft('linear_probe'))

"""Frozen-prefix feature caching: exact where `auto` turns it on, keyed by all it depends on."""
import json
import os
import sys

import numpy as np
import pytest

from finetune_jax import errors
from finetune_jax import feature_cache
from finetune_jax import pipelines
from finetune_jax import train

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'configs'))
import vit  # noqa: E402  (configs/vit.py)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
  root = tmp_path / 'feature_cache'
  monkeypatch.setattr(feature_cache, 'cache_root', lambda config: str(root))
  return root


def config_for(**overrides):
  """vit-tiny (no dropout: its bottom is deterministic) on MNIST-5k at 32 px."""
  c = vit.get_config()
  c.unlock()
  c.pretrained, c.total_steps, c.eval_every, c.checkpoint_every = 'vit-tiny', 64, 64, 64
  c.warmup_steps, c.log_every = 4, 32
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.mark.slow
@pytest.mark.parametrize('method,frozen', [('linear_probe', 0), ('partial', 4)])
def test_cached_run_equals_the_uncached_run(tmp_path, method, frozen):
  runs = {}
  for mode in ('off', 'auto'):
    config = config_for(**{'peft.method': method, 'peft.num_frozen_blocks': frozen,
                           'cache_frozen_features': mode})
    runs[mode] = train.train_and_evaluate(config, str(tmp_path / mode))
  assert not runs['off']['feature_cache']['used']
  cached = runs['auto']['feature_cache']
  assert cached['used'] and cached['why'] == 'exact' and not cached['warm']
  assert cached['block'] == {'linear_probe': 'head', 'partial': 'encoderblock_1'}[method]
  for k, v in runs['off']['final'].items():
    assert runs['auto']['final'][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
  # A second run over the same frozen bottom (other rates) starts warm. (Another seed
  # would draw another random-init bottom here, and a new cache.)
  again = train.train_and_evaluate(
      config_for(**{'peft.method': method, 'peft.num_frozen_blocks': frozen,
                    'learning_rate': 3e-3, 'head_learning_rate': 3e-3}),
      str(tmp_path / 'again'))
  assert again['feature_cache']['used'] and again['feature_cache']['warm']


def _plan(config):
  model, adapted = train.build_model(config)
  splits = pipelines.open_dataset(config)
  pipeline = pipelines.make(config, splits, model)
  return feature_cache.plan(config, model, adapted, splits, pipeline, np.float32)


ON = {'cache_frozen_features': 'on'}  # builds regardless of the run's length


def test_the_key_covers_model_params_data_and_preprocessing():
  base = config_for(**{'peft.method': 'linear_probe', **ON})
  plan, decision = _plan(base)
  assert plan and decision.used and plan.block == 'head'
  others = {
      'another seed draws other frozen params': config_for(
          **{'peft.method': 'linear_probe', **ON, 'seed': 3}),
      'another dataset': config_for(**{'peft.method': 'linear_probe', **ON,
                                       'dataset': 'fashion_mnist'}),
      'another eval split': config_for(**{'peft.method': 'linear_probe', **ON,
                                          'eval_split': 'train[:50%]'}),
      'another preprocessing': config_for(**{'peft.method': 'linear_probe', **ON,
                                             'eval_crop_ratio': 0.875}),
      'another boundary': config_for(**{'peft.method': 'partial', **ON,
                                        'peft.num_frozen_blocks': 4}),
  }
  for what, config in others.items():
    other, _ = _plan(config)
    assert other.directories['eval'] != plan.directories['eval'], what
  same_train = _plan(others['another eval split'])[0]
  assert same_train.directories['train'] == plan.directories['train']
  # The split's own spec counts, not just its size.
  other_half = _plan(config_for(**{'peft.method': 'linear_probe', **ON,
                                   'eval_split': 'train[50%:]'}))[0]
  assert other_half.directories['eval'] != same_train.directories['eval']


def test_auto_stays_off_where_caching_is_not_exact_and_says_why():
  cases = {
      'augmented': ({'peft.method': 'linear_probe', 'augment.flip': True}, 'augmented'),
      'random bottom': ({'pretrained': 'efficientnet-lite0-random',
                         'peft.method': 'linear_probe'}, 'draw random numbers'),
      'nothing frozen': ({'peft.method': 'full'}, 'nothing is frozen'),
      'short run': ({'peft.method': 'linear_probe', 'total_steps': 10}, 'fewer than'),
  }
  for what, (overrides, why) in cases.items():
    plan, decision = _plan(config_for(**overrides))
    assert plan is None and not decision.used and why in decision.why, what


def test_on_caches_a_random_bottom_in_inference_mode_and_refuses_the_impossible(tmp_path):
  plan, decision = _plan(config_for(**{'pretrained': 'efficientnet-lite0-random',
                                       'peft.method': 'linear_probe',
                                       'cache_frozen_features': 'on'}))
  assert plan and not plan.train_mode and decision.used
  for overrides in ({'augment.flip': True}, {'peft.method': 'full'}):
    config = config_for(**{'peft.method': 'linear_probe', 'cache_frozen_features': 'on',
                           **overrides})
    with pytest.raises(errors.ConfigError) as e:
      train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert e.value.option == 'cache_frozen_features'
    assert not (tmp_path / 'run').exists()  # refused before anything was written


def test_a_damaged_or_half_written_cache_is_never_read(tmp_path):
  directory = tmp_path / 'c'
  batches = [{'image': np.zeros((4, 2)), 'label': np.arange(4), 'mask': np.ones(4, bool)}]
  feature_cache._build(str(directory), lambda b: np.ones((4, 3)), batches, {'k': 1})
  assert feature_cache._load(str(directory)).features.shape == (4, 3)
  assert json.loads((directory / 'key.json').read_text()) == {'k': 1}
  with open(directory / 'features.npy', 'r+b') as f:
    f.truncate(40)
  assert feature_cache._load(str(directory)) is None
  os.remove(directory / 'label.npy')
  assert feature_cache._load(str(directory)) is None

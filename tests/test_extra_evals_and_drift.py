"""Extra eval sets (shifted Fashion-MNIST) and feature drift (CKA, cosine)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from finetune_jax import data
from finetune_jax import drift
from finetune_jax import train
from finetune_jax.data import fashion_mnist_shifted

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'configs'))
import default  # noqa: E402  (configs/default.py)

ROOT = os.path.join(os.path.dirname(__file__), '..')


def test_cka_and_cosine_on_known_cases():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((500, 16))
  rotation, _ = np.linalg.qr(rng.standard_normal((16, 16)))
  assert drift.linear_cka(x, x) == pytest.approx(1.0)
  # CKA ignores rotations and scale; cosine does not ignore rotations.
  assert drift.linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0)
  assert drift.mean_cosine(x, 3.0 * x) == pytest.approx(1.0)
  assert drift.mean_cosine(x, x @ rotation) < 0.9
  assert drift.linear_cka(x, rng.standard_normal((500, 16))) < 0.1


def test_the_shifts_are_fixed_and_change_the_images():
  image = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
  for kind in fashion_mnist_shifted.SHIFTS:
    shifted = fashion_mnist_shifted.shift(image, kind, index=7)
    assert shifted.shape == image.shape and shifted.dtype == np.uint8
    assert not np.array_equal(shifted, image), kind
    np.testing.assert_array_equal(shifted, fashion_mnist_shifted.shift(image, kind, index=7))
  split = data.load_split('fashion_mnist_shifted', 'rotate')
  assert split.num_examples == 10000 and split.num_classes == 10


def tiny(method='partial', **overrides):
  config = default.get_config('smoke')
  config.unlock()
  config.update({'pretrained': 'efficientnet-lite-tiny', 'dataset': 'fashion_mnist',
                 'image_size': 32, 'eval_batch_size': 400,
                 'extra_evals': (('rotate', 'fashion_mnist_shifted', 'rotate'),
                                 ('noise', 'fashion_mnist_shifted', 'noise')),
                 'feature_drift_examples': 300, 'eval_split': 'test[:1000]', **overrides})
  config.peft.method = method
  config.peft.num_frozen_blocks = 2
  config.lock()
  return config


@pytest.mark.slow
def test_extra_evals_at_every_eval_and_feature_drift(tmp_path):
  results = train.train_and_evaluate(tiny(), str(tmp_path / 'partial'))
  for name in ('rotate', 'noise'):
    assert 0 <= results['final'][f'{name}_accuracy'] <= 1 and f'{name}_loss' in results['final']
  events = [json.loads(l) for l in (tmp_path / 'partial' / 'metrics.jsonl').read_text().split('\n')
            if l]
  assert all('rotate_accuracy' in e for e in events if e['split'] == 'eval')
  moved = results['feature_drift']
  assert moved['examples'] == 300 and 0 < moved['cka'] < 1 and moved['cosine'] < 1
  # A linear probe leaves the features where they were: drift exactly none.
  probe = train.train_and_evaluate(tiny('linear_probe'),
                                   str(tmp_path / 'probe'))
  assert probe['feature_drift']['cka'] == pytest.approx(1.0, abs=1e-9)
  assert probe['feature_drift']['cosine'] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize('extra,message', [
    ((('x', 'no_such_dataset', 'test'),), 'no_such_dataset'),
    ((('eval', 'fashion_mnist_shifted', 'rotate'),), 'use an identifier other than'),
    ((('x', 'fashion_mnist_shifted', 'nope'),), "has no split 'nope'"),
    ((('x', 'fortunes', 'test'),), 'has 8 classes, the run 10'),
    ((('x', 'fashion_mnist_shifted'),), 'give (name, dataset, split)'),
])
def test_a_bad_extra_eval_fails_before_anything_is_written(tmp_path, extra, message):
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'finetune_jax.main', '--config=configs/default.py:smoke',
       f'--workdir={workdir}', '--config.pretrained=efficientnet-lite-tiny',
       f'--config.extra_evals={extra!r}'],
      capture_output=True, text=True, cwd=ROOT, env={**os.environ, 'XLA_FLAGS': ''}, timeout=600)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert message in proc.stderr.strip().splitlines()[-1]
  assert not workdir.exists()


@pytest.mark.slow
def test_a_causal_lm_reports_austen_perplexity_beside_its_own(tmp_path):
  import gpt2_lyrics  # pylint: disable=import-outside-toplevel
  config = gpt2_lyrics.get_config('smoke')
  config.unlock()
  config.update({'pretrained': 'gpt2-tiny', 'batch_size': 8, 'eval_batch_size': 16,
                 'extra_evals': (('austen', 'austen', 'test[:200]'),)})
  config.text.max_length = 64
  config.generation.prompts = ()
  config.lock()
  final = train.train_and_evaluate(config, str(tmp_path))['final']
  assert final['austen_perplexity'] > 1 and final['eval_perplexity'] > 1
  assert final['austen_perplexity'] != final['eval_perplexity']

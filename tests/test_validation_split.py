"""Validation held out of train, and train subsets: picked by the seed, stratified, reported."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from finetune_jax import data
from finetune_jax.data import pipeline

ROOT = os.path.join(os.path.dirname(__file__), '..')


def toy_split(labels):
  source = [{'label': int(y), 'x': np.full(2, i)} for i, y in enumerate(labels)]
  return data.Split(source, len(source), int(max(labels)) + 1, None)


def test_pick_keeps_the_class_balance_and_follows_the_seed():
  labels = np.repeat([0, 1, 2], [600, 300, 100])
  chosen = pipeline.pick(100, 1000, seed=0, labels_=labels)
  assert len(chosen) == len(set(chosen)) == 100
  assert np.bincount(labels[chosen]).tolist() == [60, 30, 10]
  np.testing.assert_array_equal(chosen, pipeline.pick(100, 1000, seed=0, labels_=labels))
  assert not np.array_equal(chosen, pipeline.pick(100, 1000, seed=1, labels_=labels))
  # Rounding: 7 of 3 classes still gives exactly 7.
  assert len(pipeline.pick(7, 1000, seed=0, labels_=labels)) == 7


def test_carve_holds_validation_out_and_subsets_the_rest():
  split = toy_split(np.repeat([0, 1], [80, 20]))
  train, val = data.carve(split, validation=0.1, train_examples=30, seed=3, stratify=True,
                          name='toy')
  assert (val.num_examples, train.num_examples) == (10, 30)
  val_ids = {int(val.source[i]['x'][0]) for i in range(val.num_examples)}
  train_ids = {int(ex['x'][0]) for ex in train.source.__getitems__(list(range(30)))}
  assert not val_ids & train_ids
  assert sorted(val.source[i]['label'] for i in range(10)) == [0] * 8 + [1] * 2
  assert sum(ex['label'] for ex in train.source.__getitems__(list(range(30)))) == 6
  same, _ = data.carve(split, validation=0, train_examples=0, seed=3, stratify=True, name='toy')
  assert same is split


@pytest.mark.parametrize('kwargs,message', [
    (dict(validation=100, train_examples=0), 'leaving none to train on'),
    (dict(validation=10, train_examples=91), 'more than the 90 examples of toy left to train on'),
    (dict(validation=-1, train_examples=0), 'must be >= 0'),
    (dict(validation=0.001, train_examples=0), 'selects no example'),
])
def test_carve_refuses_what_the_split_cannot_give(kwargs, message):
  with pytest.raises(ValueError, match=message):
    data.carve(toy_split(np.arange(100) % 2), seed=0, stratify=True, name='toy', **kwargs)


@pytest.mark.slow
def test_a_run_reports_validation_and_test_at_every_eval_and_keeps_the_best(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'finetune_jax.main', '--config=configs/default.py:smoke',
       f'--workdir={tmp_path}', '--config.pretrained=efficientnet-lite-tiny',
       '--config.dataset=mnist5k', '--config.image_size=32', '--config.peft.num_frozen_blocks=2',
       '--config.validation_examples=0.1', '--config.train_examples=1000',
       '--config.keep_best=True', '--config.eval_every=2', '--config.learning_rate=0.01'],
      capture_output=True, text=True, cwd=ROOT, env={**os.environ, 'XLA_FLAGS': ''}, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'examples train, ' in proc.stderr and '1000 examples train' in proc.stderr
  results = json.loads((tmp_path / 'results.json').read_text())
  assert {'val_accuracy', 'val_loss', 'eval_accuracy', 'eval_loss'} <= set(results['final'])
  events = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  evals = [e for e in events if e['split'] == 'eval']
  assert [e['step'] for e in evals] == [2, 4, 6]
  assert all('val_accuracy' in e and 'eval_accuracy' in e for e in evals)
  # keep_best: orbax kept the checkpoint of the best validation accuracy (the
  # latest of equals), and results.json reports that eval.
  best = max(evals, key=lambda e: (e['val_accuracy'], e['step']))
  assert results['best'] == {k: v for k, v in best.items() if k != 'split'}
  assert os.listdir(tmp_path / 'best_checkpoint') == [str(best['step'])]


@pytest.mark.parametrize('metric,higher,values,best', [
    ('val_accuracy', True, [0.5, 0.9, 0.7], 1), ('val_loss', False, [3.0, 1.0, 2.0, 1.5], 1),
    ('val_accuracy', True, [0.1, 0.2, 0.3], 2)])
def test_the_best_checkpoint_is_the_best_by_its_metric(tmp_path, metric, higher, values, best):
  from finetune_jax import checkpoint  # pylint: disable=import-outside-toplevel
  ckpt = checkpoint.Checkpointer(str(tmp_path), 1, best=(metric, higher))
  for step, value in enumerate(values):
    ckpt.save(step, {'w': np.full(3, step, np.float32)}, metrics={metric: value})
  assert ckpt.best_step() == best
  ckpt.close()
  assert os.listdir(tmp_path / checkpoint.BEST_DIR) == [str(best)]
  restored = checkpoint.Checkpointer(str(tmp_path), 1, best=(metric, higher)).restore(
      {'w': np.zeros(3, np.float32)}, best)
  np.testing.assert_array_equal(restored['w'], np.full(3, best))


def test_keep_best_without_validation_is_refused():
  from finetune_jax import config_checks  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(ROOT, 'configs'))
  import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.keep_best = True
  with pytest.raises(ValueError, match='keep_best selects on validation metrics'):
    config_checks.validate(config, 1)


def test_too_many_train_examples_fail_before_anything_is_written(tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'finetune_jax.main', '--config=configs/default.py:smoke',
       f'--workdir={workdir}', '--config.pretrained=efficientnet-lite-tiny',
       '--config.dataset=mnist5k', '--config.train_examples=10000000'],
      capture_output=True, text=True, cwd=ROOT, env={**os.environ, 'XLA_FLAGS': ''}, timeout=600)
  assert proc.returncode == 2
  assert 'train_examples=10000000' in proc.stderr.strip().splitlines()[-1]
  assert not workdir.exists()

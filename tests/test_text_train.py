"""End to end on text: classification and causal LM through train_and_evaluate."""
import json
import os
import sys

import pytest

from finetune_jax import steps
from finetune_jax import train

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'configs'))
import gpt2_lyrics  # noqa: E402  (configs/gpt2_lyrics.py)
import minilm_fortunes  # noqa: E402
from configured import smoke_config  # noqa: E402  (tests/configured.py)


def events(workdir, name='metrics.jsonl'):
  with open(os.path.join(workdir, name)) as f:
    return [json.loads(line) for line in f]


def test_text_classification_reports_macro_f1_and_compiles_per_bucket(tmp_path):
  config = smoke_config(minilm_fortunes, pretrained='bert-tiny', batch_size=16,
                       eval_batch_size=256, **{'text.max_length': 64})
  steps.TRACES.clear()
  results = train.train_and_evaluate(config, str(tmp_path))
  final = results['final']
  assert set(final) == {'eval_loss', 'eval_accuracy', 'eval_macro_f1'}
  assert 0 <= final['eval_macro_f1'] <= final['eval_accuracy'] + 0.5
  # Byte-level ids: fortunes need every bucket of (32, 64); nothing else compiles.
  assert 1 <= steps.TRACES['train_step'] <= 2
  assert 1 <= steps.TRACES['eval_step'] <= 2
  assert results['trainable_params'] == results['total_params']


def test_causal_lm_logs_initial_perplexity_and_samples(tmp_path):
  config = smoke_config(gpt2_lyrics, pretrained='gpt2-tiny', batch_size=8,
                       eval_batch_size=16, **{'text.max_length': 64,
                                              'generation.max_new_tokens': 8})
  steps.TRACES.clear()
  results = train.train_and_evaluate(config, str(tmp_path))
  assert steps.TRACES == {'train_step': 1, 'eval_step': 1}, 'packed rows: one shape'
  initial, final = results['initial'], results['final']
  assert final['eval_perplexity'] < initial['eval_perplexity']
  assert initial['eval_perplexity'] > 100  # random init over 257 byte ids
  evals = [e['step'] for e in events(tmp_path) if e['split'] == 'eval']
  assert evals == [0, 3, 6]
  samples = events(tmp_path, 'samples.jsonl')
  assert [s['step'] for s in samples] == [0, 0, 3, 3, 6, 6]
  assert {s['prompt'] for s in samples} == set(config.generation.prompts)
  assert all(isinstance(s['text'], str) for s in samples)


@pytest.mark.parametrize('module, overrides, message', [
    (minilm_fortunes, {'pretrained': 'bert-tiny', 'text.truncate': False},
     r'longer than text.max_length=128.*text.truncate=True'),
    (minilm_fortunes, {'pretrained': 'bert-tiny', 'text.max_length': 1024},
     r'text.max_length=1024 exceeds the context of .bert-tiny. \(512'),
    # Fits alone; not after the 20 positions the prompt takes.
    (minilm_fortunes, {'pretrained': 'bert-tiny', 'text.max_length': 500,
                       'peft.method': 'prompt_tuning'},
     r'text.max_length=500 exceeds the context of .bert-tiny. \(512 positions, of which '
     r'peft.method=prompt_tuning takes 20\); set --config.text.max_length=492 or less'),
    (gpt2_lyrics, {'pretrained': 'gpt2-tiny', 'num_classes': 3},
     r'causal_lm keeps the model.s LM head'),
    (gpt2_lyrics, {'pretrained': 'gpt2-tiny', 'text.max_length': 1},
     r'text.max_length=1 must be > 1'),
])
def test_bad_text_input_fails_before_writing(tmp_path, module, overrides, message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(smoke_config(module, **overrides), str(tmp_path))
  assert not os.path.exists(tmp_path / 'config.json')

"""finetune_jax.predict: a trained run on a user's own images, texts and prompts."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from finetune_jax import predict
from finetune_jax import train

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'configs'))
import default  # noqa: E402  (configs/default.py)
import gpt2_lyrics  # noqa: E402
import minilm_fortunes  # noqa: E402
from configured import smoke_config  # noqa: E402  (tests/configured.py)

ROOT = os.path.join(os.path.dirname(__file__), '..')


@pytest.fixture(scope='module')
def image_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('image_run')
  config = smoke_config(default, pretrained='efficientnet-lite-tiny', dataset='mnist5k',
                      image_size=32, **{'peft.num_frozen_blocks': 2, 'validation_examples': 0.1,
                                        'keep_best': True})
  train.train_and_evaluate(config, str(workdir))
  return workdir


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  folder = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(0)
  for name in ('a.png', 'b.jpg'):
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(folder / name)
  (folder / 'notes.txt').write_text('not an image, and not read: wrong extension')
  return folder


def run(*args):
  return subprocess.run([sys.executable, '-m', 'finetune_jax.predict', *map(str, args)],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_images_get_the_datasets_class_names_with_probabilities(image_run, images):
  proc = run(f'--workdir={image_run}', '--json', '--top_k=3', images, images / 'a.png')
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [json.loads(l) for l in proc.stdout.strip().splitlines()]
  assert [os.path.basename(l['image']) for l in lines] == ['a.png', 'b.jpg', 'a.png']
  for line in lines:
    probabilities = [p['probability'] for p in line['predictions']]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    assert 0 < sum(probabilities) <= 1 + 1e-6
    assert {p['class'] for p in line['predictions']} <= {str(d) for d in range(10)}
  assert lines[0]['predictions'] == lines[2]['predictions']  # the same file twice
  # The same probabilities from the function, and --best reads keep_best's checkpoint.
  best = predict.predict(str(image_run), [str(images / 'a.png')], best=True, k=3)
  results = json.loads((image_run / 'results.json').read_text())
  assert best[0]['step'] == results['best']['step']
  plain = run(f'--workdir={image_run}', images / 'b.jpg')
  assert plain.stdout.strip().startswith(f'{images / "b.jpg"}: ')


@pytest.mark.parametrize('make_inputs,message', [
    (lambda imgs: [str(imgs / 'notes.txt')], 'notes.txt: not a readable image'),
    (lambda imgs: ['a sentence, not a file'],
     'no such image file or folder. This run is an image classifier'),
    (lambda imgs: [], 'Give one or more inputs'),
])
def test_bad_input_is_named_before_the_model_loads(image_run, images, make_inputs, message,
                                                   monkeypatch):
  monkeypatch.setattr(predict, 'restore', lambda *a: pytest.fail('the model was loaded'))
  with pytest.raises(ValueError, match=message):
    predict.predict(str(image_run), make_inputs(images))


def test_the_cli_prints_a_bad_input_as_one_line(image_run, images):
  for args, message in (([f'--workdir={image_run}', images / 'notes.txt'], 'not a readable image'),
                        ([f'--workdir={images}', images / 'a.png'], 'holds no config.json')):
    proc = run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr.strip().splitlines()[-1]
    assert 'Traceback' not in proc.stderr


def test_a_run_without_a_finished_checkpoint_is_refused(tmp_path, image_run, images):
  (tmp_path / 'config.json').write_text((image_run / 'config.json').read_text())
  (tmp_path / 'checkpoints' / 'tmp.orbax-checkpoint-tmp-1').mkdir(parents=True)
  with pytest.raises(ValueError, match='has no finished checkpoint in checkpoints/'):
    predict.predict(str(tmp_path), [str(images / 'a.png')])
  with pytest.raises(ValueError, match='--best needs a run trained with --config.keep_best'):
    predict.predict(str(tmp_path), [str(images / 'a.png')], best=True)


def test_texts_from_arguments_and_files(tmp_path):
  config = smoke_config(minilm_fortunes, pretrained='bert-tiny', batch_size=16,
                      **{'text.max_length': 64})
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  lines = tmp_path / 'texts.txt'
  lines.write_text('You will meet a tall, dark stranger.\n\nA penny saved is a penny earned.\n')
  out = predict.predict(str(tmp_path / 'run'), ['Never trust a computer.', str(lines)], k=2)
  assert [o['text'] for o in out] == ['Never trust a computer.',
                                     'You will meet a tall, dark stranger.',
                                     'A penny saved is a penny earned.']
  names = set(predict.class_names(config))
  assert len(names) == 8 and all(p['class'] in names for o in out for p in o['predictions'])


def test_prompts_get_continuations(tmp_path):
  config = smoke_config(gpt2_lyrics, pretrained='gpt2-tiny', batch_size=8, eval_batch_size=16,
                      **{'text.max_length': 64, 'generation.max_new_tokens': 8})
  train.train_and_evaluate(config, str(tmp_path))
  out = predict.predict(str(tmp_path), ['Hello', 'The sea'],
                        generation={'max_new_tokens': 5, 'temperature': None})
  assert [o['prompt'] for o in out] == ['Hello', 'The sea']
  assert all(isinstance(o['continuation'], str) for o in out)
  # Greedy decoding (the run's temperature 0) is deterministic.
  again = predict.predict(str(tmp_path), ['Hello'], generation={'max_new_tokens': 5})
  assert again[0]['continuation'] == out[0]['continuation']

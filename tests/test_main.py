"""End to end: the CLI contract, resume, and errors raised before any work."""
import json
import os
import shutil
import subprocess
import sys

import orbax.checkpoint as ocp
import pytest

from finetune_jax import train
from finetune_jax.peft import paths

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'configs'))
import default  # noqa: E402  (configs/default.py)

TINY = ['--config.pretrained=efficientnet-lite-tiny', '--config.dataset=mnist5k',
        '--config.image_size=32', '--config.peft.num_frozen_blocks=2']


def tiny_config(**overrides):
  config = default.get_config('smoke')
  config.unlock()
  config.update({'pretrained': 'efficientnet-lite-tiny', 'dataset': 'mnist5k',
                 'image_size': 32, **overrides})
  if 'peft' not in overrides:
    config.peft.num_frozen_blocks = 2
  config.lock()
  return config


def run_cli(workdir, *flags):
  return subprocess.run(
      [sys.executable, '-m', 'finetune_jax.main', '--config=configs/default.py:smoke',
       f'--workdir={workdir}', *TINY, *flags],
      capture_output=True, text=True, cwd=os.path.join(os.path.dirname(__file__), '..'),
      env={**os.environ, 'XLA_FLAGS': ''}, timeout=600)


def test_cli_writes_the_contract_files_and_resumes_at_once(tmp_path):
  proc = run_cli(tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / 'results.json').read_text())
  for key in ('final', 'trainable_params', 'total_params', 'steps',
              'train_examples_per_sec', 'wall_s', 'method', 'trainable_percent',
              'optimizer_state_bytes'):
    assert key in results
  assert results['steps'] == 6
  assert 0.0 <= results['final']['eval_accuracy'] <= 1.0
  assert results['final']['eval_loss'] > 0
  assert 0 < results['trainable_params'] < results['total_params']
  # The trainable-parameter report: its share, and AdamW's two float32 moments
  # per trainable param (plus a few scalars), nothing for the frozen ones.
  assert results['trainable_percent'] == pytest.approx(
      100 * results['trainable_params'] / results['total_params'])
  assert 8 * results['trainable_params'] <= results['optimizer_state_bytes'] < (
      8 * results['trainable_params'] + 1024)
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['pretrained'] == 'efficientnet-lite-tiny'
  events = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert {e['split'] for e in events} == {'train', 'eval'}
  assert [e['step'] for e in events if e['split'] == 'eval'] == [3, 6]
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '6']
  assert json.loads(proc.stdout.strip().splitlines()[-1])['final'] == results['final']

  again = run_cli(tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Run already finished at step 6' in again.stderr
  assert json.loads((tmp_path / 'results.json').read_text()) == results


def final_params(workdir):
  mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  state = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore())
  return paths.flatten(state['trainable']), int(state['step'])


def test_a_finished_run_extends_and_fields_newer_than_it_keep_their_defaults(tmp_path):
  """A larger total_steps extends a finished run; fields added to the code after the run
  (absent from its config.json) keep their defaults."""
  train.train_and_evaluate(tiny_config(total_steps=2, eval_every=2), str(tmp_path))
  path = tmp_path / 'config.json'
  old = json.loads(path.read_text())
  del old['peft']['lora'], old['text']
  path.write_text(json.dumps(old))
  results = train.train_and_evaluate(tiny_config(total_steps=3, eval_every=3), str(tmp_path))
  assert results['steps'] == 3 and final_params(tmp_path)[1] == 3
  changed = tiny_config(total_steps=4)
  changed.unlock()
  changed.text.pooling = 'mean'  # absent from the old run: it ran with 'cls'
  with pytest.raises(ValueError, match=r"text.pooling: 'cls' -> 'mean'"):
    train.train_and_evaluate(changed, str(tmp_path))


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('finished')
  train.train_and_evaluate(tiny_config(total_steps=2, eval_every=2), str(workdir))
  return workdir


@pytest.mark.parametrize('override, message', [
    ({'pretrained': 'efficientnet-lite0'}, r"pretrained: 'efficientnet-lite-tiny' -> 'efficientnet-lite0'"),
    ({'peft': {'method': 'full', 'num_frozen_blocks': 2, 'freeze': ()}},
     r"peft.method: 'partial' -> 'full'"),
    ({'image_size': 48}, r'image_size: 32 -> 48'),
])
def test_incompatible_workdir_is_refused_untouched(tmp_path, finished_run, override, message):
  tmp_path = tmp_path / 'run'
  shutil.copytree(finished_run, tmp_path)
  before = {f: (tmp_path / f).read_bytes() for f in ('config.json', 'results.json', 'metrics.jsonl')}
  with pytest.raises(ValueError, match=message + '.*Nothing in the workdir was changed'):
    train.train_and_evaluate(tiny_config(total_steps=2, **override), str(tmp_path))
  assert before == {f: (tmp_path / f).read_bytes() for f in before}


@pytest.mark.parametrize('override, message', [
    ({'dataset': 'fashion_mnits'}, r"fashion_mnits.*fashion_mnist"),
    ({'pretrained': 'efficientnet-lite9'}, r'efficientnet-lite9.*efficientnet-lite0'),
    ({'peft': {'method': 'partial', 'num_frozen_blocks': 0, 'freeze': ('^stme/',)}},
     r"'\^stme/' matches no parameter.*stem/"),
    ({'batch_size': 12}, r'batch_size=12 must be divisible by the 8 devices'),
    ({'batch_size': 16, 'grad_accum_steps': 4},
     r"batch_size=16 must be divisible by the 8 devices \(parallel='pmap'\) x grad_accum_steps=4"),
    ({'num_classes': 7}, r'num_classes=7 but dataset .* has 10 classes'),
    ({'dataset': None}, r'dataset is not set \(--config.dataset=...\)'),
])
def test_bad_input_fails_before_writing(tmp_path, override, message):
  with pytest.raises(ValueError, match='(?s)' + message):
    train.train_and_evaluate(tiny_config(**override), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_folder_dataset_with_augmentation_trains_end_to_end(tmp_path):
  from test_folder_dataset import write_hashed_layout
  write_hashed_layout(tmp_path / 'photos', per_class=12)
  config = tiny_config(dataset=f'folder:{tmp_path / "photos"}', data_dir=str(tmp_path / 'tfds'),
                       num_classes=3, total_steps=2, eval_every=2, batch_size=8,
                       eval_batch_size=8, eval_crop_ratio=0.875)
  config.augment.random_resized_crop = True
  config.augment.flip = True
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['steps'] == 2
  assert 0.0 <= results['final']['eval_accuracy'] <= 1.0


def test_the_cli_keeps_compiled_programs_for_the_next_run(tmp_path):
  cache = tmp_path / 'jax_cache'
  flag = f'--config.compilation_cache_dir={cache}'
  first = run_cli(tmp_path / 'a', flag)
  assert first.returncode == 0, first.stderr[-3000:]
  entries = set(os.listdir(cache))
  assert entries  # the step programs, written by the first run
  second = run_cli(tmp_path / 'b', flag)
  assert second.returncode == 0, second.stderr[-3000:]
  assert set(os.listdir(cache)) >= entries
  read = lambda run: json.loads((tmp_path / run / 'results.json').read_text())['final']
  assert read('a') == read('b')  # a program read back computes what a fresh compile does

"""A damaged checkpoint is found, moved aside, and the newest good one restored."""
import errno
import json
import logging
import os
import shutil

import numpy as np
import pytest

from finetune_jax import checkpoint
from finetune_jax import errors
from finetune_jax import steps
from finetune_jax import train
from test_main import tiny_config


def _state(value):
  return {'step': np.int32(value), 'w': np.full((64, 32), value, np.float32),
          'b': np.arange(32, dtype=np.float32) + value}


def _saved(directory, steps=(1, 2, 3), max_to_keep=3):
  ckpt = checkpoint.Checkpointer(str(directory), max_to_keep)
  for step in steps:
    ckpt.save(step, _state(step))
  ckpt.close()
  return directory / 'checkpoints'


def _largest_file(step_dir):
  files = [os.path.join(root, n) for root, _, names in os.walk(step_dir) for n in names
           if n != checkpoint.MANIFEST]
  return max(files, key=os.path.getsize)


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _empty(path):
  open(path, 'w').close()


def _flip_a_bit(path):
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize('damage, why', [
    (_truncate, 'bytes, not the'), (_empty, 'bytes, not the'),
    (_flip_a_bit, 'does not match the SHA-256')])
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_previous_restored(
    tmp_path, damage, why, caplog):
  directory = _saved(tmp_path)
  damage(_largest_file(directory / '3'))
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3)
  restored = ckpt.restore_newest_good(_state(0))
  assert int(restored['step']) == 2
  np.testing.assert_array_equal(restored['w'], _state(2)['w'])
  assert sorted(os.listdir(directory)) == ['1', '2', 'corrupt']
  assert os.listdir(directory / 'corrupt') == ['3']
  assert f'{directory / "3"} is damaged' in caplog.text and why in caplog.text
  # max_to_keep counts good checkpoints: the next save removes 1, never 2.
  ckpt.save(3, _state(3))
  ckpt.save(4, _state(4))
  ckpt.close()
  assert sorted(os.listdir(directory)) == ['2', '3', '4', 'corrupt']


def test_a_save_cut_short_is_never_read_and_none_left_starts_over(tmp_path, caplog):
  directory = _saved(tmp_path, steps=(1,))
  # What a kill during a save leaves: orbax's temporary directory, never renamed.
  shutil.copytree(directory / '1', directory / f'2{checkpoint.PARTIAL_SUFFIX}-1234')
  _empty(_largest_file(directory / '1'))
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3)
  assert 'a save cut short' in caplog.text
  assert ckpt.restore_newest_good(_state(0)) is None
  assert sorted(os.listdir(directory / 'corrupt')) == ['1', f'2{checkpoint.PARTIAL_SUFFIX}-1234']
  ckpt.close()


def test_a_checkpoint_without_a_manifest_is_left_to_orbax(tmp_path):
  """A kill between the end of a save and its manifest: the checkpoint is whole."""
  directory = _saved(tmp_path, steps=(1, 2))
  os.remove(directory / '2' / checkpoint.MANIFEST)
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3)
  assert int(ckpt.restore_newest_good(_state(0))['step']) == 2
  ckpt.close()


def test_an_intact_checkpoint_that_no_longer_fits_is_an_error_not_damage(tmp_path):
  """Files that match their manifest are never set aside: a state of another structure means
  the code or config changed, which the user must hear about."""
  _saved(tmp_path, steps=(1,))
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3)
  other = {**_state(0), 'momentum': np.zeros((64, 32), np.float32)}  # another optimizer
  with pytest.raises(errors.CheckpointError, match='intact but do not restore'):
    ckpt.restore_newest_good(other)
  ckpt.close()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']


def test_a_full_disk_stops_with_a_clear_error_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch):
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=1)
  ckpt.save(1, _state(1))
  ckpt.close()
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=1)
  # The write's last act, renaming the finished temporary directory, finds no space.
  real_rename = os.rename

  def no_space(src, dst, *args, **kwargs):
    if checkpoint.PARTIAL_SUFFIX in str(src):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_rename(src, dst, *args, **kwargs)

  monkeypatch.setattr(os, 'rename', no_space)
  with pytest.raises(errors.CheckpointError,
                     match=r'saving step 2 failed: No space left on device; the checkpoint of '
                           r'step 1 is intact .* Free disk space'):
    ckpt.save(2, _state(2))
    ckpt.close()
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=1)
  assert int(ckpt.restore_newest_good(_state(0))['step']) == 1
  ckpt.close()


def test_a_run_resumes_from_the_newest_good_checkpoint_and_compiles_once(tmp_path, caplog):
  config = tiny_config(checkpoint_every=2, max_to_keep=3)
  damaged = tmp_path / 'damaged'
  straight = train.train_and_evaluate(config, str(damaged))
  os.remove(damaged / 'results.json')
  _flip_a_bit(_largest_file(damaged / 'checkpoints' / '6'))
  steps.TRACES.clear()
  caplog.set_level(logging.INFO)
  resumed = train.train_and_evaluate(config, str(damaged))
  assert steps.TRACES == {'train_step': 1, 'eval_step': 1}, 'the resumed run compiles once'
  assert 'Resumed from step 4' in caplog.text
  assert os.listdir(damaged / 'checkpoints' / 'corrupt') == ['6']
  assert sorted(os.listdir(damaged / 'checkpoints')) == ['2', '4', '6', 'corrupt']
  assert resumed['final'] == straight['final']
  events = [(e['step'], e['split']) for e in map(json.loads, open(damaged / 'metrics.jsonl'))]
  assert events == sorted(set(events), key=lambda e: (e[0], e[1] != 'train'))

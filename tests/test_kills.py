"""Kills and stop signals at many moments cost only the steps since the last checkpoint.

Each run is the real CLI. A killed run is restarted with the same command until it
finishes; the result must be the uninterrupted run's, bit for bit.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from finetune_jax import checkpoint
from finetune_jax import failpoints
from cli_forks import CliForks
from test_main import TINY

ROOT = os.path.join(os.path.dirname(__file__), '..')
FLAGS = ['--config=configs/default.py:smoke', *TINY, '--config.total_steps=24',
         '--config.checkpoint_every=4', '--config.eval_every=6', '--config.log_every=2',
         '--config.eval_before_training=true']


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """One device, and every program compiled once for all the runs here (JAX's cache)."""
  return {'XLA_FLAGS': '', 'JAX_COMPILATION_CACHE_DIR': str(tmp_path_factory.mktemp('jax')),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


@pytest.fixture(scope='module')
def cli(env, reference):
  """The interrupted runs fork from a server with the libraries imported (cli_forks.py), each
  as `python -m finetune_jax.main` would run; the reference run is a plain subprocess."""
  with CliForks(env=env) as forks:
    yield forks


def _start(cli, workdir, failpoint=''):
  return cli.start('finetune_jax.main', [f'--workdir={workdir}', *FLAGS],
                   env={failpoints.ENV: failpoint})


def _finish(cli, pid):
  result = cli.wait(pid)
  return result.code, result.stdout, result.stderr


def _last_step(workdir):
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      lines = [l for l in f if l.endswith('\n')]
    return json.loads(lines[-1])['step'] if lines else -1
  except FileNotFoundError:
    return -1


def _kill_at_step(cli, workdir, step, rng):
  """SIGKILL once training has logged `step`, after a random few milliseconds."""
  pid = _start(cli, workdir)
  while _last_step(workdir) < step and not _exited(pid):
    time.sleep(0.005)
  time.sleep(rng.uniform(0, 0.05))
  os.kill(pid, signal.SIGKILL)
  return _finish(cli, pid)


def _exited(pid):
  try:  # a child of the server, not of this process: probe it
    os.kill(pid, 0)
    with open(f'/proc/{pid}/stat') as f:
      return f.read().split()[2] == 'Z'
  except (ProcessLookupError, FileNotFoundError):
    return True


def _final_params(workdir):
  with ocp.StandardCheckpointer() as reader:
    state = reader.restore(os.path.join(workdir, 'checkpoints', '24', 'default'))
  return state['trainable'], state['opt_state']


def _events(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def reference(tmp_path_factory, env):
  workdir = tmp_path_factory.mktemp('straight')
  proc = subprocess.run([sys.executable, '-m', 'finetune_jax.main', f'--workdir={workdir}',
                         *FLAGS], capture_output=True, text=True, cwd=ROOT, timeout=600,
                        env={**os.environ, **env})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_kills_at_random_moments_cost_nothing_but_time(cli, tmp_path, reference):
  rng = random.Random(0)
  workdir = tmp_path / 'killed'
  ckpts = workdir / 'checkpoints'
  # 1. During a checkpoint save: the write has started and not finished.
  code, _, err = _finish(cli, _start(cli, workdir, 'save:2=kill'))
  assert code == -signal.SIGKILL, err[-2000:]
  partial = [n for n in os.listdir(ckpts) if checkpoint.PARTIAL_SUFFIX in n]
  assert partial and '4' in os.listdir(ckpts)  # step 8's save was cut short; 4 is whole
  # 2. During an evaluation: this run resumes at step 4, so its 3rd eval batch is step 6's.
  code, _, err = _finish(cli, _start(cli, workdir, 'eval_batch:3=kill'))
  assert code == -signal.SIGKILL, err[-2000:]
  assert os.listdir(ckpts / 'corrupt') == partial  # never read, set aside
  # 3. Half-way through a line of metrics.jsonl.
  code, _, err = _finish(cli, _start(cli, workdir, 'metrics_line:4=kill'))
  assert code == -signal.SIGKILL, err[-2000:]
  assert not open(workdir / 'metrics.jsonl').read().endswith('\n')
  # 4-6. At random moments of training.
  for _ in range(3):
    code, _, err = _kill_at_step(cli, workdir, rng.randrange(2, 22), rng)
    assert code in (-signal.SIGKILL, 0), err[-2000:]
  code, out, err = _finish(cli, _start(cli, workdir))
  assert code == 0, err[-3000:]

  trainable, opt_state = _final_params(workdir)
  expected_trainable, expected_opt_state = _final_params(reference)
  for got, want in ((trainable, expected_trainable), (opt_state, expected_opt_state)):
    np.testing.assert_equal(got, want)  # bit-identical
  assert _events(workdir) == _events(reference)  # each event once, in order, same values
  results = json.loads((workdir / 'results.json').read_text())
  expected = json.loads((reference / 'results.json').read_text())
  assert results['final'] == expected['final'] and results['initial'] == expected['initial']
  written = os.stat(workdir / 'results.json').st_mtime_ns
  code, _, err = _finish(cli, _start(cli, workdir))  # finished: it ends at once, results.json as it was
  assert code == 0 and os.stat(workdir / 'results.json').st_mtime_ns == written, err[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_the_current_step_and_the_rerun_continues(
    cli, tmp_path, reference, signum):
  workdir = tmp_path / 'stopped'
  pid = _start(cli, workdir)
  while _last_step(workdir) < 10 and not _exited(pid):
    time.sleep(0.005)
  signalled = time.monotonic()
  os.kill(pid, signum)
  code, _, err = _finish(cli, pid)
  assert time.monotonic() - signalled < 10
  assert code == 128 + signum, err[-3000:]
  assert 'To resume, run the same command again: python -m finetune_jax.main' in err
  saved = max(int(n) for n in os.listdir(workdir / 'checkpoints') if n.isdigit())
  assert 10 <= saved < 24  # the step it was on
  code, _, err = _finish(cli, _start(cli, workdir))
  assert code == 0, err[-3000:]
  assert f'Resumed from step {saved}' in err
  np.testing.assert_equal(_final_params(workdir), _final_params(reference))
  # The same events, values included, except that the train event closing the stopped
  # window (log_every=2) averages only the steps run after the resume.
  window = saved + saved % 2
  same = lambda events: [e if (e['step'], e['split']) != (window, 'train') else e['step']
                         for e in events]
  assert same(_events(workdir)) == same(_events(reference))


@pytest.mark.slow
def test_a_second_signal_during_the_save_exits_at_once_and_loses_nothing(
    cli, tmp_path, reference):
  workdir = tmp_path / 'twice'
  # The first SIGTERM arrives during step 12's eval (4 batches an eval, from step 0); the
  # second just after the save it asks for (the 3rd, after steps 4 and 8) has started.
  code, _, err = _finish(cli, _start(cli, workdir, 'eval_batch:10=term,save:3=term'))
  assert code == 128 + signal.SIGTERM and 'SIGTERM again: exiting now' in err, err[-3000:]
  code, _, err = _finish(cli, _start(cli, workdir))
  assert code == 0, err[-3000:]
  np.testing.assert_equal(_final_params(workdir), _final_params(reference))
  assert _events(workdir) == _events(reference)

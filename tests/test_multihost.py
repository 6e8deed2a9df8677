"""Two processes of two host devices each, on localhost over gloo, train as one process of
four devices does, and write one set of checkpoints and metrics."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.join(os.path.dirname(__file__), '..')
RUN = ['--config=configs/default.py:smoke', '--config.pretrained=efficientnet-lite-tiny',
       '--config.dataset=mnist5k', '--config.image_size=32', '--config.batch_size=32',
       '--config.eval_batch_size=64', '--config.peft.num_frozen_blocks=2',
       '--config.parallel=fsdp', '--config.cache_frozen_features=off']


def _cli(workdir, devices, *flags, **popen):
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  return subprocess.Popen([sys.executable, '-m', 'finetune_jax.main', f'--workdir={workdir}',
                           *RUN, *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **popen)


def _finish(proc):
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return out, err


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _params(workdir, step):
  """The trainable params saved at `step`, as host arrays whatever devices saved them."""
  directory = os.path.join(workdir, 'checkpoints', str(step), 'default')
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(directory).item_metadata
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), metadata)
  return checkpointer.restore(directory, target)['trainable']


@pytest.mark.slow
def test_two_processes_train_as_one_process_of_four_devices(tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  _finish(_cli(one, 4))
  port = _free_port()
  procs = [_cli(two, 2, f'--config.distributed.coordinator=localhost:{port}',
                '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}')
           for i in range(2)]
  logs = [_finish(p)[1] for p in procs]
  assert 'Process 1 of 2; 2 local of 4 devices.' in logs[1]

  flat = lambda tree, prefix='': (
      {k: v for key, sub in tree.items() for k, v in flat(sub, f'{prefix}{key}/').items()}
      if isinstance(tree, dict) else {prefix: tree})
  reference, params = flat(_params(one, 6)), flat(_params(two, 6))
  assert reference.keys() == params.keys()
  for path, value in reference.items():
    np.testing.assert_allclose(params[path], value, rtol=1e-5, atol=1e-6, err_msg=path)
  # One set of files: process 0 alone writes metrics and results; the checkpoints are one.
  assert (one / 'metrics.jsonl').read_text().count('\n') == \
      (two / 'metrics.jsonl').read_text().count('\n')
  assert sorted(os.listdir(two / 'checkpoints')) == ['3', '6']
  assert json.loads((two / 'results.json').read_text())['steps'] == 6


def test_an_unreachable_coordinator_is_a_timeout_that_names_it(tmp_path):
  port = _free_port()  # nothing listens there
  proc = _cli(tmp_path / 'run', 1, f'--config.distributed.coordinator=localhost:{port}',
              '--config.distributed.num_processes=2', '--config.distributed.process_id=1',
              '--config.distributed.timeout_s=5')
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, err[-3000:]
  assert f'Could not join the coordinator at localhost:{port} within 5 s' in err
  assert not (tmp_path / 'run').exists()


def test_a_preemption_sync_point_saves_that_step_and_the_rerun_resumes(tmp_path, monkeypatch):
  """At the sync point every process saves the step it reached and the run returns; the
  same call resumes there (the sync point itself is JAX's, faked here at step 4)."""
  from finetune_jax import checkpoint
  from finetune_jax import train
  from test_main import tiny_config
  config = tiny_config(checkpoint_every=3)
  monkeypatch.setattr(checkpoint.Checkpointer, 'reached_preemption',
                      lambda self, step: step == 4)
  stopped = train.train_and_evaluate(config, str(tmp_path))
  assert stopped['preempted_at'] == 4 and not (tmp_path / 'results.json').exists()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '4']
  monkeypatch.undo()
  resumed = train.train_and_evaluate(config, str(tmp_path))
  straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  assert resumed['steps'] == 6
  np.testing.assert_allclose(resumed['final']['eval_loss'], straight['final']['eval_loss'],
                             rtol=1e-5)

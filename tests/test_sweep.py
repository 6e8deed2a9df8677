"""Sweeps and their reports: the grid, run names, bad axes, and real sweeps end to end."""
import csv
import json
import os
import subprocess
import sys

import pytest

from finetune_jax import errors
from finetune_jax import report
from finetune_jax import study

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'configs'))
import default  # noqa: E402  (configs/default.py)

ROOT = os.path.join(os.path.dirname(__file__), '..')
# The default config shrunk to a few seconds a run.
TINY = ['--config.pretrained=efficientnet-lite-tiny', '--config.dataset=mnist5k',
        '--config.image_size=32', '--config.peft.num_frozen_blocks=2', '--config.batch_size=32',
        '--config.eval_batch_size=500']


def sweep_cli(workdir, *flags, config='configs/default.py:smoke', timeout=900, tiny=TINY):
  return subprocess.run(
      [sys.executable, '-m', 'finetune_jax.sweep', f'--config={config}',
       f'--workdir={workdir}', *tiny, *flags],
      capture_output=True, text=True, cwd=ROOT, env={**os.environ, 'XLA_FLAGS': ''},
      timeout=timeout)


def test_values_take_their_fields_types():
  config = default.get_config()
  assert study.parse_axis(config, 'learning_rate=1e-3,3e-4') == ('learning_rate', [1e-3, 3e-4])
  assert study.parse_axis(config, 'method=bitfit,lora') == ('peft.method', ['bitfit', 'lora'])
  assert study.parse_axis(config, "peft.lora.targets=('q','v'),('q',)") == (
      'peft.lora.targets', [('q', 'v'), ('q',)])
  assert study.parse_axis(config, 'augment.flip=true,False') == ('augment.flip', [True, False])
  # A string field keeps the text as written, digits included.
  assert study.parse_axis(config, 'eval_split=test,123') == ('eval_split', ['test', '123'])
  assert study.parse_axis(config, 'head_learning_rate=None,0.01') == (
      'head_learning_rate', [None, 0.01])


@pytest.mark.parametrize('axis,message', [
    ('peft.methd=lora', "'peft.methd'"),
    ('total_steps=1.5', "'1.5' is not of the field's type, int"),
    ('total_steps=', 'has no values'),
    ('learning_rate', 'is not <key>=<v1>,<v2>'),
    ('learning_rate=0.1,-1.0', 'learning_rate=-1.0 must be positive'),
])
def test_a_bad_axis_is_one_clear_error(axis, message):
  config = default.get_config()
  with pytest.raises(errors.ConfigError, match='.*'.join(map(_escape, message.split('.*')))):
    study.grid(config, [study.parse_axis(config, axis)], [{}], None)


def _escape(text):
  import re  # pylint: disable=import-outside-toplevel
  return re.escape(text)


def test_grid_is_the_product_of_axes_study_points_and_seeds():
  config = default.get_config()
  axes = [study.parse_axis(config, 'method=bitfit,lora'),
          study.parse_axis(config, 'learning_rate=0.1,0.01,0.001')]
  points = study.grid(config, axes, [{'total_steps': 10}, {'total_steps': 20}], seeds=2)
  assert len(points) == 2 * 2 * 3 * 2
  assert points[0] == {'total_steps': 10, 'peft.method': 'bitfit', 'learning_rate': 0.1, 'seed': 0}
  assert len({study.run_name(p) for p in points}) == len(points)
  with pytest.raises(errors.ConfigError, match='swept twice'):
    study.grid(config, axes + [axes[0]], [{}], None)


def test_run_names_are_readable_filesystem_safe_and_stable():
  name = study.run_name({'peft.method': 'lora', 'learning_rate': 0.001,
                         'peft.lora.targets': ('q', 'v'), 'dataset': 'folder:/data/x y'})
  assert name == 'peft.method=lora,learning_rate=0.001,peft.lora.targets=q-v,dataset=folder-data-x-y'
  assert '/' not in name and ' ' not in name
  assert study.run_name({}) == 'run'


def test_get_sweep_in_the_config_file_multiplies_the_cli_axes(tmp_path):
  study_file = tmp_path / 'study.py'
  study_file.write_text(
      'import sys\nsys.path.insert(0, %r)\nimport default\n'
      'def get_config(arg=None):\n  return default.get_config(arg)\n'
      'def get_sweep(arg=None):\n'
      '  return [{"method": "bitfit"}, {"method": "lora", "peft.lora.rank": 4}]\n'
      % os.path.join(ROOT, 'configs'))
  proc = sweep_cli(tmp_path / 'runs', '--sweep=learning_rate=0.1,0.01', '--dry_run',
                   config=f'{study_file}:smoke', timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  commands = proc.stdout.strip().splitlines()
  assert len(commands) == 4
  assert not (tmp_path / 'runs').exists()  # a dry run writes nothing
  assert commands[-1].endswith('--config.peft.method=lora --config.peft.lora.rank=4 '
                               '--config.learning_rate=0.01')
  assert all('-m finetune_jax.main' in c and '--config.pretrained=efficientnet-lite-tiny' in c
             for c in commands)


def test_a_bad_axis_through_the_cli_writes_nothing(tmp_path):
  proc = sweep_cli(tmp_path / 'runs', '--sweep=total_steps=1.5', timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --sweep total_steps: '1.5'")
  assert not (tmp_path / 'runs').exists()


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_report_row_carries_the_initial_metrics_and_the_feature_drift():
  run = {'name': 'peft.method=lora,seed=0', 'config': {'peft.method': 'lora', 'seed': 0},
         'status': 'finished', 'error': None,
         'results': {'final': {'eval_accuracy': 0.9}, 'initial': {'eval_accuracy': 0.1},
                     'feature_drift': {'cka': 0.7, 'cosine': 0.6, 'examples': 2000}}}
  (row,) = report.rows([run], ['peft.method'])
  assert row['eval_accuracy'] == 0.9 and row['initial_eval_accuracy'] == 0.1
  assert row['feature_drift_cka'] == 0.7 and row['feature_drift_cosine'] == 0.6
  assert 'feature_drift_examples' not in row


def test_sweep_runs_resumes_skips_and_reports_a_failed_run(tmp_path):
  workdir = tmp_path / 'runs'
  flags = ['--sweep=learning_rate=0.003,0.001', '--sweep=dataset=mnist5k,folder:/nonexistent',
           '--workers=2']
  tiny = [f for f in TINY if not f.startswith('--config.dataset=')]
  proc = sweep_cli(workdir, *flags, tiny=tiny)
  # The folder dataset does not exist: those two runs fail, the others finish.
  assert proc.returncode == 1, proc.stderr[-3000:]
  failed = 'learning_rate=0.003,dataset=folder-nonexistent'
  assert ('2 of 4 runs failed: learning_rate=0.001,dataset=folder-nonexistent, '
          f'{failed}') in proc.stderr
  rows = {r['run']: r for r in read_csv(workdir / 'summary.csv')}
  assert set(rows) == {f'learning_rate={lr},dataset={d}' for lr in ('0.003', '0.001')
                       for d in ('mnist5k', 'folder-nonexistent')}
  finished = rows['learning_rate=0.001,dataset=mnist5k']
  assert finished['status'] == 'finished' and rows[failed]['status'] == 'failed'
  assert '/nonexistent' in rows[failed]['error']
  for column in ('learning_rate', 'dataset', 'seed', 'eval_accuracy', 'eval_loss',
                 'trainable_params', 'trainable_percent', 'optimizer_state_bytes',
                 'train_examples_per_sec', 'peak_memory_bytes', 'wall_s'):
    assert finished[column] != '', column
  results = json.loads((workdir / 'learning_rate=0.001,dataset=mnist5k' / 'results.json').read_text())
  assert float(finished['eval_accuracy']) == results['final']['eval_accuracy']
  assert results['peak_memory_bytes'] > 100e6  # jax alone takes more
  summary = (workdir / 'summary.md').read_text()
  assert 'no validation split' in summary and 'Failed runs' in summary
  for png in ('eval_accuracy_vs_learning_rate.png', 'learning_curves.png', 'cost_quality.png'):
    assert (workdir / png).read_bytes()[:4] == b'\x89PNG', png

  # Started again, the finished runs are skipped and the summary is the same,
  # and the report on its own (over the run directories) agrees.
  before = (workdir / 'summary.csv').read_text()
  again = sweep_cli(workdir, *flags, tiny=tiny)
  assert again.returncode == 1
  assert '2 already finished, 2 to run' in again.stdout
  assert (workdir / 'summary.csv').read_text() == before
  out = tmp_path / 'report'
  proc = subprocess.run([sys.executable, '-m', 'finetune_jax.report', f'--out={out}',
                         *(str(workdir / r) for r in sorted(rows))],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  mine = {r['run']: r for r in read_csv(out / 'summary.csv')}
  assert mine[failed]['status'] == 'failed'
  assert mine['learning_rate=0.001,dataset=mnist5k']['eval_accuracy'] == finished['eval_accuracy']


@pytest.mark.slow
def test_a_sweep_through_a_local_ray_cluster(tmp_path):
  workdir = tmp_path / 'runs'
  proc = sweep_cli(workdir, '--executor=ray', '--workers=2', '--sweep=peft.method=bitfit,linear_probe')
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  rows = read_csv(workdir / 'summary.csv')
  assert sorted(r['peft.method'] for r in rows) == ['bitfit', 'linear_probe']
  assert all(r['status'] == 'finished' for r in rows)
  # The report's grouping over seeds: here one run per setting.
  assert '| peft.method | n |' in (workdir / 'summary.md').read_text()
  assert report.find_runs([str(workdir)]) == sorted(str(workdir / r['run']) for r in rows)

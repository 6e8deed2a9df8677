"""Runs a study: a grid of training runs, each the ordinary training CLI in its own workdir.

  python -m finetune_jax.sweep --config configs/default.py:smoke --workdir runs/study \
      [--sweep peft.method=bitfit,lora] [--sweep learning_rate=1e-3,3e-4] [--seeds 3] \
      [--workers 2] [--executor local|ray] [--dry_run] [--config.<key>=<value> ...]

Each --sweep adds an axis; the runs are the axes' cartesian product (times the
config file's `get_sweep(arg)` list of override dicts, where it defines one),
times --seeds seeds 0..N-1. Run `<workdir>/<name>/` is
`python -m finetune_jax.main --config <file> --workdir <workdir>/<name>
--config.<key>=<value> ...`, so it resumes where it stopped, and a finished run
is skipped: the sweep can be stopped and started again at any time. A failed run
does not stop the others; the sweep names it and exits non-zero at the end.
After the runs, the report (report.py) is written into the workdir.
"""
import json
import os
import shlex
import sys

from absl import flags
from ml_collections import config_flags

from finetune_jax import cli
from finetune_jax import errors
from finetune_jax import report
from finetune_jax import study

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'The study directory: one subdirectory per run.')
config_flags.DEFINE_config_file(
    'config', None, 'A configs/<name>.py file, optionally with :<arg>.', lock_config=True)
flags.DEFINE_multi_string('sweep', [], 'An axis, <key>=<v1>,<v2>,...; repeat for more axes.')
flags.DEFINE_integer('seeds', None, 'Run every point with seeds 0..N-1 (overrides `seed`).')
flags.DEFINE_integer('workers', 1, 'Runs at once (local: processes sharing the cores).')
flags.DEFINE_enum('executor', 'local', ['local', 'ray'], 'Where the runs execute.')
flags.DEFINE_string('ray_address', None, 'A Ray cluster to submit to; none: a local one.')
flags.DEFINE_bool('dry_run', False, 'Print one training command per line and run nothing.')
flags.mark_flags_as_required(['config', 'workdir'])

# ------------------------------------------------------------ the CLI


def main(argv):
  if len(argv) > 1:
    raise ValueError(f'Unexpected arguments {argv[1:]}; flags take the form --name=value.')
  config = FLAGS.config
  config_arg = FLAGS['config'].config_filename
  overrides = dict(FLAGS['config'].override_values)
  if FLAGS.workers < 1:
    raise errors.ConfigError('workers', f'--workers={FLAGS.workers} must be at least 1.')
  axes = [study.parse_axis(config, text) for text in FLAGS.sweep]
  points = study.grid(config, axes, study.load_study(config_arg), FLAGS.seeds)
  clash = sorted(set().union(*points) & set(overrides))
  if clash:
    raise errors.ConfigError(clash[0], f'{clash[0]} is both swept and set by '
                             f'--config.{clash[0]}; drop one.')
  root = FLAGS.workdir
  runs = study.make_runs(config_arg, overrides, points, root)
  if FLAGS.dry_run:
    for run in runs:
      print(shlex.join(run.command))
    return
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, report.SWEEP_FILE), 'w') as f:
    json.dump({'config': config_arg, 'overrides': overrides, 'keys': study.keys(points),
               'runs': {run.name: run.overrides for run in runs}}, f, indent=2)
  todo = [run for run in runs
          if not study.is_finished(run.workdir(root), run.overrides.get('total_steps',
                                                                         config.total_steps))]
  print(f'[sweep] {len(runs)} runs: {len(runs) - len(todo)} already finished, {len(todo)} to '
        f'run ({FLAGS.executor}, {FLAGS.workers} at once).', flush=True)
  if FLAGS.executor == 'ray':
    outcomes = study.run_ray(todo, root, FLAGS.workers, FLAGS.ray_address)
  else:
    outcomes = study.run_local(todo, root, FLAGS.workers)
  written = report.write(root, [run.workdir(root) for run in runs])
  print(f'[sweep] wrote {", ".join(written)}', flush=True)
  failed = sorted(name for name, (code, _) in outcomes.items() if code)
  if failed:
    print(f'[sweep] {len(failed)} of {len(runs)} runs failed: {", ".join(failed)} (see '
          f'{study.FAILED_FILE} and {study.LOG_FILE} in each).', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  cli.run(main)

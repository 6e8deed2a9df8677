"""A study's report from its run directories: summary.csv, summary.md and plots.

  python -m finetune_jax.report <dir> [<dir> ...] [--out <dir>]

Each <dir> is a run directory (it holds config.json) or a directory of them (a
sweep's workdir). The report goes into --out, by default the sweep's workdir
(the one <dir> given, or the runs' common parent):

- summary.csv: one row per run: its swept keys, seed, status (finished, failed,
  incomplete), every final metric under its results.json name, the initial ones
  as initial_<name>, the feature drift (feature_drift_cka, feature_drift_cosine)
  where measured, the cost figures and, for a failed run, its error;
- summary.md: the runs grouped over seeds (mean ± std and n), sorted by the
  selection metric, a validation metric where the runs have one, with the test
  metrics of the setting it selects;
- <metric>_vs_<key>.png for each swept numeric key, learning_curves.png and
  cost_quality.png (the metric against trainable params, log scale).

The swept keys are the sweep's (sweep.json), else the config fields that differ
between the runs.
"""
import json
import math
import os

from absl import flags

from finetune_jax import cli

SWEEP_FILE = 'sweep.json'
FAILED_FILE = 'failed.json'
# Candidates for selection, best first: (metric, higher is better). Validation
# metrics come first; a test metric is used only when the runs have no other.
SELECTION = (('val_accuracy', True), ('val_macro_f1', True), ('val_loss', False),
             ('eval_accuracy', True), ('eval_macro_f1', True), ('eval_loss', False))
COST_COLUMNS = ('trainable_params', 'trainable_percent', 'optimizer_state_bytes',
                'train_examples_per_sec', 'peak_memory_bytes', 'wall_s')


# ------------------------------------------------------------ reading runs


def is_run(path: str) -> bool:
  """A run's directory: it has a config.json, or failed before writing one."""
  return any(os.path.exists(os.path.join(path, f)) for f in ('config.json', FAILED_FILE))


def find_runs(dirs: list[str]) -> list[str]:
  """The run directories in `dirs`: each one itself, or its subdirectories that are runs."""
  runs = []
  for path in dirs:
    if not os.path.isdir(path):
      raise ValueError(f'{path} is not a directory; give run directories or a sweep workdir.')
    if is_run(path):
      runs.append(path)
    else:
      runs += sorted(os.path.join(path, d) for d in os.listdir(path)
                     if is_run(os.path.join(path, d)))
  if not runs:
    raise ValueError(f'No run directories (with a config.json) in {dirs}.')
  return runs


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = tuple(value) if isinstance(value, list) else value
  return out


def read_run(path: str, overrides: dict | None = None) -> dict:
  """{'config': flat config, 'results': results.json or None, 'status', 'error'}.

  `overrides` (the sweep's, for this run) stand in for a config.json that a run
  which failed at startup never wrote.
  """
  config = flatten(_read_json(os.path.join(path, 'config.json')) or {})
  for key, value in (overrides or {}).items():
    config.setdefault(key, tuple(value) if isinstance(value, list) else value)
  results = _read_json(os.path.join(path, 'results.json'))
  failed = _read_json(os.path.join(path, FAILED_FILE))
  if results and results.get('steps', -1) >= config.get('total_steps', math.inf):
    status = 'finished'
  elif failed:
    status = 'failed'
  else:
    status = 'incomplete'
  return {'path': path, 'name': os.path.basename(os.path.normpath(path)), 'config': config,
          'results': results, 'status': status, 'error': (failed or {}).get('error', '')}


def swept_keys(runs: list[dict], out: str) -> list[str]:
  """The sweep's keys (sweep.json in `out`), else the config fields that differ."""
  sweep = _read_json(os.path.join(out, SWEEP_FILE))
  if sweep:
    return [k for k in sweep['keys'] if k != 'seed']
  keys = sorted(set().union(*(r['config'] for r in runs)))
  varying = [k for k in keys if k not in ('seed',)
             and len({repr(r['config'].get(k)) for r in runs}) > 1]
  return varying


def rows(runs: list[dict], keys: list[str]) -> list[dict]:
  """summary.csv's rows."""
  table = []
  for run in runs:
    results = run['results'] or {}
    row = {'run': run['name'], **{k: run['config'].get(k) for k in keys},
           'seed': run['config'].get('seed'), 'status': run['status']}
    row.update(results.get('final', {}))
    row.update({f'initial_{k}': v for k, v in results.get('initial', {}).items()})
    drift = results.get('feature_drift') or {}
    row.update({f'feature_drift_{k}': v for k, v in drift.items() if k != 'examples'})
    row.update({k: results.get(k) for k in COST_COLUMNS})
    row['error'] = run['error']
    table.append(row)
  return table


def selection_metric(table: list[dict]) -> tuple[str, bool] | None:
  for name, higher in SELECTION:
    if any(row.get(name) is not None and row['status'] == 'finished' for row in table):
      return name, higher
  return None


# ------------------------------------------------------------ writing


def write(out: str, run_dirs: list[str]) -> list[str]:
  """Writes the report of `run_dirs` into `out`; returns the files written."""
  import pandas as pd  # pylint: disable=import-outside-toplevel
  sweep = _read_json(os.path.join(out, SWEEP_FILE)) or {'runs': {}}
  runs = [read_run(path, sweep['runs'].get(os.path.basename(os.path.normpath(path))))
          for path in run_dirs]
  keys = swept_keys(runs, out)
  table = pd.DataFrame(rows(runs, keys)).convert_dtypes()  # ints stay ints beside missing values
  for key in keys:  # tuples as their repr, so the csv reads back and groups
    if table[key].map(lambda v: isinstance(v, tuple)).any():
      table[key] = table[key].map(repr)
  os.makedirs(out, exist_ok=True)
  written = [os.path.join(out, 'summary.csv')]
  table.to_csv(written[0], index=False)
  selection = selection_metric(rows(runs, keys))
  written.append(os.path.join(out, 'summary.md'))
  with open(written[-1], 'w') as f:
    f.write(markdown(table, keys, selection))
  written += plots(out, table, runs, keys, selection)
  return written


def grouped(table, keys: list[str], selection):
  """Finished runs grouped over seeds: mean and std of every numeric column, and n."""
  finished = table[table['status'] == 'finished']
  metrics = [c for c in finished.columns
             if c not in keys + ['run', 'seed', 'status', 'error']
             and finished[c].notna().any() and _numeric(finished[c])]
  if finished.empty or not metrics:
    return None, metrics
  by = keys or (lambda _: 'all')
  stats = finished.groupby(by, dropna=False)[metrics].agg(['mean', 'std'])
  stats[('n', '')] = finished.groupby(by, dropna=False).size()
  if selection:
    stats = stats.sort_values((selection[0], 'mean'), ascending=not selection[1])
  return stats, metrics


def _numeric(column) -> bool:
  return column.dropna().map(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)).all()


def _cell(mean, std, n) -> str:
  if mean is None or (isinstance(mean, float) and math.isnan(mean)):
    return ''
  big = abs(mean) >= 1000  # counts, bytes and seconds: whole numbers read better
  text = f'{mean:,.0f}' if big else f'{mean:.4g}'
  if n > 1 and std == std:
    text += f' ± {std:,.0f}' if big else f' ± {std:.2g}'
  return text


def markdown(table, keys: list[str], selection) -> str:
  counts = table['status'].value_counts().to_dict()
  lines = [f'# Summary of {len(table)} runs',
           '', ', '.join(f'{n} {s}' for s, n in sorted(counts.items())) + '.', '']
  stats, metrics = grouped(table, keys, selection)
  if selection and not selection[0].startswith('val_'):
    lines += [f'These runs have no validation split, so the rows are sorted on the test '
              f'split\'s `{selection[0]}`: do not select a setting on it (set '
              '`validation_examples`).', '']
  if stats is not None:
    first = [selection[0]] if selection else []
    order = first + [m for m in metrics if m not in first]
    lines.append(f'Mean ± std over seeds (n finished runs), sorted by '
                 f'`{selection[0] if selection else "-"}`:')
    lines.append('')
    lines.append('| ' + ' | '.join(keys + ['n'] + order) + ' |')
    lines.append('|' + '---|' * (len(keys) + 1 + len(order)))
    for index, row in stats.iterrows():
      index = index if isinstance(index, tuple) else (index,)
      values = [str(v) for v in index][:len(keys)]
      n = int(row[('n', '')])
      values.append(str(n))
      values += [_cell(row[(m, 'mean')], row[(m, 'std')], n) for m in order]
      lines.append('| ' + ' | '.join(values) + ' |')
    if selection and selection[0].startswith('val_'):
      best = stats.index[0] if keys else None
      test = selection[0].replace('val_', 'eval_', 1)
      if (test, 'mean') in stats.columns:
        row = stats.iloc[0]
        setting = ', '.join(f'{k}={v}' for k, v in zip(keys, best if isinstance(best, tuple)
                                                          else (best,))) or 'the one setting'
        lines += ['', f'Selected on validation (`{selection[0]}`): {setting}; its test '
                  f'`{test}`: {_cell(row[(test, "mean")], row[(test, "std")], int(row[("n", "")]))}.']
  failed = table[table['status'] == 'failed']
  if len(failed):
    lines += ['', 'Failed runs:', '']
    lines += [f'- {r.run}: {r.error}' for r in failed.itertuples()]
  return '\n'.join(lines) + '\n'


def plots(out: str, table, runs: list[dict], keys: list[str], selection) -> list[str]:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  if not selection:
    return []
  metric, _ = selection
  finished = table[table['status'] == 'finished']
  written = []

  def save(fig, name):
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

  for key in keys:
    values = finished[key].dropna()
    if values.empty or not _numeric(values):
      continue
    others = [k for k in keys if k != key]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, group in (finished.groupby(others, dropna=False) if others else [('', finished)]):
      stats = group.groupby(key)[metric].agg(['mean', 'std']).sort_index()
      ax.errorbar(stats.index, stats['mean'], yerr=stats['std'].fillna(0), marker='o',
                  capsize=3, label=_label(others, label))
    if values.min() > 0 and values.max() / values.min() >= 3:
      ax.set_xscale('log')
    ticks = sorted(set(values))
    if len(ticks) <= 12:  # the swept values themselves, not the axis's own ticks
      ax.set_xticks(ticks, [f'{t:g}' for t in ticks])
      ax.minorticks_off()
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    if others:
      ax.legend(fontsize=7)
    save(fig, f'{metric}_vs_{key}.png')

  fig, ax = plt.subplots(figsize=(6, 4))
  for run in runs:
    steps, values = _curve(run['path'], metric)
    if steps:
      ax.plot(steps, values, marker='.', label=run['name'])
  ax.set_xlabel('step')
  ax.set_ylabel(metric)
  if len(runs) <= 12:
    ax.legend(fontsize=6)
  save(fig, 'learning_curves.png')

  if 'trainable_params' in finished and finished['trainable_params'].notna().any():
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, group in (finished.groupby(keys, dropna=False) if keys else [('', finished)]):
      ax.errorbar(group['trainable_params'].mean(), group[metric].mean(),
                  yerr=group[metric].std() if len(group) > 1 else 0, marker='o', capsize=3)
      ax.annotate(_label(keys, label), (group['trainable_params'].mean(), group[metric].mean()),
                  fontsize=7, xytext=(3, 3), textcoords='offset points')
    ax.set_xscale('log')
    ax.set_xlabel('trainable params')
    ax.set_ylabel(metric)
    save(fig, 'cost_quality.png')
  return written


def _label(keys: list[str], values) -> str:
  values = values if isinstance(values, tuple) else (values,)
  return ', '.join(f'{k.rsplit(".", 1)[-1]}={v}' for k, v in zip(keys, values))


def _curve(path: str, metric: str) -> tuple[list, list]:
  """(steps, values) of `metric` in the run's eval events."""
  steps, values = [], []
  metrics_file = os.path.join(path, 'metrics.jsonl')
  if os.path.exists(metrics_file):
    with open(metrics_file) as f:
      for line in f:
        event = json.loads(line) if line.strip() else {}
        if event.get('split') == 'eval' and metric in event:
          steps.append(event['step'])
          values.append(event[metric])
  return steps, values


# ------------------------------------------------------------ the CLI


def default_out(dirs: list[str], run_dirs: list[str]) -> str:
  """The sweep workdir given, else the run directories' common parent."""
  if len(dirs) == 1 and run_dirs != [dirs[0]]:
    return dirs[0]
  paths = [os.path.abspath(d) for d in run_dirs]
  common = os.path.commonpath(paths)
  return os.path.dirname(common) if common in paths else common


def main(argv):
  dirs = argv[1:]
  if not dirs:
    raise ValueError('Give one or more run directories or sweep workdirs: '
                     'python -m finetune_jax.report <dir> [<dir> ...].')
  run_dirs = find_runs(dirs)
  for path in write(flags.FLAGS.out or default_out(dirs, run_dirs), run_dirs):
    print(path)


if __name__ == '__main__':
  flags.DEFINE_string('out', None, 'Where to write; default: the sweep workdir given, or the '
                      'runs\' common parent.')
  cli.run(main)

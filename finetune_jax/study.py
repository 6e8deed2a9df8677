"""A study's runs: the grid of overrides, their names and commands, and their execution.

The library behind `python -m finetune_jax.sweep` (sweep.py, the CLI): every run
is the training CLI (`python -m finetune_jax.main`) in `<root>/<name>/`, so it
resumes, and a finished one is skipped.
"""
import concurrent.futures
import copy
import dataclasses
import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import sys

from finetune_jax import base_config
from finetune_jax import config_checks
from finetune_jax import errors
from finetune_jax import report

# What a run leaves when it fails (the report reads it); a new attempt removes it.
FAILED_FILE = report.FAILED_FILE
LOG_FILE = 'sweep.log'


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  # {dotted key: value}, in axis order.
  overrides: dict
  command: tuple

  def workdir(self, root: str) -> str:
    return os.path.join(root, self.name)


# ------------------------------------------------------------ the grid


def parse_axis(config, text: str) -> tuple[str, list]:
  """'<key>=<v1>,<v2>' -> (dotted key, values parsed as that field's type)."""
  key, sep, values = text.partition('=')
  key = key.strip()
  if not sep or not key:
    raise errors.ConfigError('sweep', f'--sweep {text!r} is not <key>=<v1>,<v2>,...')
  try:
    path = base_config.field_path(config, key)
  except errors.ConfigError as e:
    raise errors.ConfigError(key, f'--sweep {key}: {e}') from None
  items = base_config.split_arg(values)
  if not items:
    raise errors.ConfigError(path, f'--sweep {path}= has no values; give one or more, '
                             'comma-separated.')
  return path, [parse_value(config, path, item) for item in items]


def parse_value(config, path: str, text: str):
  """`text` as the type of config field `path` (str fields take it verbatim)."""
  field_type = _parent(config, path).get_type(path.rsplit('.', 1)[-1])
  if field_type is str:
    value = text
  elif field_type is bool and text.lower() in ('true', 'false'):
    value = text.lower() == 'true'
  else:
    value = base_config.literal(text)
  probe = copy.deepcopy(config)
  try:
    base_config.set_field(probe, path, value)
  except errors.ConfigError:
    raise errors.ConfigError(path, f'--sweep {path}: {text!r} is not of the field\'s '
                             f'type, {field_type.__name__}.') from None
  return value


def _parent(config, path: str):
  for part in path.split('.')[:-1]:
    config = config[part]
  return config


def load_study(config_arg: str):
  """The config file's `get_sweep(arg)` override dicts, or [{}] where it has none."""
  path, _, arg = config_arg.partition(':')
  spec = importlib.util.spec_from_file_location('_study_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    return [{}]
  points = module.get_sweep(arg or None)
  if not points or not all(isinstance(p, dict) for p in points):
    raise errors.ConfigError('get_sweep', f'{path}: get_sweep() must return a non-empty list '
                             'of override dicts.')
  return points


def grid(config, axes: list[tuple[str, list]], study: list[dict], seeds: int | None) -> list[dict]:
  """Every run's overrides: study points x axes x seeds, each validated."""
  study = [{base_config.field_path(config, k): v for k, v in point.items()} for point in study]
  if seeds is not None:
    if seeds < 1:
      raise errors.ConfigError('seeds', f'--seeds={seeds} must be at least 1.')
    axes = axes + [('seed', list(range(seeds)))]
  keys = [k for k, _ in axes]
  repeated = {k for k in keys if keys.count(k) > 1} | {k for p in study for k in p if k in keys}
  if repeated:
    raise errors.ConfigError(sorted(repeated)[0], f'{sorted(repeated)} swept twice; give each '
                             'key one axis.')
  points = []
  for point in study:
    for values in itertools.product(*(v for _, v in axes)):
      points.append({**point, **dict(zip(keys, values))})
  for overrides in points:
    run_config = copy.deepcopy(config)
    for path, value in overrides.items():
      base_config.set_field(run_config, path, value)
    try:
      config_checks.validate(run_config, num_devices=1)
    except ValueError as e:
      raise errors.ConfigError('sweep', f'Run {run_name(overrides)}: {e}') from None
  return points


def flag_value(value) -> str:
  """A value as a --config.<key>= flag writes it."""
  return value if isinstance(value, str) else repr(value)


def run_name(overrides: dict) -> str:
  """'peft.method=lora,learning_rate=0.001,seed=0': readable, filesystem-safe, deterministic."""
  if not overrides:
    return 'run'
  parts = []
  for key, value in overrides.items():
    text = re.sub(r'[^A-Za-z0-9._+-]+', '-', flag_value(value)).strip('-') or 'empty'
    parts.append(f'{key}={text}')
  return ','.join(parts)


def make_runs(config_arg: str, overrides: dict, points: list[dict], root: str) -> list[Run]:
  base = [f'--config.{k}={flag_value(v)}' for k, v in overrides.items()]
  # Absolute paths, so a command runs from any directory (a cluster node's, a Ray worker's).
  path, sep, arg = config_arg.partition(':')
  config_arg, root = os.path.abspath(path) + sep + arg, os.path.abspath(root)
  runs, seen = [], {}
  for point in points:
    name = run_name(point)
    if name in seen and seen[name] != point:  # values that differ only in punctuation
      name = f'{name},{len(seen)}'
    seen[name] = point
    command = (sys.executable, '-m', 'finetune_jax.main', f'--config={config_arg}',
               f'--workdir={os.path.join(root, name)}', *base,
               *(f'--config.{k}={flag_value(v)}' for k, v in point.items()))
    runs.append(Run(name, point, command))
  return runs


# ------------------------------------------------------------ execution


def is_finished(workdir: str, total_steps: int) -> bool:
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f).get('steps', -1) >= total_steps


def _error_line(log: str) -> str:
  """The CLI's one-line error, else the log's last line."""
  lines = [l for l in log.splitlines() if l.strip()]
  errors_ = [l for l in lines if l.startswith('error:')]
  line = (errors_ or lines or ['(no output)'])[-1].strip()
  return line.removesuffix(' (--verbose for the traceback)')


def execute(command: tuple, workdir: str, cpus: list[int] | None) -> tuple[int, str]:
  """Runs one training command with its log in workdir; (exit code, error line)."""
  os.makedirs(workdir, exist_ok=True)
  failed = os.path.join(workdir, FAILED_FILE)
  if os.path.exists(failed):
    os.remove(failed)
  env = dict(os.environ)
  if cpus:  # XLA:CPU sizes its thread pool from the affinity mask.
    env['OMP_NUM_THREADS'] = str(len(cpus))
  with open(os.path.join(workdir, LOG_FILE), 'a') as log:
    log.write('$ ' + shlex.join(command) + '\n')
    log.flush()
    proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                          preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
  if proc.returncode == 0:
    return 0, ''
  with open(os.path.join(workdir, LOG_FILE)) as log:
    error = _error_line(log.read()[-20000:])
  with open(failed, 'w') as f:
    json.dump({'returncode': proc.returncode, 'error': error}, f)
  return proc.returncode, error


def _core_sets(workers: int) -> list[list[int] | None]:
  """The cores each local worker slot gets: the machine's, divided evenly."""
  cores = sorted(os.sched_getaffinity(0))
  if workers <= 1:
    return [None]
  if workers >= len(cores):
    return [[cores[i % len(cores)]] for i in range(workers)]
  return [cores[i::workers] for i in range(workers)]


def run_local(runs: list[Run], root: str, workers: int) -> dict:
  slots = _core_sets(workers)
  free = list(range(len(slots)))
  outcomes = {}
  with concurrent.futures.ThreadPoolExecutor(len(slots)) as pool:
    pending = {}
    queue = list(runs)
    while queue or pending:
      while queue and free:
        run, slot = queue.pop(0), free.pop(0)
        print(f'[sweep] start {run.name}', flush=True)
        pending[pool.submit(execute, run.command, run.workdir(root), slots[slot])] = (run, slot)
      done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in done:
        run, slot = pending.pop(future)
        free.append(slot)
        outcomes[run.name] = future.result()
        _print_outcome(run, outcomes[run.name])
  return outcomes


def run_ray(runs: list[Run], root: str, workers: int, address: str | None) -> dict:
  try:
    import ray  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise errors.ConfigError('executor', '--executor=ray needs Ray: pip install '
                             '"finetune_jax[ray]".') from None
  if not address:
    # Ray starts its workers at nice 15, which starves a training run beside any busy
    # process (its JAX import alone took 35 s against 2 s); a run is the cluster's job here.
    os.environ.setdefault('RAY_worker_niceness', '0')
  ray.init(address=address, include_dashboard=False, log_to_driver=False,
           **({} if address else {'num_cpus': workers}))
  try:
    remote = ray.remote(num_cpus=1)(execute)
    refs = {remote.remote(run.command, run.workdir(root), None): run for run in runs}
    outcomes = {}
    while refs:
      done, _ = ray.wait(list(refs), num_returns=1)
      run = refs.pop(done[0])
      outcomes[run.name] = ray.get(done[0])
      _print_outcome(run, outcomes[run.name])
    return outcomes
  finally:
    ray.shutdown()


def keys(points: list[dict]) -> list[str]:
  """The swept keys, in the order they first appear."""
  out = []
  for point in points:
    out += [k for k in point if k not in out]
  return out


def _print_outcome(run: Run, outcome: tuple[int, str]) -> None:
  code, error = outcome
  print(f'[sweep] {"done" if code == 0 else f"FAILED ({code})"} {run.name}'
        + (f': {error}' if error else ''), flush=True)

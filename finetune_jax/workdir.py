"""What a run leaves in its workdir, and whether a new config may resume it.

config.json (the resolved config), metrics.jsonl (one event a line),
TensorBoard event files, checkpoints/ and, at the end, results.json.
"""
import json
import os

import tensorboardX

# Keys that fix the model, method, data or shapes of a run. Changing one
# makes the checkpoints in the workdir meaningless; `total_steps` and the
# like may change, which is how a finished run is extended.
IDENTITY_KEYS = ('pretrained', 'dataset', 'task', 'num_classes', 'image_size',
                 'dont_load', 'peft', 'optimizer.name')


def _get(config: dict, dotted: str):
  for part in dotted.split('.'):
    config = config.get(part) if isinstance(config, dict) else None
  return config


def _json_roundtrip(value):
  return json.loads(json.dumps(value))


def check_compatible(workdir: str, config) -> None:
  """Raises if `workdir` holds a run whose identity keys differ from `config`."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  new = _json_roundtrip(config.to_dict())
  diffs = [f'{k}: {_get(old, k)!r} -> {_get(new, k)!r}'
           for k in IDENTITY_KEYS if _get(old, k) != _get(new, k)]
  if diffs:
    raise ValueError(
        f'{workdir} holds a run with an incompatible config ({"; ".join(diffs)}). '
        'Use a new --workdir, or restore those values to resume it. '
        'Nothing in the workdir was changed.')


def write_config(workdir: str, config) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True)


def read_results(workdir: str):
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_results(workdir: str, results: dict) -> None:
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2, sort_keys=True)


class MetricWriter:
  """Appends events to metrics.jsonl and TensorBoard.

  On resume, events logged after the restored step by the interrupted run are
  dropped, so the file reads as one uninterrupted run.
  """

  def __init__(self, workdir: str, resume_step: int):
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._drop_after(resume_step)
    self._tb = tensorboardX.SummaryWriter(workdir)

  def _drop_after(self, step: int) -> None:
    if not os.path.exists(self._path):
      return
    with open(self._path) as f:
      kept = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
    with open(self._path, 'w') as f:
      f.writelines(kept)

  def write(self, step: int, split: str, metrics: dict) -> None:
    with open(self._path, 'a') as f:
      f.write(json.dumps({'step': step, 'split': split, **metrics}) + '\n')
    for name, value in metrics.items():
      self._tb.add_scalar(f'{split}/{name}', value, step)

  def close(self) -> None:
    self._tb.close()

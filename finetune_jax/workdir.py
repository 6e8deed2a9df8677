"""What a run leaves in its workdir, and whether a new config may resume it.

config.json (the resolved config), metrics.jsonl (one event a line),
samples.jsonl (causal LMs: generations at each eval), TensorBoard event
files, checkpoints/ and, at the end, results.json.
"""
import json
import os

import tensorboardX

from finetune_jax import base_config
from finetune_jax import distributed
from finetune_jax import errors
from finetune_jax import failpoints
from finetune_jax import peft

# Keys that fix the model, method, data or shapes of a run. Changing one
# makes the checkpoints in the workdir meaningless; `total_steps` and the
# like may change, which is how a finished run is extended. Of `peft`, only
# the chosen method's own fields count (`peft.lora.rank` is no bitfit run's).
IDENTITY_KEYS = ('pretrained', 'dataset', 'task', 'num_classes', 'image_size',
                 'text.pooling', 'dont_load', 'peft', 'optimizer.name',
                 'validation_examples', 'train_examples')


_ABSENT = object()


def _get(config: dict, dotted: str):
  for part in dotted.split('.'):
    config = config.get(part, _ABSENT) if isinstance(config, dict) else _ABSENT
  return config


def _other_methods_fields(name: str) -> set:
  """The dotted `peft` fields that belong to methods other than `name`."""
  mine = set(peft.method.get(name).fields) if name in peft.method.names() else set()
  others = {f for n in peft.method.names() for f in peft.method.get(n).fields}
  return {f'peft.{f}' for f in others - mine}


def _leaves(key: str, value, skip=frozenset()) -> dict:
  """{'peft.lora.rank': 8, ...}: a config subtree as dotted leaves, less `skip`'s."""
  if value is _ABSENT or key in skip:
    return {}
  if not isinstance(value, dict):
    return {key: value}
  out = {}
  for name, child in value.items():
    out.update(_leaves(f'{key}.{name}', child, skip))
  return out


def _json_roundtrip(value):
  return json.loads(json.dumps(value))


def check_usable(workdir: str) -> None:
  """Raises if `workdir` is a file, or cannot be created where it is named."""
  if os.path.exists(workdir):
    if not os.path.isdir(workdir):
      raise errors.ConfigError('workdir', f'--workdir={workdir} is a file; name a directory '
                               '(a new one, or a run to resume).')
    return
  ancestor = os.path.dirname(os.path.abspath(workdir))
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
    why = 'is a file' if not os.path.isdir(ancestor) else 'is not writable'
    raise errors.ConfigError('workdir', f'--workdir={workdir} cannot be created: {ancestor} '
                             f'{why}. Choose another path.')


def check_compatible(workdir: str, config) -> None:
  """Raises if `workdir` holds a run whose identity keys differ from `config`."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  new = _json_roundtrip(config.to_dict())
  default = _json_roundtrip(base_config.get_config().to_dict())
  other = _other_methods_fields(config.peft.method)
  old_leaves, new_leaves, default_leaves = {}, {}, {}
  for key in IDENTITY_KEYS:
    old_leaves.update(_leaves(key, _get(old, key), other))
    new_leaves.update(_leaves(key, _get(new, key), other))
    default_leaves.update(_leaves(key, _get(default, key), other))
  # A field the run's config.json lacks was added to the code after the run,
  # which then ran as its default does.
  for key, value in default_leaves.items():
    old_leaves.setdefault(key, value)
  diffs = [f'{k}: {old_leaves.get(k)!r} -> {new_leaves.get(k)!r}'
           for k in sorted(old_leaves.keys() | new_leaves.keys())
           if old_leaves.get(k) != new_leaves.get(k)]
  if diffs:
    raise ValueError(
        f'{workdir} holds a run with an incompatible config ({"; ".join(diffs)}). '
        'Use a new --workdir, or restore those values to resume it. '
        'Nothing in the workdir was changed.')


def write_config(workdir: str, config) -> None:
  if not distributed.is_writer():
    return
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
  """Written whole or not at all (a kill mid-write leaves the old file, or none)."""
  if not distributed.is_writer():
    return
  path = os.path.join(workdir, 'results.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(results, f, indent=2, sort_keys=True)
  os.replace(path + '.tmp', path)


class MetricWriter:
  """Appends events to metrics.jsonl and TensorBoard.

  On resume, events logged after the restored step by the interrupted run are
  dropped (all of them when it starts over from step 0, whose eval runs again), and so is
  a line cut short by a kill; so the file reads as one uninterrupted run. In a run of
  several processes only process 0 writes.
  """

  def __init__(self, workdir: str, resume_step: int):
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._samples_path = os.path.join(workdir, 'samples.jsonl')
    self._tb = None
    if not distributed.is_writer():
      return
    for path in (self._path, self._samples_path):
      _drop_after(path, resume_step if resume_step > 0 else -1)
    self._tb = tensorboardX.SummaryWriter(workdir)

  def write(self, step: int, split: str, metrics: dict) -> None:
    if self._tb is None:
      return
    _append(self._path, {'step': step, 'split': split, **metrics})
    for name, value in metrics.items():
      self._tb.add_scalar(f'{split}/{name}', value, step)

  def write_samples(self, step: int, samples: list) -> None:
    """Generated continuations: [{'prompt', 'text'}, ...]."""
    if self._tb is None:
      return
    for i, sample in enumerate(samples):
      _append(self._samples_path, {'step': step, **sample})
      self._tb.add_text(f'samples/{i}', f'**{sample["prompt"]}**{sample["text"]}', step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_events(workdir: str, split: str) -> list[dict]:
  """The events of `split` in metrics.jsonl, in order."""
  return [e for e in _events(os.path.join(workdir, 'metrics.jsonl')) if e['split'] == split]


def read_event(workdir: str, step: int, split: str) -> dict | None:
  """The metrics logged for (step, split), without the bookkeeping keys."""
  for event in read_events(workdir, split):
    if event['step'] == step:
      return {k: v for k, v in event.items() if k not in ('step', 'split')}
  return None


def _events(path: str) -> list[dict]:
  """The whole lines of a jsonl file as dicts (a kill can cut the last one short)."""
  if not os.path.exists(path):
    return []
  events = []
  with open(path) as f:
    for line in f:
      try:
        events.append(json.loads(line))
      except ValueError:
        continue
  return events


def _append(path: str, event: dict) -> None:
  line = json.dumps(event) + '\n'
  with open(path, 'a') as f:
    if failpoints.armed('metrics_line'):  # a kill cuts this line short
      f.write(line[:len(line) // 2])
      f.flush()
    failpoints.hit('metrics_line')
    f.write(line)


def _drop_after(path: str, step: int) -> None:
  """Keeps the events of steps <= `step` (what a resumed run continues from)."""
  if not os.path.exists(path):
    return
  kept = [json.dumps(e) + '\n' for e in _events(path) if e['step'] <= step]
  with open(path + '.tmp', 'w') as f:
    f.writelines(kept)
  os.replace(path + '.tmp', path)

"""Named points where the reliability tests make a run fail on purpose.

  FINETUNE_JAX_FAILPOINTS='save:2=kill,eval_batch:3=term' python -m finetune_jax.main ...

sends the process SIGKILL at its 2nd checkpoint save (just after the write starts) and
SIGTERM at its 3rd eval batch. The points: `save`, `eval_batch` and `metrics_line` (half of a
metrics.jsonl line written). Unset, as in every real run, a point costs an environment lookup.
"""
import functools
import os
import signal

ENV = 'FINETUNE_JAX_FAILPOINTS'
ACTIONS = {'kill': signal.SIGKILL, 'term': signal.SIGTERM, 'int': signal.SIGINT}


@functools.lru_cache(maxsize=4)
def _parse(spec: str) -> dict:
  points = {}
  for item in filter(None, spec.split(',')):
    where, action = item.split('=')
    name, count = where.split(':')
    points[name] = (int(count), ACTIONS[action])
  return points


_hits = {}


def _points() -> dict:
  return _parse(os.environ.get(ENV, ''))


def armed(name: str) -> bool:
  """Whether the next `hit(name)` fires (for points that prepare a partial write first)."""
  points = _points()
  return name in points and _hits.get(name, 0) + 1 == points[name][0]


def hit(name: str) -> None:
  """Counts a pass through point `name`; on the configured pass, sends the signal."""
  points = _points()
  if name not in points:
    return
  _hits[name] = _hits.get(name, 0) + 1
  count, signum = points[name]
  if _hits[name] == count:
    os.kill(os.getpid(), signum)

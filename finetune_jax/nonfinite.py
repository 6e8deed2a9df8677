"""The `nonfinite` policy: what a run does after a step whose loss or gradient was not finite.

The train step (steps.py) returns two flags with its metrics, which the host reads only where
it syncs anyway (at logs, evals and before checkpoints), so the check costs no extra sync per
step:
- `stop` (default): the run ends with an error naming the step and the first parameter whose
  gradient was not finite. The flags are read before every checkpoint, so none is written
  after that step: the last one on disk is good.
- `skip`: the step applies no update (params and optimizer state stay as they were; the step
  advances) and the run goes on; the skipped steps are counted (`train_nonfinite_skips` in the
  log, `nonfinite_skips` in results.json) and `nonfinite_max_skips` in a row stop it. Deciding
  the update on every gradient holds them all until the last is known (the barrier that
  grad_clip_norm's global norm sets already), so `stop` does not pay for it.
"""
import jax
import numpy as np

from finetune_jax import errors

POLICIES = ('stop', 'skip')
# The step's metrics that carry the flags; they are no training metric.
FLAGS = ('nonfinite', 'nonfinite_leaf')


def leaf_names(trainable) -> list[str]:
  """'/'-joined paths in jax.tree.leaves order: the step's `nonfinite_leaf` indexes these."""
  return ['/'.join(str(getattr(k, 'key', k)) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]]


class NonFiniteWatch:
  """Collects each step's flags and applies `config.nonfinite` when they are read."""

  def __init__(self, config, trainable, skipped_before: int = 0):
    self.policy = config.nonfinite
    self.max_skips = config.nonfinite_max_skips
    self.skipped = int(skipped_before)  # over the whole run, resumes included
    self._names = leaf_names(trainable)
    self._in_a_row = 0
    self._unread = []  # (step, flags still on device)

  def add(self, step: int, metrics: dict) -> None:
    """Takes the flags out of a step's metrics (they are not averaged with the rest)."""
    self._unread.append((step, {k: metrics.pop(k) for k in FLAGS}))

  def check(self, strategy) -> int:
    """Reads the flags of the steps since the last check; returns how many were skipped.

    Raises NonFiniteError where the policy says the run stops.
    """
    unread, self._unread = self._unread, []
    if not unread:
      return 0
    values = jax.device_get([flags for _, flags in unread])
    skipped = 0
    for (step, _), flags in zip(unread, values):
      bad, leaf = (float(np.ravel(flags['nonfinite'])[0]), int(np.ravel(flags['nonfinite_leaf'])[0]))
      if not bad:
        self._in_a_row = 0
        continue
      where = (f'the gradient of {self._names[leaf]} (the first non-finite one)' if leaf >= 0
               else 'the loss')
      if self.policy == 'stop':
        raise errors.NonFiniteError(
            step, self._names[leaf] if leaf >= 0 else None,
            f'Step {step}: {where} is not finite, so the run stopped (nonfinite=stop). No '
            'checkpoint was written after it; the same command resumes from the last one. '
            'Lower learning_rate, set grad_clip_norm, check the data, or use '
            '--config.nonfinite=skip to skip such steps.')
      skipped += 1
      self.skipped += 1
      self._in_a_row += 1
      if self._in_a_row >= self.max_skips:
        raise errors.NonFiniteError(
            step, self._names[leaf] if leaf >= 0 else None,
            f'Step {step}: {self._in_a_row} steps in a row had a non-finite loss or gradient '
            f'(last: {where}), so the run stopped (nonfinite_max_skips={self.max_skips}). '
            'Lower learning_rate, set grad_clip_norm or check the data.')
    return skipped

"""Orbax checkpoints of the train state: save every N steps, resume the latest.

A checkpoint holds the trainable params, the optimizer state, the step and the
RNG. Frozen params are not saved: they are reloaded from `config.pretrained`,
bit-identical. The data position is the step (batch k depends only on the seed
and k), so restoring the step restores the data stream too.
"""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


# keep_best's checkpoint: the one with the best validation metric, beside the latest ones.
BEST_DIR = 'best_checkpoint'


class Checkpointer:
  """The latest `max_to_keep` checkpoints, or with `best=(metric, higher_is_better)`
  the one best by that metric (orbax's best_fn), in `BEST_DIR`."""

  def __init__(self, workdir: str, max_to_keep: int, best: tuple[str, bool] | None = None):
    self.directory = os.path.abspath(os.path.join(workdir, BEST_DIR if best else 'checkpoints'))
    options = dict(max_to_keep=max_to_keep, create=True)
    if best:
      metric, higher = best
      options.update(max_to_keep=1, best_fn=lambda metrics: metrics[metric],
                     best_mode='max' if higher else 'min')
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(**options))

  def latest_step(self):
    return self._manager.latest_step()

  def best_step(self):
    return self._manager.best_step()

  def reached_preemption(self, step: int) -> bool:
    """Whether the job is being preempted and every process has reached `step` (JAX's
    preemption sync point, where jax.distributed runs one; always False otherwise)."""
    return self._manager.reached_preemption(step)

  def save(self, step: int, state, metrics: dict | None = None) -> None:
    """Saves `state` (host arrays, or sharded jax.Arrays: each device's shards written as
    they lie); returns while the write finishes."""
    self._manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics)

  def restore(self, like, step=None):
    """The state saved at `step` (default: latest), shaped like `like`: host arrays, or
    jax.ShapeDtypeStructs with shardings, which orbax restores sharded. A checkpoint reads
    back in any layout, whichever layout wrote it."""
    step = self.latest_step() if step is None else step
    target = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
        else np.zeros(np.shape(x), np.asarray(x).dtype), like)
    return self._manager.restore(step, args=ocp.args.StandardRestore(target))

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

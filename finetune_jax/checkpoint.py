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


class Checkpointer:

  def __init__(self, workdir: str, max_to_keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self):
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    """Saves a host copy of `state`; returns while the write finishes."""
    self._manager.save(step, args=ocp.args.StandardSave(jax.device_get(state)))

  def restore(self, like, step=None):
    """The state saved at `step` (default: latest), shaped like `like`."""
    step = self.latest_step() if step is None else step
    target = jax.tree.map(
        lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), jax.device_get(like))
    return self._manager.restore(step, args=ocp.args.StandardRestore(target))

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

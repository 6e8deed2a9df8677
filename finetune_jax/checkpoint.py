"""Orbax checkpoints of the train state: save every N steps, resume the newest good one.

A checkpoint holds the trainable params, the optimizer state, the step and the
RNG. Frozen params are not saved: they are reloaded from `config.pretrained`,
bit-identical. The data position is the step (batch k depends only on the seed
and k), so restoring the step restores the data stream too.

Damage is survived, never spread (README, Reliability):
- orbax writes a checkpoint into a temporary directory and renames it when complete, so a
  save cut short by a kill is never read as a checkpoint; it is moved into `corrupt/`;
- each finished checkpoint gets a manifest of its files' sizes and SHA-256 sums, because
  orbax has no checksum of its own: a truncated, emptied or bit-flipped file is found on
  restore, the checkpoint is moved into `corrupt/` and the next older one is restored;
- a save that fails (a full disk) stops the run with the error, and the previous checkpoint
  stays as it was.
"""
import hashlib
import json
import logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from finetune_jax import distributed
from finetune_jax import errors
from finetune_jax import failpoints

# keep_best's checkpoint: the one with the best validation metric, beside the latest ones.
BEST_DIR = 'best_checkpoint'
# Checkpoints found damaged, moved aside (in the checkpoint directory).
CORRUPT_DIR = 'corrupt'
# Each finished checkpoint's {file: [size, sha256]}, in its step directory.
MANIFEST = 'finetune_jax_manifest.json'
# What orbax appends to a checkpoint's directory name until the checkpoint is complete.
PARTIAL_SUFFIX = '.orbax-checkpoint-tmp'


class Checkpointer:
  """The latest `max_to_keep` good checkpoints, or with `best=(metric, higher_is_better)`
  the one best by that metric (orbax's best_fn), in `BEST_DIR`."""

  def __init__(self, workdir: str, max_to_keep: int, best: tuple[str, bool] | None = None):
    self.directory = os.path.abspath(os.path.join(workdir, BEST_DIR if best else 'checkpoints'))
    self._set_aside_partial_saves()
    options = dict(max_to_keep=max_to_keep, create=True)
    if best:
      metric, higher = best
      options.update(max_to_keep=1, best_fn=lambda metrics: metrics[metric],
                     best_mode='max' if higher else 'min')
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(**options))
    self._unsealed = None  # the step saved last, whose manifest waits for its write to end

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
    they lie); returns while the write finishes. A step saved before (a run resumed from an
    older checkpoint passes it again) is kept as it is."""
    self._seal()
    if step in self._manager.all_steps():
      return
    try:
      self._manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics)
    except OSError as e:
      self._failed(step, e)
    self._unsealed = step
    failpoints.hit('save')  # the write is under way in orbax's background thread

  def restore(self, like, step=None):
    """The state saved at `step` (default: latest), shaped like `like`: host arrays, or
    jax.ShapeDtypeStructs with shardings, which orbax restores sharded. A checkpoint reads
    back in any layout, whichever layout wrote it."""
    step = self.latest_step() if step is None else step
    target = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
        else np.zeros(np.shape(x), np.asarray(x).dtype), like)
    return self._manager.restore(step, args=ocp.args.StandardRestore(target))

  def restore_newest_good(self, like):
    """The newest checkpoint that reads back whole, shaped like `like` (see `restore`), or
    None if there is none. Each damaged one on the way is moved into `corrupt/`."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      why = self._damage(step)
      if why is None:
        try:
          return self.restore(like, step)
        except Exception as e:  # orbax's and tensorstore's errors have no common type
          error = f'{type(e).__name__}: {" ".join(str(e).split())[:300]}'
          if self._has_manifest(step):  # its files are as written: the run changed, not them
            raise errors.CheckpointError(
                os.path.join(self.directory, str(step)),
                f'its files are intact but do not restore into this run\'s state ({error}). '
                'The code or config changed since it was written: resume with the version '
                'that wrote it, or use a new --workdir.') from e
          why = f'orbax could not read it ({error})'
      self._set_aside(str(step), why)
      self._manager.reload()
    return None

  def close(self) -> None:
    self._seal()
    self._manager.close()

  # --------------------------------------------------------------- internals

  def _seal(self) -> None:
    """Waits for the last save to finish and writes its manifest."""
    try:
      self._manager.wait_until_finished()
    except OSError as e:
      self._failed(self._unsealed, e)
    step, self._unsealed = self._unsealed, None
    if step is None or not distributed.is_writer():
      return
    step_dir = os.path.join(self.directory, str(step))
    if os.path.isdir(step_dir):
      manifest = {name: _size_and_hash(os.path.join(step_dir, name))
                  for name in _files(step_dir)}
      with open(os.path.join(step_dir, MANIFEST + '.tmp'), 'w') as f:
        json.dump(manifest, f, indent=0, sort_keys=True)
      os.replace(os.path.join(step_dir, MANIFEST + '.tmp'), os.path.join(step_dir, MANIFEST))

  def _has_manifest(self, step: int) -> bool:
    return os.path.exists(os.path.join(self.directory, str(step), MANIFEST))

  def _damage(self, step: int) -> str | None:
    """Why checkpoint `step` is damaged by its manifest, or None (no manifest: a kill came
    between the save's end and the manifest; orbax's own checks then decide)."""
    step_dir = os.path.join(self.directory, str(step))
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
      return None
    try:
      with open(path) as f:
        manifest = json.load(f)
    except (OSError, ValueError) as e:
      return f'its manifest is unreadable ({e})'
    for name, (size, digest) in sorted(manifest.items()):
      file = os.path.join(step_dir, name)
      if not os.path.exists(file):
        return f'{name} is missing'
      if os.path.getsize(file) != size:
        return f'{name} has {os.path.getsize(file)} bytes, not the {size} written'
      if _size_and_hash(file)[1] != digest:
        return f'{name} does not match the SHA-256 sum written with it'
    return None

  def _set_aside_partial_saves(self) -> None:
    if not os.path.isdir(self.directory):
      return
    for name in sorted(os.listdir(self.directory)):
      if PARTIAL_SUFFIX in name:
        self._set_aside(name, 'a save cut short (the run was killed while writing it)')

  def _set_aside(self, name: str, why: str) -> None:
    """Moves checkpoint directory `name` into corrupt/, with a warning."""
    target = os.path.join(self.directory, CORRUPT_DIR, name)
    logging.warning('Checkpoint %s is damaged: %s. Moved to %s.',
                    os.path.join(self.directory, name), why, target)
    if not distributed.is_writer():
      return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.exists(target):
      shutil.rmtree(target)
    os.replace(os.path.join(self.directory, name), target)

  def _failed(self, step, error: OSError):
    """A save failed: remove what it wrote, keep the rest, and stop the run."""
    if os.path.isdir(self.directory):
      for name in os.listdir(self.directory):
        if PARTIAL_SUFFIX in name:
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    kept = [s for s in self._manager.all_steps(read=True) if s != step]
    previous = (f'the checkpoint of step {max(kept)} is intact and a rerun resumes from it'
                if kept else 'no earlier checkpoint exists')
    raise errors.CheckpointError(
        self.directory, f'saving step {step} failed: {error.strerror or error}; {previous}. '
        'Free disk space (or choose a --workdir with room) and run the same command again.'
    ) from error


def _files(directory: str) -> list[str]:
  """The files under `directory`, as paths relative to it, less the manifest."""
  out = []
  for root, _, names in os.walk(directory):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), directory)
      if not rel.startswith(MANIFEST):
        out.append(rel)
  return sorted(out)


def _size_and_hash(path: str) -> list:
  with open(path, 'rb') as f:
    return [os.path.getsize(path), hashlib.file_digest(f, 'sha256').hexdigest()]

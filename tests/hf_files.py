"""Helpers for the Hugging Face parity tests: saved model dirs edited for the
loaders' bad-input tests, and params moved off their init so every mapping shows."""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from finetune_jax.peft import paths


def copy_hf_dir(src, dst, edit=None, config=None):
  """A copy of `src` with its tensors passed through `edit` and `config` merged in."""
  shutil.copytree(src, dst)
  if edit:
    tensors = safetensors.numpy.load_file(str(dst / 'model.safetensors'))
    safetensors.numpy.save_file(edit(tensors), str(dst / 'model.safetensors'))
  if config:
    hf_config = json.loads((dst / 'config.json').read_text())
    (dst / 'config.json').write_text(json.dumps({**hf_config, **config}))
  return str(dst)


def around_one(rng, v):
  """A fresh draw in [0.5, 1.5): scales that move off 1 (IA3 vectors, DoRA magnitudes)."""
  return jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype)


def normal(rng, v, scale=0.3):
  """A fresh draw N(0, scale^2): B matrices, adapters, heads."""
  return jnp.asarray(scale * rng.standard_normal(v.shape), v.dtype)


def randomise(params, moves, seed=1):
  """`params` with each leaf whose path one of `moves`' tests accepts replaced by
  that move's draw(rng, value): moves are (test(path), draw) pairs, the first
  that accepts wins; one rng in path order, so a seed gives the same params."""
  rng = np.random.default_rng(seed)
  flat = paths.flatten(params)
  for p, v in flat.items():
    draw = next((draw for test, draw in moves if test(p)), None)
    if draw is not None:
      flat[p] = draw(rng, v)
  return paths.unflatten(flat)

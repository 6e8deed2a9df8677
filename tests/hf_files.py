"""Editing saved Hugging Face model dirs, for the loaders' bad-input tests."""
import json
import shutil

import safetensors.numpy


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

"""Partial fine-tuning: the bottom of the network is frozen, the top trains.

`cfg.num_frozen_blocks` freezes the first N entries of the model's ordered
`blocks` (for EfficientNet-Lite: stem, blocks_0, blocks_1, ...), and
`cfg.freeze` is a list of regexes over parameter paths that freezes more.
"""
from finetune_jax.peft import base
from finetune_jax.peft import paths


def frozen_paths(model, cfg) -> set:
  names = list(paths.flatten(model.params))
  n = cfg.num_frozen_blocks
  if not 0 <= n <= len(model.blocks):
    raise ValueError(
        f'peft.num_frozen_blocks={n} is out of range: the model has '
        f'{len(model.blocks)} blocks {list(model.blocks)}; use 0..{len(model.blocks)}.')
  # A block is a top-level key: a subtree ('stem/conv/kernel') or a single
  # array ('pos_embedding').
  blocks = set(model.blocks[:n])
  frozen = {p for p in names if p.split('/', 1)[0] in blocks}
  frozen |= paths.match(cfg.freeze, names, what='peft.freeze')
  return frozen


def adapt(model, cfg):
  frozen = frozen_paths(model, cfg)
  return base.freeze_all_but(model, lambda path: path not in frozen)

"""The interface every fine-tuning method implements.

A method takes a loaded model and the `peft` config section and returns an
`Adapted` model: the module to run (LoRA, adapters and prompts wrap or
intercept it; freezing methods keep it), the full parameter tree (with any
new parameters added) and the set of parameter paths that train. The trainer
differentiates only those; everything else is a frozen argument of the step.
"""
import dataclasses
from typing import Callable

import flax.linen as nn
import ml_collections

from finetune_jax.peft import paths


@dataclasses.dataclass(frozen=True)
class Adapted:
  module: nn.Module
  params: dict
  trainable: frozenset  # '/'-joined parameter paths that receive gradients


def freeze_all_but(model, is_trainable: Callable[[str], bool]) -> Adapted:
  """Keeps the model as it is and trains the params `is_trainable` selects.

  Normalisation statistics never train, whatever the predicate says.
  """
  names = paths.flatten(model.params)
  trainable = frozenset(p for p in names
                        if is_trainable(p) and not paths.STATISTICS.search(p))
  return Adapted(model.module, model.params, trainable)


def is_head(model, path: str) -> bool:
  return path.startswith(model.head + '/')


Method = Callable[[object, ml_collections.ConfigDict], Adapted]

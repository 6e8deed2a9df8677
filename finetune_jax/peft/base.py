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

from finetune_jax import errors
from finetune_jax.peft import paths


@dataclasses.dataclass(frozen=True)
class Adapted:
  module: nn.Module
  params: dict
  trainable: frozenset  # '/'-joined parameter paths that receive gradients
  method: object = None  # the `peft.method.Method` that made it (set by `peft.adapt`)


def freeze_all_but(model, is_trainable: Callable[[str], bool]) -> Adapted:
  """Keeps the model as it is and trains the params `is_trainable` selects.

  Normalisation statistics never train, whatever the predicate says.
  """
  names = paths.flatten(model.params)
  trainable = frozenset(p for p in names
                        if is_trainable(p) and not paths.STATISTICS.search(p))
  return Adapted(model.module, model.params, trainable)


def added_paths(model, adapted: Adapted) -> frozenset:
  """The trainable params the method added (LoRA factors, prompts, ...): not pretrained."""
  return adapted.trainable - paths.flatten(model.params).keys()


def is_head(model, path: str) -> bool:
  return path.startswith(model.head + '/')


def trains_head(model) -> bool:
  """A classifier head is new and must train; a language model's own head
  stays frozen (as in HF PEFT). Methods that add params train these heads too."""
  return bool(model.config.get('num_classes'))


def head_leaves(model) -> frozenset:
  """The param paths of a head `trains_head` says must train (no statistics)."""
  if not trains_head(model):
    return frozenset()
  return frozenset(p for p in paths.flatten(model.params)
                   if is_head(model, p) and not paths.STATISTICS.search(p))


def not_applicable(model, method: str, needs: str, fix: str) -> errors.NotApplicable:
  """The error for a method the model's architecture cannot take (IA3 on a CNN)."""
  name = '-'.join(str(model.config[k]) for k in ('model', 'variant') if model.config.get(k))
  return errors.NotApplicable(
      method, model.config.get('model'),
      f'peft.method={method} does not apply to this model ({name or "?"}): it needs '
      f'{needs}, which this model lacks. {fix}')


def reserved_positions(module) -> int:
  """Positions of the context a method's module takes before the input (prompt and
  prefix tuning's P); 0 for every other module."""
  return getattr(module, 'reserved_positions', 0)

"""The few error types a user meets, each with its fix in the message.

All are ValueErrors, raised before any compile or write. Their fields let
tests (and scripts) check what went wrong without parsing the wording; the
CLI prints the message as one line (`python -m finetune_jax.main --verbose`
adds the traceback).
"""
import difflib
import re
from typing import Sequence


def nearest(pattern: str, names: Sequence[str], n: int = 8) -> list[str]:
  """The names that look most like `pattern` (a regex or a name), for `NoMatch`."""
  literal = re.sub(r'[\^$\\.*+?()\[\]{}|]', '', pattern)
  close = difflib.get_close_matches(literal, names, n=n, cutoff=0.0)
  return close or list(names[:n])


class ConfigError(ValueError):
  """A config field holds a value this run cannot use. option: its dotted name."""

  def __init__(self, option: str, message: str | None = None):
    if message is None:  # one argument, as libraries re-raise an error: its message
      option, message = None, option
    super().__init__(message)
    self.option = option


class NoMatch(ConfigError):
  """A pattern in `option` selects nothing; `nearest` are the closest real names."""

  def __init__(self, option: str, pattern, nearest, message: str):
    super().__init__(option, message)
    self.pattern, self.nearest = pattern, nearest


class CheckpointError(ValueError):
  """A checkpoint file (or one key of it) cannot be read as the model asks."""

  def __init__(self, file: str, why: str, key: str | None = None):
    where = f'{file} ({key})' if key else file
    super().__init__(f'{where}: {why}')
    self.file, self.key, self.why = file, key, why


class UnsafeCheckpointError(CheckpointError):
  """A pickled checkpoint holds objects other than tensors and plain containers;
  nothing in it is run."""


class DataError(ValueError):
  """A dataset, or an example in it, cannot be used as the config asks."""


class NotApplicable(ConfigError):
  """`peft.method` names a method the model's architecture cannot take (IA3 on a CNN)."""

  def __init__(self, method: str, architecture: str, message: str):
    super().__init__('peft.method', message)
    self.method, self.architecture = method, architecture


class NonFiniteError(ValueError):
  """Training met a non-finite loss or gradient and the `nonfinite` policy stops the run.
  step: the step; param: the first parameter whose gradient was not finite (None: the loss)."""

  def __init__(self, step: int, param: str | None, message: str):
    super().__init__(message)
    self.step, self.param = step, param

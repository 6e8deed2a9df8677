"""What the command-line entry points share: one line per user error.

A ValueError (every error type in errors.py is one) is printed as a single
line with its fix and exits with status 2; `--verbose` shows the traceback.
So is a flag that does not parse: an unknown `--config.<key>` (with the nearest
real key), a value of the wrong type, a config file that does not load.
"""
import functools
import re
import sys

from absl import app
from absl import flags

from finetune_jax import errors

flags.DEFINE_bool('verbose', False, 'On an error, print its traceback, not just its one line.')


def fail(message: str) -> None:
  """Prints `message` as the one error line and exits with status 2."""
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(2)


def _verbose(argv) -> bool:
  return any(a in ('--verbose', '--verbose=true', '--verbose=True') for a in argv)


def parse_flags(argv):
  """absl's flag parsing, its errors (and those of ml_collections' config flags, which
  load the config file while parsing) as one line."""
  try:
    rest = flags.FLAGS(argv)
    for name in flags.FLAGS:  # a config file that failed to load raises when first read
      value = flags.FLAGS[name].value
      if type(value).__name__ == '_ErrorConfig':
        value.keys()
    return rest
  except Exception as e:  # flags.Error, and whatever a config file or override raises
    if _verbose(argv):
      raise
    if isinstance(e, AttributeError):  # ml_collections: an unknown field
      fail(_unknown_key(str(e), argv))
    fail(f'{_innermost(e)} (--helpfull lists the flags)')


def _innermost(error: BaseException) -> BaseException:
  """config_flags wraps what loading a config file raised, traceback and all: the error
  at the bottom of the chain is the one that names the fix."""
  inner = error
  while (inner.__cause__ or inner.__context__) is not None:
    inner = inner.__cause__ or inner.__context__
  ours = type(inner).__module__ == errors.__name__
  return inner if ours or isinstance(inner, OSError) else error


def _unknown_key(message: str, argv) -> str:
  """'--config.peft.lora.rnak is no config key; did you mean peft.lora.rank?'"""
  message = message.replace('\\', '')
  near = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', message)
  unknown = near.group(2) if near else (re.findall(r"'([\w.]+)'", message) or ['?'])[0]
  for arg in argv:
    flag = arg.split('=')[0]
    if flag.startswith('--') and flag.rsplit('.', 1)[-1] == unknown:
      parent = flag[2:].split('.', 1)[1].rsplit('.', 1)[0] if flag.count('.') > 1 else ''
      hint = f'; did you mean {parent + "." if parent else ""}{near.group(1)}?' if near else ''
      return f'{flag} is no config key{hint} (base_config.py lists them all)'
  return f'{unknown!r} is no config key (base_config.py lists them all)'


def run(main) -> None:
  """absl's app.run(main), with user errors as one line."""
  @functools.wraps(main)
  def reporting(argv):
    try:
      return main(argv)
    except ValueError as e:
      if flags.FLAGS.verbose:
        raise
      fail(f'{e} (--verbose for the traceback)')
  app.run(reporting, flags_parser=parse_flags)

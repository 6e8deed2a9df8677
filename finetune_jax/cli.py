"""What the command-line entry points share: one line per user error.

A ValueError (every error type in errors.py is one) is printed as a single
line with its fix and exits with status 2; `--verbose` shows the traceback.
"""
import functools
import sys

from absl import app
from absl import flags

flags.DEFINE_bool('verbose', False, 'On an error, print its traceback, not just its one line.')


def run(main) -> None:
  """absl's app.run(main), with user errors as one line."""
  @functools.wraps(main)
  def reporting(argv):
    try:
      return main(argv)
    except ValueError as e:
      if flags.FLAGS.verbose:
        raise
      print(f'error: {" ".join(str(e).split())} (--verbose for the traceback)',
            file=sys.stderr)
      sys.exit(2)
  app.run(reporting)

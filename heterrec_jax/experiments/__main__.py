"""`python -m heterrec_jax.experiments`: the command line of `cli.py`."""

import sys

from heterrec_jax.experiments.cli import main

sys.exit(main())

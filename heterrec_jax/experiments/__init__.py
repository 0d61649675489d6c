"""Experiment sweeps: the baseline comparison (the paper's Table 1), the ablation (Table 2) and
the layer-scaling study (Figure 3), made only of `train.train` runs and their results.json.

    sweep.py    the runs of a sweep, the per-row tuning of one field, the train commands, plan.txt
    runner.py   trains the unfinished runs in this process; the popularity floor
    gather.py   what the finished runs say: metrics (mean ± std), wall times, the budget
    tables.py   Table 1 / Table 2: table.json and table.md
    scaling.py  Figure 3: scaling.json and scaling.png
    paired.py   two models on the same users: differences with a bootstrap interval over users
    cli.py      the command line, `python -m heterrec_jax.experiments` (see docs/experiments.md)
"""

from heterrec_jax.experiments.cli import main
from heterrec_jax.experiments.sweep import Run, Sweep, Tuning

__all__ = ['Run', 'Sweep', 'Tuning', 'main']

"""PinnerFormer on MovieLens-100k: its dense all-action loss over the next N_step = 3 events,
in-batch negatives plus uniform ones with the log-Q correction (its paper's mixed sampling),
L2-normalised vectors, tau 0.05; d = 64, 2 layers, 2 heads, dropout 0.2. The rest (protocol,
batch, patience 10) is SASRec's file. Three seeds (docs/results.md, twenty-first session):
test Recall@50 0.4076, nDCG@10 0.0604, 1,700-2,500 s a run on the 2-core CPU beside another run
(its step is the dearest of the baselines: the in-batch candidates of three steps).

    python -m heterrec_jax.train --config configs/ml100k_pinnerformer.py \\
        --workdir runs/ml100k_pinnerformer
"""

import dataclasses
import pathlib

from heterrec_jax.config import Config, load_config


def sasrec_config() -> Config:
  return load_config(str(pathlib.Path(__file__).with_name('ml100k_sasrec.py')))


def get_config() -> Config:
  cfg = sasrec_config()
  # 2 layers (n1 + n2): SASRec's third layer was chosen for SASRec.
  return dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, name='pinnerformer', d_f=32, dropout=0.2, n1=1,
                                     n2=1),
      loss=dataclasses.replace(cfg.loss, negatives='mixed', log_q=True, scoring='cosine',
                               tau=0.05, n_step=3, label_smoothing=0.0))
